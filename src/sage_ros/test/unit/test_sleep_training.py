"""Sleep training on the tiny random models, real peft: the selection's anti-collapse filters
(repetition, minimum data, spacing), a training whose loss falls and whose adapter is saved
atomically and made current, an interrupted training that saves nothing, the model pool
merging the adapter at load (`adapter: latest`) or, when it is broken, serving the base model
with a warning, and the model manager node doing so from its parameter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
from rclpy.action import ActionClient
from sage_interfaces.action import Generate
from sage_interfaces.msg import ChatMessage, ModelStatus

from node_harness import Harness, send_goal, wait_for
from sage_ros import graph, names
from sage_ros.core.memory import sleep_training as st
from sage_ros.core.memory.sleep_training import (SleepTrainingParams, TrainReport,
                                                 run_sleep_training, select_examples)
from sage_ros.core.models import ModelPool, ModelSpec
from sage_ros.nodes.common import LATCHED
from sage_ros.nodes.model_manager import ModelManagerNode

EXCHANGES = [
    ('where is the red cup', 'the red cup is on the table next to the window'),
    ('hello robot', 'hello, how are you today?'),
    ('turn left please', 'turning left and then I stop'),
    ('what do you see', 'I see the kitchen in front of me'),
    ('tidy the kitchen table', 'a plan to tidy the kitchen table'),
    ('count for me', 'numbers 0 1 2 3 4 5'),
]


def write_bundle(path: Path, exchanges: List[Tuple[str, str]], salience: float = 0.5,
                 header: bool = True) -> Path:
    with open(path, 'w') as fh:
        if header:
            fh.write(json.dumps({'_type': 'dream_bundle_header', 'format_version': 1}) + '\n')
        for i, (prompt, answer) in enumerate(exchanges):
            fh.write(json.dumps({'prompt': prompt, 'answer': answer,
                                 'salience': salience + 0.05 * i, 'session': 1,
                                 'turn_id': i}) + '\n')
    return path


def params(**kw: Any) -> SleepTrainingParams:
    """Enabled, gates low enough for six exchanges, and a learning rate the tiny model shows."""
    base: Dict[str, Any] = dict(enabled=True, min_examples=4, min_new_examples=1,
                                min_interval_s=0.0, lr=3e-2, epochs=10, rank=8, alpha=16,
                                duty_cycle=1.0)
    base.update(kw)
    return SleepTrainingParams(**base)


# ---- selection -------------------------------------------------------------------------------
def test_selection_drops_repetitive_duplicate_empty_long_and_unreadable(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / 'a.jsonl', EXCHANGES + [
        ('say it', 'yes yes yes yes yes yes yes yes yes yes'),                 # own n-grams
        ('where is the cup', 'the red cup is on the table next to the window!'),  # duplicate
        ('', 'an answer to nothing'),                                            # empty
        ('long one', 'word ' * 400),                                             # too long
    ])
    with open(bundle, 'a') as fh:
        fh.write('{not json\n')
    sel = select_examples([bundle], params(max_answer_chars=500))
    assert sel.skipped == ''
    assert sel.dropped == {'repetitive': 1, 'duplicate': 1, 'empty': 1, 'too_long': 1,
                           'unreadable': 1}
    assert len(sel.examples) == len(EXCHANGES)
    # Of the two near-identical answers the more salient (later, +0.05 each) one is kept.
    kept = {e.answer for e in sel.examples}
    assert 'the red cup is on the table next to the window!' in kept
    assert 'the red cup is on the table next to the window' not in kept
    # Highest salience first; weights follow salience with a mean of 1.
    assert [e.salience for e in sel.examples] == sorted((e.salience for e in sel.examples),
                                                        reverse=True)
    weights = [e.weight for e in sel.examples]
    assert sum(weights) / len(weights) == pytest.approx(1.0)
    assert weights[0] > weights[-1]
    flat = select_examples([bundle], params(max_answer_chars=500, salience_weighting=False))
    assert {e.weight for e in flat.examples} == {1.0}


def test_selection_refuses_too_few_collapse_and_no_new_data(tmp_path: Path) -> None:
    bundle = write_bundle(tmp_path / 'a.jsonl', EXCHANGES)
    few = select_examples([bundle], params(min_examples=7))
    assert few.examples == [] and few.skipped.startswith('too few examples: 6 usable')
    collapsed = write_bundle(tmp_path / 'b.jsonl', EXCHANGES[:2] + [
        (f'question {i}', 'I am here to help you with that.') for i in range(5)])
    sel = select_examples([collapsed], params())
    assert sel.examples == [] and sel.skipped.startswith('collapse suspected: 4 of 7')
    old = select_examples([bundle], params(), new_bundles=[])
    assert old.examples == [] and old.skipped.startswith('too little new data')
    capped = select_examples([bundle], params(max_examples=5))
    assert len(capped.examples) == 5 and capped.dropped['over_max_examples'] == 1


def test_gates_disabled_and_spacing(tmp_path: Path, tiny_models: Dict[str, Path]) -> None:
    write_bundle(tmp_path / 'bundles.jsonl', EXCHANGES)
    model = str(tiny_models['small'])
    off = run_sleep_training(model, tmp_path, SleepTrainingParams(), state_dir=tmp_path / 's')
    assert not off.trained and off.skipped.startswith('disabled')
    root = st.adapters_root(model, tmp_path / 's')
    root.mkdir(parents=True)
    (root / st.CURRENT_FILE).write_text(json.dumps({'adapter': 'x', 'trained_at': 1000.0}))
    early = run_sleep_training(model, tmp_path, params(min_interval_s=3600.0),
                               state_dir=tmp_path / 's', now=1000.0 + 600.0)
    assert not early.trained and early.skipped.startswith('spacing: last training 600 s ago')
    nothing = run_sleep_training(model, tmp_path / 'no-bundles', params(),
                                 state_dir=tmp_path / 's2')
    assert not nothing.trained and nothing.skipped.startswith('too few examples: 0')


def test_model_name_is_the_same_for_every_spelling(tmp_path: Path) -> None:
    d = tmp_path / 'SmolLM2-135M-Instruct'
    d.mkdir()
    snap = tmp_path / 'hub' / 'models--Qwen--Qwen2.5-0.5B' / 'snapshots' / 'abc123'
    snap.mkdir(parents=True)
    assert st.model_name(str(d)) == st.model_name(str(d) + '/') == 'SmolLM2-135M-Instruct'
    assert st.model_name('offline:smollm2-135m-instruct') == 'smollm2-135m-instruct'
    assert st.model_name(str(snap)) == 'Qwen--Qwen2.5-0.5B'
    assert st.model_name('Qwen/Qwen2.5-0.5B') == 'Qwen--Qwen2.5-0.5B'


# ---- training --------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_models: Dict[str, Path]
            ) -> Tuple[TrainReport, Path]:
    """One training of the small tiny model on a six-exchange bundle (60 steps, ~3 s)."""
    root = tmp_path_factory.mktemp('sleep')
    write_bundle(root / 'session-1.jsonl', EXCHANGES)
    state = root / 'state'
    report = run_sleep_training(str(tiny_models['small']), root, params(), state_dir=state,
                                now=1_000_000.0)
    return report, state


def test_training_loss_falls_and_adapter_is_saved_and_current(
        trained: Tuple[TrainReport, Path], tiny_models: Dict[str, Path]) -> None:
    report, state = trained
    assert report.trained, report.skipped
    assert report.examples == len(EXCHANGES) and report.steps == 10 * len(EXCHANGES)
    assert len(report.losses) == report.steps
    # Fixed seed: the mean of the last ten steps is clearly below the first ten's.
    assert report.mean_loss(False, 10) < report.mean_loss(True, 10) - 0.1
    adapter = Path(report.adapter_dir)
    assert {'adapter_config.json', 'adapter_model.safetensors',
            st.REPORT_FILE} <= {p.name for p in adapter.iterdir()}
    root = st.adapters_root(str(tiny_models['small']), state)
    assert adapter.parent == root
    assert not list(root.glob('.tmp-*'))      # renamed into place, nothing left over
    current = st.read_current(str(tiny_models['small']), state)
    assert current is not None and current['adapter'] == adapter.name
    assert current['bundles'] == ['session-1.jsonl']
    assert 'loss' in report.describe()
    # The same bundle again: spacing first, and then nothing new to learn from.
    model = str(tiny_models['small'])
    again = run_sleep_training(model, state.parent,
                               params(min_interval_s=60.0), state_dir=state, now=1_000_030.0)
    assert again.skipped.startswith('spacing')
    later = run_sleep_training(model, state.parent, params(),
                               state_dir=state, now=1_000_030.0)
    assert later.skipped.startswith('too little new data')


def test_interrupted_training_saves_nothing(tmp_path: Path,
                                            tiny_models: Dict[str, Path]) -> None:
    write_bundle(tmp_path / 'b.jsonl', EXCHANGES)
    calls = {'n': 0}

    def stop() -> bool:
        calls['n'] += 1
        return calls['n'] > 3

    report = run_sleep_training(str(tiny_models['small']), tmp_path, params(),
                                should_stop=stop, state_dir=tmp_path / 's')
    assert report.interrupted and not report.trained and report.steps == 3
    root = st.adapters_root(str(tiny_models['small']), tmp_path / 's')
    assert list(root.iterdir()) == []          # no adapter, no pointer, no temporary dir
    assert 'interrupted' in report.describe()


# ---- loading ---------------------------------------------------------------------------------
def _logits(pool: ModelPool) -> Any:
    import torch
    entry = pool.load('small')
    ids = entry.tokenizer('the red cup is on the table', return_tensors='pt')['input_ids']
    with torch.no_grad():
        return entry.model(input_ids=ids).logits.float()


def _pool(path: Path, adapter: str) -> Tuple[ModelPool, List[Tuple[str, str]]]:
    pool = ModelPool({'small': ModelSpec('small', 'tiny-small', str(path), adapter=adapter)},
                     'small')
    notes: List[Tuple[str, str]] = []
    pool.note_listeners.append(lambda level, text: notes.append((level, text)))
    return pool, notes


def test_latest_adapter_is_merged_at_load_and_changes_the_outputs(
        trained: Tuple[TrainReport, Path], tiny_models: Dict[str, Path],
        isolated_state_dir: Path) -> None:
    import torch
    report, state = trained
    shutil.copytree(state / st.ADAPTERS_DIR, isolated_state_dir / st.ADAPTERS_DIR)
    base_pool, base_notes = _pool(tiny_models['small'], '')
    base = _logits(base_pool)
    assert base_notes == [] and base_pool.loaded()[0].adapter == ''
    pool, notes = _pool(tiny_models['small'], 'latest')
    adapted = _logits(pool)
    entry = pool.loaded()[0]
    assert Path(entry.adapter).name == Path(report.adapter_dir).name
    assert notes and notes[0][0] == 'info' and 'merged' in notes[0][1]
    assert not torch.allclose(base, adapted)
    # Merged, not wrapped: the served model has no LoRA layers left.
    assert not any('lora' in name for name, _ in entry.model.named_modules())
    assert pool.spec('small').key != base_pool.spec('small').key


def test_broken_or_missing_adapter_loads_the_base_model_with_a_warning(
        trained: Tuple[TrainReport, Path], tiny_models: Dict[str, Path],
        tmp_path: Path) -> None:
    import torch
    report, _ = trained
    base = _logits(_pool(tiny_models['small'], '')[0])
    corrupt = tmp_path / 'corrupt'
    shutil.copytree(report.adapter_dir, corrupt)
    weights = (corrupt / 'adapter_model.safetensors').read_bytes()
    (corrupt / 'adapter_model.safetensors').write_bytes(weights[:len(weights) // 2])
    # Intact files that do not fit the model: peft fails after it started changing the model,
    # and a fresh base model is loaded instead.
    misfit = tmp_path / 'misfit'
    shutil.copytree(report.adapter_dir, misfit)
    config = json.loads((misfit / 'adapter_config.json').read_text())
    config['target_modules'] = ['no_such_proj']
    (misfit / 'adapter_config.json').write_text(json.dumps(config))
    for setting, words in ((str(corrupt), 'adapter weights unreadable'),
                           (str(tmp_path / 'nowhere'), 'does not exist'),
                           (str(misfit), 'no_such_proj')):
        pool, notes = _pool(tiny_models['small'], setting)
        logits = _logits(pool)
        assert pool.loaded()[0].adapter == ''
        assert [level for level, _ in notes] == ['warning'] and words in notes[0][1]
        assert 'serving the base model' in notes[0][1]
        assert torch.equal(base, logits)
    # 'latest' before any training: the base model, said once as information.
    pool, notes = _pool(tiny_models['small'], 'latest')
    assert torch.equal(base, _logits(pool)) and [lv for lv, _ in notes] == ['info']


def test_model_manager_applies_the_latest_adapter_from_its_parameter(
        trained: Tuple[TrainReport, Path], harness: Callable[..., Harness],
        isolated_state_dir: Path) -> None:
    """`models.small.adapter: latest` in the model manager node: the awakening's first load
    merges the current sleep-trained adapter, and generate serves with it."""
    report, state = trained
    shutil.copytree(state / st.ADAPTERS_DIR, isolated_state_dir / st.ADAPTERS_DIR)
    h = harness((graph.MODEL_MANAGER,), **{'model_manager:models.small.adapter': 'latest'})
    mm = h.node(ModelManagerNode)
    assert isinstance(mm, ModelManagerNode)
    status = h.collect(ModelStatus, names.MODELS_STATUS, LATCHED)
    wait_for(lambda: status and status[-1].lifecycle_state == 'active' and status[-1].loaded,
             what='default role loaded')
    assert mm.pool is not None
    assert Path(mm.pool.loaded()[0].adapter).name == Path(report.adapter_dir).name
    ok, result, _ = send_goal(ActionClient(h.probe, Generate, names.MODEL_GENERATE),
                              Generate.Goal(role='small',
                                            messages=[ChatMessage(role='user', content='hi')]))
    assert ok and result.error_code == Generate.Result.NONE and result.role == 'small'
