"""Model pool and language block on tiny random Qwen2 models: real transformers loading."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

from sage_ros.core.conversation import ChatTurn
from sage_ros.core.language import LanguageBlock
from sage_ros.core.models import (Cancelled, GenerationResult, LoadError, ModelError, ModelPool,
                                  ModelSpec, StopFn, TextFn, UnknownRole, resolve_model_path)
from sage_ros.core.routing import Complexity

HELLO = [ChatTurn('system', 'be brief'), ChatTurn('user', 'hello robot')]


def pool(models: Dict[str, Path], max_resident: int = 1, **spec: object) -> ModelPool:
    specs = {r: ModelSpec(role=r, model_id=f'tiny-{r}', path=str(p), **spec)  # type: ignore[arg-type]
             for r, p in models.items()}
    return ModelPool(specs, default_role='small', max_resident=max_resident)


def test_generate_streams_pieces_that_make_the_answer(tiny_models: Dict[str, Path]) -> None:
    p = pool(tiny_models, max_new_tokens=6)
    pieces: List[str] = []
    g = p.generate('small', HELLO, on_text=pieces.append)
    assert g.completion_tokens == 6 and g.prompt_tokens > 5
    assert g.model_id == 'tiny-small' and g.role == 'small' and g.swapped
    # The tiny models never end by themselves: the answer ran into its cap, so it is marked
    # shortened and is what streamed, cut back to its last sentence end if it has one.
    assert g.truncated and pieces and ''.join(pieces).strip().startswith(g.text)
    assert 0 < g.time_to_first_token_s <= g.duration_s
    assert not p.generate('small', HELLO).swapped


def test_an_answer_that_ends_with_its_eos_token_is_not_shortened(
        tiny_models: Dict[str, Path]) -> None:
    p = pool(tiny_models, max_new_tokens=6)
    entry = p.load('small')
    tok, config = entry.tokenizer, entry.model.generation_config
    # Let the model end: EOS allowed, and forced as the last token of the budget.
    config.suppress_tokens = tok.convert_tokens_to_ids(['<|endoftext|>', '<|im_start|>'])
    config.forced_eos_token_id = tok.eos_token_id
    g = p.generate('small', HELLO)
    assert g.completion_tokens == 6 and not g.truncated


def test_devices_resolve_to_the_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    from sage_ros.core import models
    from sage_ros.core.models import memory   # resolve_device looks cuda_available up there
    monkeypatch.setattr(memory, 'cuda_available', lambda: False)
    assert models.resolve_device('auto', False) == ('cpu', '')
    device, note = models.resolve_device('cuda:0', True)
    assert device == 'cpu' and 'CUDA is not available' in note
    assert models.resolve_device('cuda', False) == ('cuda', '')
    assert models.resolve_device('cpu', True) == ('cpu', '')
    monkeypatch.setattr(memory, 'cuda_available', lambda: True)
    assert models.resolve_device('auto', False) == ('cuda', '')
    assert models.resolve_device('cuda:1', True) == ('cuda:1', '')


def test_swap_evicts_the_previous_model_and_frees_it(tiny_models: Dict[str, Path]) -> None:
    import weakref
    p = pool(tiny_models)
    small_ref = weakref.ref(p.load('small').model)
    g = p.generate('large', HELLO, max_new_tokens=2)
    assert g.swapped and g.model_id == 'tiny-large'
    assert [e.spec.role for e in p.loaded()] == ['large']
    assert small_ref() is None
    assert [(s.from_role, s.to_role, s.succeeded) for s in p.swaps] == [
        ('', 'small', True), ('small', 'large', True)]


def test_two_resident_models_swap_back_without_loading(tiny_models: Dict[str, Path]) -> None:
    p = pool(tiny_models, max_resident=2, keep_resident=True)
    p.load('small')
    p.load('large')
    assert not p.generate('small', HELLO, max_new_tokens=1).swapped
    assert len(p.swaps) == 2


def test_missing_model_is_a_clear_load_error(tmp_path: Path, tiny_models: Dict[str, Path]) -> None:
    p = pool({'small': tiny_models['small'], 'large': tmp_path / 'nowhere'})
    with pytest.raises(LoadError, match="role 'large' not found: no config.json"):
        p.generate('large', HELLO)
    assert p.swaps[-1].succeeded is False
    with pytest.raises(UnknownRole, match="unknown model role 'huge'"):
        p.generate('huge', HELLO)
    with pytest.raises(LoadError, match='run `sage models prepare`'):
        ModelPool({'small': ModelSpec('small', 'x', 'offline:not-there')}, 'small').load('small')


def test_corrupt_weights_are_a_load_error(tmp_path: Path, tiny_models: Dict[str, Path]) -> None:
    import shutil
    bad = tmp_path / 'corrupt'
    shutil.copytree(tiny_models['small'], bad)
    (bad / 'model.safetensors').write_bytes(b'not a safetensors file')
    with pytest.raises(LoadError, match="cannot load model for role 'small'"):
        pool({'small': bad}).load('small')


def test_invalid_messages_are_refused(tiny_models: Dict[str, Path]) -> None:
    p = pool(tiny_models)
    with pytest.raises(ValueError, match='no messages'):
        p.generate('small', [])
    with pytest.raises(ValueError, match='unknown chat role'):
        p.generate('small', [ChatTurn('robot', 'hi')])


def test_generation_can_be_cancelled_between_tokens(tiny_models: Dict[str, Path]) -> None:
    p = pool(tiny_models, max_new_tokens=400)
    stop = threading.Event()
    seen: List[str] = []

    def on_text(piece: str) -> None:
        seen.append(piece)
        if len(seen) == 3:
            stop.set()
    with pytest.raises(Cancelled):
        p.generate('small', HELLO, on_text=on_text, should_stop=stop.is_set)
    assert 3 <= len(seen) < 50
    assert p.generate('small', HELLO, max_new_tokens=2).completion_tokens == 2  # still usable


def test_prompt_longer_than_the_context_window_is_refused(tiny_models: Dict[str, Path]) -> None:
    p = pool(tiny_models, context_window=16)
    with pytest.raises(ModelError, match="role 'small': .* context window"):
        p.generate('small', [ChatTurn('user', 'hello robot ' * 20)])


class Recorder:
    """Wraps a real pool and keeps every message list it was asked to answer."""

    def __init__(self, inner: ModelPool) -> None:
        self.inner = inner
        self.calls: List[Sequence[ChatTurn]] = []

    def generate(self, role: str, messages: Sequence[ChatTurn], max_new_tokens: int = 0,
                 temperature: float = 0.0, on_text: Optional[TextFn] = None,
                 should_stop: Optional[StopFn] = None,
                 complexity: Optional[str] = None, preamble: str = '',
                 memory: Sequence[str] = ()) -> GenerationResult:
        self.calls.append(list(messages))
        return self.inner.generate(role, messages, max_new_tokens, temperature, on_text,
                                   should_stop, complexity, preamble=preamble, memory=memory)


def test_a_turns_cap_is_told_to_the_model_and_the_lower_cap_wins(
        tiny_models: Dict[str, Path]) -> None:
    rec = Recorder(pool(tiny_models, max_new_tokens=8))
    block = LanguageBlock(rec, max_new_tokens=5, length_hint=True)
    a = block.respond('hello', max_new_tokens=3)
    assert a.generation.completion_tokens == 3
    assert rec.calls[0][0].role == 'system' and 'under 5 words' in rec.calls[0][0].content
    b = block.respond('hello again')            # no cap from the turn: no hint, block cap
    assert b.generation.completion_tokens == 5
    assert 'words' not in rec.calls[1][0].content
    block.conversation.set_max_exchanges(1)
    assert len(block.conversation) == 1


def test_conversation_survives_a_swap(tiny_models: Dict[str, Path]) -> None:
    rec = Recorder(pool(tiny_models, max_new_tokens=3))
    block = LanguageBlock(rec)
    a1 = block.respond('hello, I am Ada')
    a2 = block.respond('Design a plan for the lab')
    a3 = block.respond('what is my name?')
    assert (a1.complexity, a2.complexity) == (Complexity.SIMPLE, Complexity.COMPLEX)
    assert [a.generation.role for a in (a1, a2, a3)] == ['small', 'large', 'small']
    assert a2.generation.swapped and a3.generation.swapped
    after_swap = [(m.role, m.content) for m in rec.calls[2]]
    assert ('user', 'hello, I am Ada') in after_swap
    assert ('assistant', a1.generation.text) in after_swap
    assert ('assistant', a2.generation.text) in after_swap


def test_offline_paths_resolve_into_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv('SAGE_MODEL_CACHE', str(tmp_path))
    assert resolve_model_path('offline:m') == str(tmp_path / 'm')
    assert resolve_model_path('Qwen/Qwen2.5-0.5B-Instruct') == 'Qwen/Qwen2.5-0.5B-Instruct'
    assert resolve_model_path('~/x') == str(Path.home() / 'x')
