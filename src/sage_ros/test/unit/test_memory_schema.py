"""The one state file's schema: migrations from the previous version, racing opens, a refused
future version, the import of the previous per-node files, and kill -9 of a writer (real sqlite,
real processes)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

from sage_ros.core.memory.schema import SCHEMA_VERSION, StoreError, current_version
from sage_ros.core.memory.store import MemoryStore
from sage_ros.core.store import DEFAULT_DB, StateStore, resolve_state_file, state_dir

# What core/store.py created before schema versions existed (user_version stayed 0).
PREVIOUS_SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS log (id INTEGER PRIMARY KEY AUTOINCREMENT, stream TEXT NOT NULL,
                                value TEXT NOT NULL, t REAL NOT NULL);
CREATE INDEX IF NOT EXISTS log_stream ON log (stream, id);
"""


def previous_version_file(path: Path, prefix: str = 'trust') -> None:
    db = sqlite3.connect(str(path))
    db.execute('PRAGMA journal_mode=WAL')
    db.executescript(PREVIOUS_SCHEMA)
    db.execute("INSERT INTO kv VALUES (?, '{\"trust\": 0.8}', 1.0)", (f'{prefix}/language',))
    for i in range(3):
        db.execute("INSERT INTO log (stream, value, t) VALUES (?, ?, 2.0)",
                   (f'{prefix}/swaps', str(i)))
    db.commit()
    db.close()


def version_of(path: Path) -> int:
    db = sqlite3.connect(str(path))
    try:
        return current_version(db)
    finally:
        db.close()


def test_the_previous_version_migrates_keeping_its_rows(tmp_path: Path) -> None:
    path = tmp_path / 'kernel.db'
    previous_version_file(path)
    assert version_of(path) == 1
    store = MemoryStore(path)
    assert any('from schema version 1 to' in m for m in store.migration_messages)
    assert store.schema_version == SCHEMA_VERSION == version_of(path)
    store.close()
    state = StateStore(path)
    assert state.migration_messages == []                  # already current
    assert state.get('trust/language') == {'trust': 0.8}
    assert state.recent('trust/swaps') == [2, 1, 0]


def test_a_state_store_alone_brings_the_file_to_current(tmp_path: Path) -> None:
    path = tmp_path / 'x.db'
    previous_version_file(path)
    state = StateStore(path)
    assert version_of(path) == SCHEMA_VERSION
    state.close()
    with MemoryStore(path) as store:
        assert store.migration_messages == []
        assert store.open_session(1.0).number == 1


def test_a_future_version_is_refused_with_one_clear_line(tmp_path: Path) -> None:
    path = tmp_path / 'sage.db'
    MemoryStore(path).close()
    db = sqlite3.connect(str(path))
    db.execute(f'PRAGMA user_version = {SCHEMA_VERSION + 1}')
    db.commit()
    db.close()
    for opener in (MemoryStore, StateStore):
        with pytest.raises(StoreError, match='newer than this code') as err:
            opener(path)
        assert '\n' not in str(err.value)


def test_unusable_files_are_one_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / 'junk.db'
    junk.write_bytes(b'this is not a database' * 100)
    with pytest.raises(StoreError, match='cannot be used'):
        MemoryStore(junk)
    with pytest.raises(StoreError, match='does not exist'):
        MemoryStore(tmp_path / 'missing.db', read_only=True)
    old = tmp_path / 'old.db'
    previous_version_file(old)
    with pytest.raises(StoreError, match='read-write once'):
        MemoryStore(old, read_only=True)               # a read-only open never migrates


def test_racing_opens_of_a_new_file_migrate_it_once(tmp_path: Path) -> None:
    path = tmp_path / 'sage.db'
    go = tmp_path / 'go'
    code = ('import sys, time, pathlib\n'
            'from sage_ros.core.memory.store import MemoryStore\n'
            'from sage_ros.core.store import StateStore\n'
            f'go = pathlib.Path({str(go)!r})\n'
            'while not go.exists(): time.sleep(0.001)\n'
            f'cls = MemoryStore if sys.argv[1] == "m" else StateStore\n'
            f's = cls({str(path)!r})\n'
            'if sys.argv[1] == "m": s.open_session(float(sys.argv[2]))\n'
            'else: s.put("k" + sys.argv[2], 1)\n'
            'print("done")\n')
    procs = [subprocess.Popen([sys.executable, '-c', code, kind, str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, kind in enumerate('mmss')]
    time.sleep(0.5)                                    # all four are waiting on the flag
    go.touch()
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out.strip() == 'done'
    assert version_of(path) == SCHEMA_VERSION
    with MemoryStore(path) as store:
        assert len(store.sessions()) == 2
        assert store.integrity_check() == 'ok'
    state = StateStore(path)
    assert state.items('k') == {'2': 1, '3': 1}


def test_a_new_sage_db_imports_the_previous_per_node_files_once(tmp_path: Path) -> None:
    previous_version_file(tmp_path / 'kernel.db', 'trust')
    previous_version_file(tmp_path / 'model_manager.db', 'model_manager')
    state = StateStore(tmp_path / DEFAULT_DB)
    assert len(state.migration_messages) == 2
    assert all('imported 1 values and 3 log entries' in m for m in state.migration_messages)
    assert state.get('trust/language') == {'trust': 0.8}
    assert state.get('model_manager/language') == {'trust': 0.8}
    assert state.recent('model_manager/swaps') == [2, 1, 0]
    state.close()
    again = StateStore(tmp_path / DEFAULT_DB)            # once: not imported a second time
    assert again.migration_messages == []
    assert len(again.recent('trust/swaps', 100)) == 3
    assert again.get('store/imported') is not None


def test_another_file_name_imports_nothing(tmp_path: Path) -> None:
    previous_version_file(tmp_path / 'kernel.db')
    state = StateStore(tmp_path / 'robot.db')
    assert state.migration_messages == [] and state.get('trust/language') is None


def test_the_default_state_file_is_sage_db(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv('SAGE_STATE_DIR', str(tmp_path))
    assert resolve_state_file('') == tmp_path / 'sage.db' == state_dir() / DEFAULT_DB
    assert resolve_state_file('', 'kernel.db') == tmp_path / 'kernel.db'
    assert resolve_state_file('none') is None


WRITER = '''
import sys, time
from sage_ros.core.memory.store import MemoryStore, TurnRecord
from sage_ros.core.salience import ngram_embedder
store = MemoryStore(sys.argv[1], ngram_embedder(64))
session = store.open_session(time.time())
i = 0
while True:
    i += 1
    turn = store.record_turn(session.id, TurnRecord(i, f'obs-{i}', 'console', f'turn {i}',
                             f'answer {i}', 'ok', '', 0.5, 'small', 'm', time.time(), time.time()))
    print(turn.id, flush=True)
    if i % 5 == 0:
        store.add_memory('episode', f'turn {i}', session=session.id, turn_id=turn.id)
'''


def test_kill_9_of_a_writer_keeps_every_returned_turn_and_the_file_sound(tmp_path: Path) -> None:
    path = tmp_path / 'sage.db'
    proc = subprocess.Popen([sys.executable, '-c', WRITER, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    returned: List[int] = []
    try:
        while len(returned) < 150:
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else 'writer died'
            returned.append(int(line))
    finally:
        proc.kill()                                    # SIGKILL by pid, mid-writes
        proc.wait(timeout=30)
    assert proc.returncode == -9
    with MemoryStore(path) as store:
        assert store.integrity_check() == 'ok'
        stored = {t.id for t in store.turns(limit=100_000)}
        assert set(returned) <= stored
        recovered = store.recover(time.time())
        assert [s.turns for s in recovered] == [len(stored)]
        assert store.count('episode') >= len(returned) // 5 - 1
