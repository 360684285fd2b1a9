"""The durable state store (real sqlite, a real kill) and the offline MiniLM embedder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sage_ros.core.embeddings import SentenceEmbedder
from sage_ros.core.store import StateStore, resolve_state_file, state_dir


def test_values_and_logs_round_trip(tmp_path: Path) -> None:
    store = StateStore(tmp_path / 's.db')
    store.put('trust/language', {'trust': 0.7})
    store.put('trust/language', {'trust': 0.8})
    store.put('other', 1)
    assert store.get('trust/language') == {'trust': 0.8}
    assert store.items('trust/') == {'language': {'trust': 0.8}}
    assert store.get('missing', 'x') == 'x'
    for i in range(30):
        store.append('swaps', {'i': i}, keep=10)
    assert [e['i'] for e in store.recent('swaps', 3)] == [29, 28, 27]
    assert len(store.recent('swaps', 100)) == 10


def test_acknowledged_writes_survive_kill_9(tmp_path: Path) -> None:
    path = tmp_path / 's.db'
    code = ('import os, sys, signal\n'
            'from sage_ros.core.store import StateStore\n'
            f's = StateStore({str(path)!r})\n'
            "s.put('k', 42); s.append('log', 'a')\n"
            'os.kill(os.getpid(), signal.SIGKILL)\n')
    proc = subprocess.run([sys.executable, '-c', code])
    assert proc.returncode == -9
    store = StateStore(path)
    assert store.get('k') == 42 and store.recent('log') == ['a']


def test_state_file_parameter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('SAGE_STATE_DIR', str(tmp_path))
    assert state_dir() == tmp_path
    assert resolve_state_file('', 'kernel.db') == tmp_path / 'kernel.db'
    assert resolve_state_file('none', 'kernel.db') is None
    assert resolve_state_file('~/x.db', 'kernel.db') == Path('~/x.db').expanduser()


@pytest.mark.slow
def test_minilm_embeds_paraphrases_close_and_unrelated_far() -> None:
    emb = SentenceEmbedder()
    v = emb.embed(['Where is the kitchen?', 'Can you tell me where the kitchen is?',
                   'Design a patrol schedule for three robots', 'Where is the kitchen?'])
    assert v.shape == (4, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-4)
    assert float(v[0] @ v[1]) > 0.8
    assert float(v[0] @ v[2]) < 0.3
    assert np.array_equal(v[0], v[3])
    assert emb.embed([]).shape == (0, 384)
