"""The model pool with the real offline models (`sage models prepare`): memory given back on
unload, and fallback from a truncated or over-budget large model to the real small one."""

from __future__ import annotations

import shutil
import weakref
from pathlib import Path
import pytest

from sage_ros.core.conversation import ChatTurn
from sage_ros.core.models import ModelPool, ModelSpec, process_rss, resolve_model_path

SMALL, LARGE = 'offline:smollm2-135m-instruct', 'offline:qwen2.5-coder-0.5b-instruct'
QUESTION = [ChatTurn('user', 'What is 12 times 7? Answer with the number.')]

pytestmark = pytest.mark.slow


@pytest.fixture(scope='module', autouse=True)
def prepared() -> None:
    for path in (SMALL, LARGE):
        if not (Path(resolve_model_path(path)) / 'model.safetensors').is_file():
            pytest.fail(f'{path} is not prepared: run `sage models prepare`')


@pytest.mark.parametrize('path,dtype', [(LARGE, 'bfloat16'), (SMALL, 'float32')],
                         ids=['qwen-bf16-mmapped', 'smollm-fp32-converted'])
def test_unload_returns_rss_to_within_5_percent_of_before_the_load(path: str, dtype: str) -> None:
    pool = ModelPool({'m': ModelSpec('m', 'm', path, dtype=dtype, max_new_tokens=4)}, 'm')
    # A first cycle leaves what any first use leaves for good (imports, CPU kernel caches for
    # these matrix shapes: ~20 MB measured with Qwen); the model itself must not stay.
    pool.generate('m', QUESTION)
    pool.unload('m')
    before = process_rss()
    for _ in range(2):
        entry = pool.load('m')
        ref = weakref.ref(entry.model)
        assert entry.memory_bytes >= entry.tensor_bytes > 200e6
        pool.generate('m', QUESTION)
        assert process_rss() - before > 0.2 * before, 'the model must weigh in the RSS'
        del entry
        pool.unload('m')
        assert ref() is None
        assert process_rss() <= 1.05 * before, f'{process_rss()} after, {before} before'


def test_a_truncated_or_over_budget_large_model_falls_back_to_the_small_one(
        tmp_path: Path) -> None:
    truncated = tmp_path / 'qwen-truncated'
    shutil.copytree(resolve_model_path(LARGE), truncated,
                    ignore=shutil.ignore_patterns('model.safetensors'))
    with open(Path(resolve_model_path(LARGE)) / 'model.safetensors', 'rb') as src:
        (truncated / 'model.safetensors').write_bytes(src.read(8 << 20))  # the first 8 MiB
    specs = {'small': ModelSpec('small', 'SmolLM2', SMALL, max_new_tokens=16, priority=0,
                                fallback=('large',)),
             'large': ModelSpec('large', 'Qwen-truncated', str(truncated), priority=1,
                                fallback=('small',))}
    pool = ModelPool(specs, 'small')
    g = pool.generate('large', QUESTION)
    assert (g.role, g.requested_role, g.model_id, g.decision) == ('small', 'large', 'SmolLM2',
                                                                  'fallback')
    assert 'truncated' in g.fallback and g.completion_tokens > 0 and g.text
    # the real Qwen model over a 0.6 GiB budget (its bf16 weights take 1.26 GB)
    pool.specs['large'] = ModelSpec('large', 'Qwen', LARGE, priority=1, fallback=('small',))
    pool.memory_budget_bytes = int(0.6 * (1 << 30))
    assert pool.estimate_need('large') > pool.memory_budget_bytes > pool.estimate_need('small')
    g = pool.generate('large', QUESTION)
    assert (g.role, g.requested_role) == ('small', 'large') and 'budget' in g.fallback
    assert [e.spec.role for e in pool.loaded()] == ['small'] and g.text
    pool.unload_all()
