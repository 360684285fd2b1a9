"""Model pool on tiny random Qwen2 models, real transformers loads: progress and cancel, memory
budget and eviction, fallback on missing/corrupt/over-budget models, the swap policy end to end,
changed entries, persisted history, and memory given back on unload."""

from __future__ import annotations

import shutil
import weakref
from pathlib import Path
from typing import Dict, List, Optional

import pytest

from sage_ros.core.conversation import ChatTurn
from sage_ros.core.models import (Cancelled, LoadError, LoadProgress, ModelPool, ModelSpec,
                                  OverBudget, inspect_weights, process_rss,
                                  read_through_page_cache)
from sage_ros.core.store import StateStore
from sage_ros.core.swap_policy import PolicyConfig, SwapPolicy

HELLO = [ChatTurn('user', 'hello robot')]


def spec(role: str, path: Path, **kw: object) -> ModelSpec:
    kw.setdefault('max_new_tokens', 2)
    return ModelSpec(role=role, model_id=f'tiny-{role}', path=str(path),
                     **kw)  # type: ignore[arg-type]


def two_roles(models: Dict[str, Path], large: Optional[Path] = None, keep_resident: bool = False,
              **kw: object) -> ModelPool:
    """small (priority 0) and large (priority 1), each the other's fallback."""
    specs = {'small': spec('small', models['small'], priority=0, fallback=('large',),
                           keep_resident=keep_resident),
             'large': spec('large', large or models['large'], priority=1, fallback=('small',),
                           keep_resident=keep_resident)}
    return ModelPool(specs, 'small', **kw)  # type: ignore[arg-type]


@pytest.fixture
def broken(tmp_path: Path, tiny_models: Dict[str, Path]) -> Dict[str, Path]:
    """Copies of the large tiny model with a truncated and a garbled weights file, and a path
    with nothing in it."""
    truncated, garbled = tmp_path / 'truncated', tmp_path / 'garbled'
    for d in (truncated, garbled):
        shutil.copytree(tiny_models['large'], d)
    weights = (truncated / 'model.safetensors').read_bytes()
    (truncated / 'model.safetensors').write_bytes(weights[:len(weights) // 2])
    garbage = bytearray((garbled / 'model.safetensors').read_bytes())
    garbage[8:72] = b'\xff' * 64
    (garbled / 'model.safetensors').write_bytes(bytes(garbage))
    return {'truncated': truncated, 'garbled': garbled, 'missing': tmp_path / 'missing'}


def test_load_reports_bytes_and_shards_and_measures_memory(tiny_models: Dict[str, Path]) -> None:
    p = ModelPool({'small': spec('small', tiny_models['small'])}, 'small',
                  preread_chunk_bytes=64 << 10)
    steps: List[LoadProgress] = []
    info = inspect_weights(p.spec('small'))
    estimate = p.estimate_need('small')
    entry = p.load('small', progress=steps.append)
    size = (tiny_models['small'] / 'model.safetensors').stat().st_size
    assert info.file_bytes == size and info.files == (tiny_models['small'] / 'model.safetensors',)
    stages = [s.stage for i, s in enumerate(steps) if i == 0 or steps[i - 1].stage != s.stage]
    assert stages == ['weights', 'tokenizer', 'weights', 'done']  # read ahead, then load
    assert [s.fraction for s in steps] == sorted(s.fraction for s in steps)
    weights = [s for s in steps if s.stage == 'weights' and s.fraction <= 0.8]
    assert len(weights) > 3, 'one step per chunk read'
    assert [s.bytes_done for s in weights] == sorted(s.bytes_done for s in weights)
    assert weights[-1].bytes_done == size == weights[-1].bytes_total
    assert (weights[0].shards_done, weights[-1].shards_done, weights[-1].shards_total) == (0, 1, 1)
    assert steps[-1].fraction == 1.0
    assert entry.memory_bytes >= entry.tensor_bytes > 0 and entry.bytes_read == size
    assert 0.8 * entry.tensor_bytes <= estimate <= entry.tensor_bytes  # buffers: not in the file
    assert p.estimate_need('small') == entry.memory_bytes  # measured from now on
    event = p.swaps[-1]
    assert event.succeeded and event.bytes_read == size
    assert event.memory_bytes == entry.memory_bytes


def test_a_load_is_cancelled_between_chunks_and_the_pool_stays_usable(
        tiny_models: Dict[str, Path]) -> None:
    p = ModelPool({'small': spec('small', tiny_models['small'])}, 'small',
                  preread_chunk_bytes=16 << 10)
    seen: List[LoadProgress] = []
    with pytest.raises(Cancelled, match="load of role 'small' cancelled while reading weights"):
        p.load('small', progress=seen.append,
               should_stop=lambda: sum(s.stage == 'weights' for s in seen) >= 2)
    assert not p.loaded() and p.loading_role == '' and not p.busy
    assert not p.swaps[-1].succeeded and 'cancelled' in p.swaps[-1].error
    assert p.generate('small', HELLO).completion_tokens == 2


def test_a_swap_cancelled_while_reading_keeps_the_resident_model(
        tiny_models: Dict[str, Path]) -> None:
    p = two_roles(tiny_models)
    p.load('small')
    with pytest.raises(Cancelled):
        p.load('large', should_stop=lambda: True)
    assert [e.spec.role for e in p.loaded()] == ['small'] and p.swaps[-1].evicted == ()


def test_the_budget_refuses_a_model_that_cannot_fit_and_keeps_what_is_resident(
        tiny_models: Dict[str, Path]) -> None:
    p = two_roles(tiny_models)
    small = p.estimate_need('small')
    p.memory_budget_bytes = small * 3 // 2
    p.specs['large'] = spec('large', tiny_models['large'], priority=1, dtype='float32')
    assert p.estimate_need('large') > p.memory_budget_bytes > small
    p.load('small')
    with pytest.raises(OverBudget, match="cannot load role 'large': .*more than the whole memory "
                                         'budget'):
        p.load('large')
    assert [e.spec.role for e in p.loaded()] == ['small'], 'nothing evicted for a hopeless load'
    assert 'budget' in p.swaps[-1].error and 'budget' in p.last_error


def test_the_budget_evicts_the_least_valuable_resident_model(tiny_models: Dict[str, Path]) -> None:
    specs = {r: spec(r, tiny_models['small'], keep_resident=True) for r in ('a', 'b', 'c')}
    p = ModelPool(specs, 'a', max_resident=3)
    need = p.estimate_need('a')
    p.load('a')
    p.load('b')
    measured = sum(e.memory_bytes for e in p.loaded())
    p.memory_budget_bytes = measured + need  # two resident plus a little: the third must evict
    for _ in range(3):
        p.generate('b', HELLO)  # b is used, a sits idle
    p.load('c')
    assert sorted(e.spec.role for e in p.loaded()) == ['b', 'c']
    assert p.swaps[-1].evicted == ('a',) and p.swaps[-1].from_role == 'a'


@pytest.mark.parametrize('case', ['truncated', 'garbled', 'missing'])
def test_a_broken_model_falls_back_to_the_next_role_and_the_session_continues(
        tiny_models: Dict[str, Path], broken: Dict[str, Path], case: str) -> None:
    p = two_roles(tiny_models, large=broken[case])
    p.load('small')
    g = p.generate('large', HELLO)
    assert (g.role, g.requested_role, g.decision) == ('small', 'large', 'fallback')
    assert not g.swapped
    assert g.completion_tokens == 2 and "role 'large' unavailable" in g.fallback
    expected = {'truncated': 'truncated', 'garbled': 'corrupt', 'missing': 'not found'}[case]
    assert expected in g.fallback and expected in p.last_error
    attempts = p.swap_count
    again = p.generate('large', HELLO)  # within retry_failed_s: no new attempt, same answer
    assert again.role == 'small' and expected in again.fallback and p.swap_count == attempts
    assert p.generate('small', HELLO).fallback == ''
    with pytest.raises(LoadError, match=expected):
        p.load('large', retry_failed=True)  # an explicit swap tries again


def test_an_over_budget_model_falls_back(tiny_models: Dict[str, Path]) -> None:
    p = two_roles(tiny_models)
    p.specs['large'] = spec('large', tiny_models['large'], priority=1, dtype='float32',
                            fallback=('small',))
    p.memory_budget_bytes = p.estimate_need('small') * 3 // 2
    g = p.generate('large', HELLO)
    assert (g.role, g.requested_role, g.swapped) == ('small', 'large', True)
    assert 'budget' in g.fallback


def test_when_every_fallback_fails_the_error_names_them_all(
        tiny_models: Dict[str, Path], broken: Dict[str, Path]) -> None:
    p = two_roles({'small': broken['missing'], 'large': broken['garbled']})
    with pytest.raises(LoadError, match="role 'small' not found.*every fallback failed.*corrupt"):
        p.generate('small', HELLO)
    with pytest.raises(LoadError, match='every fallback failed'):
        p.load_or_fall_back('small')


def test_the_resident_large_model_stands_in_and_the_result_says_so(
        tiny_models: Dict[str, Path]) -> None:
    p = two_roles(tiny_models)
    p.load('large')
    g = p.generate('small', HELLO)
    assert (g.role, g.requested_role, g.decision, g.swapped) == ('large', 'small', 'substitute',
                                                                  False)
    assert "kept 'large'" in g.fallback
    assert [e.spec.role for e in p.loaded()] == ['large'] and p.loaded()[0].uses == 1


def test_alternating_requests_swap_at_most_once(tiny_models: Dict[str, Path]) -> None:
    p = two_roles(tiny_models)
    roles = [p.generate('small' if i % 2 == 0 else 'large', HELLO, max_new_tokens=1).role
             for i in range(20)]
    assert p.swap_count <= 2, [(s.from_role, s.to_role) for s in p.swaps]
    assert roles[0] == 'small' and set(roles[1:]) == {'large'}
    both = two_roles(tiny_models, keep_resident=True, max_resident=2)
    roles = [both.generate('small' if i % 2 == 0 else 'large', HELLO, max_new_tokens=1).role
             for i in range(20)]
    assert both.swap_count == 2 and not any(s.evicted for s in both.swaps)
    assert roles == ['small', 'large'] * 10


def test_a_strict_policy_follows_every_request(tiny_models: Dict[str, Path]) -> None:
    p = two_roles(tiny_models, policy=SwapPolicy(PolicyConfig(substitute=False)))
    p.load('large')
    g = p.generate('small', HELLO)
    assert (g.role, g.swapped, g.decision, g.fallback) == ('small', True, 'swap', '')


def test_a_changed_entry_is_reloaded(tmp_path: Path, tiny_models: Dict[str, Path]) -> None:
    p = two_roles(tiny_models, keep_resident=True, max_resident=2)
    old_small = weakref.ref(p.load('small').model)
    moved = tmp_path / 'moved'
    shutil.copytree(tiny_models['small'], moved)
    same_path = spec('large', tiny_models['large'], priority=1, max_new_tokens=5,
                     keep_resident=True)
    assert p.update_specs({'small': spec('small', moved, priority=0, keep_resident=True),
                           'large': same_path}) == ['small']
    assert not p.is_loaded('small')
    p.reload(['small'])  # the default role: loaded again at once
    assert old_small() is None and p.is_loaded('small')
    assert str(moved) in p.loaded()[0].key and p.swaps[-1].reason == 'configuration changed'
    p.load('large')
    assert p.loaded()[-1].spec.max_new_tokens == 5, 'a change without reload applies in place'
    p.update_specs({'large': spec('large', tiny_models['large'], priority=1, dtype='float32',
                                  keep_resident=True)})
    assert not p.is_loaded('large') and p.is_loaded('small')
    g = p.generate('large', HELLO)  # not the default role: reloaded at its next use
    assert g.swapped and p.loaded()[-1].spec.dtype == 'float32'


def test_history_count_and_measurements_persist_across_pools(
        tmp_path: Path, tiny_models: Dict[str, Path]) -> None:
    store = StateStore(tmp_path / 'mm.db')
    p = two_roles(tiny_models, store=store, history_limit=3)
    p.load('small')
    p.generate('large', HELLO)
    measured = p.loaded()[0].memory_bytes
    p.unload_all()
    again = two_roles(tiny_models, store=StateStore(tmp_path / 'mm.db'), history_limit=3)
    assert again.swap_count == 2
    assert [(s.from_role, s.to_role) for s in again.swaps] == [('', 'small'), ('small', 'large')]
    assert again.estimate_need('large') == measured
    assert 'large' in again.policy.load_s
    again.load('small')
    assert again.swap_count == 3 and len(again.swaps) == 3


def _medium_model(root: Path, tokenizer_dir: Path) -> Path:
    """A random Qwen2 of ~56 M parameters saved in bf16 (~110 MB): big enough that a leak of its
    fp32 copy would show in the process RSS."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(3)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=768, intermediate_size=2048,
                      num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4,
                      max_position_embeddings=256, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)  # type: ignore[arg-type]  # decorated .to()
    model.save_pretrained(root)
    tok.save_pretrained(root)
    return root


def test_unload_gives_the_memory_back(tmp_path: Path, tiny_models: Dict[str, Path]) -> None:
    path = _medium_model(tmp_path / 'medium', tiny_models['small'])
    # loaded as fp32 from bf16 files: the weights are heap copies, not mmapped pages, so only
    # the GC + malloc_trim in unload gives them back
    p = ModelPool({'m': spec('m', path, dtype='float32')}, 'm')
    p.generate('m', HELLO)  # a first cycle warms up what stays loaded anyway (kernels, caches)
    p.unload('m')
    before = process_rss()
    for _ in range(3):
        entry = p.load('m')
        ref = weakref.ref(entry.model)
        p.generate('m', HELLO)
        loaded = process_rss()
        assert loaded - before > 0.1 * before, 'the model must weigh in the RSS for this test'
        del entry
        assert p.unload('m') and ref() is None
        assert process_rss() <= before * 1.05, f'RSS {process_rss()} vs {before} before the load'


def test_weights_are_read_ahead_with_or_without_sendfile(
        tiny_models: Dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    file = tiny_models['small'] / 'model.safetensors'
    size = file.stat().st_size
    chunks = list(read_through_page_cache(file, 50_000))
    assert sum(chunks) == size and len(chunks) == -(-size // 50_000)

    def no_sendfile(*args: object) -> int:
        raise OSError('not supported')
    monkeypatch.setattr(os, 'sendfile', no_sendfile)
    assert sum(read_through_page_cache(file, 50_000)) == size


def _rewrite_header(path: Path, edit: object) -> None:
    """Rewrite a safetensors header in place with `edit(header)` applied (types garbled)."""
    import json
    import struct
    raw = path.read_bytes()
    n = struct.unpack('<Q', raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    edit(header)  # type: ignore[operator]
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack('<Q', len(new)) + new + raw[8 + n:])


@pytest.mark.parametrize('garble', ['offsets', 'dtype'])
def test_a_header_with_garbled_types_falls_back(tmp_path: Path, tiny_models: Dict[str, Path],
                                                garble: str) -> None:
    bad = tmp_path / 'bad'
    shutil.copytree(tiny_models['large'], bad)

    def edit(header: Dict[str, object]) -> None:
        name = next(k for k in header if k != '__metadata__')
        entry = header[name]
        assert isinstance(entry, dict)
        if garble == 'offsets':
            entry['data_offsets'] = [str(x) + 'x' for x in entry['data_offsets']]
        else:
            entry['dtype'] = [entry['dtype']]
    _rewrite_header(bad / 'model.safetensors', edit)
    with pytest.raises(LoadError, match='corrupt'):
        inspect_weights(spec('large', bad))
    p = two_roles(tiny_models, large=bad, policy=SwapPolicy(PolicyConfig(substitute=False)))
    g = p.generate('large', HELLO)
    assert g.role == 'small' and g.decision == 'fallback' and 'corrupt' in g.fallback


def test_a_failing_stream_consumer_stops_the_generation_before_the_lock_is_free(
        tiny_models: Dict[str, Path]) -> None:
    p = ModelPool({'small': spec('small', tiny_models['small'], max_new_tokens=64)}, 'small')

    def explode(piece: str) -> None:
        raise RuntimeError('the consumer went away')
    with pytest.raises(RuntimeError, match='went away'):
        p.generate('small', HELLO, on_text=explode)
    ref = weakref.ref(p.loaded()[0].model)
    assert p.unload('small')    # raises if a generation still held the model
    assert ref() is None
    p.load('small')
    assert p.generate('small', HELLO, max_new_tokens=2).completion_tokens == 2


def test_a_cancel_after_eviction_still_leaves_a_model_resident(
        tiny_models: Dict[str, Path]) -> None:
    p = two_roles(tiny_models, policy=SwapPolicy(PolicyConfig(substitute=False)))
    p.load('small')
    evicted = {'done': False}

    def progress(step: LoadProgress) -> None:
        if step.stage == 'unloading':
            evicted['done'] = True
    # Cancel requested from the moment the small model is evicted: the large load completes.
    entry = p.load('large', progress=progress, should_stop=lambda: evicted['done'])
    assert evicted['done'], 'the eviction was not reported'
    assert entry.spec.role == 'large' and p.is_loaded('large') and not p.is_loaded('small')


def test_loads_wait_for_the_process_wide_load_lock(tiny_models: Dict[str, Path]) -> None:
    """`from_pretrained` changes torch's default dtype while it runs: a load in another thread
    (MiniLM, another pool) must never overlap it."""
    import threading

    from sage_ros.core.loading import PRETRAINED_LOAD_LOCK
    p = ModelPool({'small': spec('small', tiny_models['small'])}, 'small')
    loader = threading.Thread(target=p.load, args=('small',))
    with PRETRAINED_LOAD_LOCK:
        loader.start()
        loader.join(timeout=1.0)
        assert loader.is_alive() and not p.is_loaded('small'), 'loaded while the lock was held'
    loader.join(timeout=60.0)
    assert p.is_loaded('small')
