"""`sage memory search|list|forget` and `sage sessions` as a user runs them, reading a real
database (made here through MemoryStore, as the graph makes it) with the real MiniLM for search,
and one clear `sage: error:` line for each mistake. One search runs as its own process, as a
user's does, beside a store another process holds open; the rest call the same `main()` in
this process (seconds of interpreter start-up each saved)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from graph_support import SAGE
from sage_ros.core.embeddings import shared_embedder
from sage_ros.cli.main import main
from sage_ros.core.memory.store import MemoryStore, TurnRecord

pytestmark = [pytest.mark.graph, pytest.mark.slow]

FACTS = ['the spare battery is in locker 12', 'my sister Anna lives in Lyon',
         'I take my pills at 8 am']


@pytest.fixture
def sage(capsys: pytest.CaptureFixture[str]) -> Any:
    """`sage ARGS...` through main(): (returncode, stdout, stderr) as a CompletedProcess."""
    def run(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exc:      # argparse: --help, usage errors
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        if ok:
            assert code == 0, err
        return subprocess.CompletedProcess(list(args), code, out, err)
    return run


def lines(proc: subprocess.CompletedProcess) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


@pytest.fixture(scope='module')
def robot_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two sessions: the first closed with a summary and a note, the second open (the graph
    running or killed), with pinned memories, a note and an episode."""
    db = tmp_path_factory.mktemp('robot') / 'sage.db'
    store = MemoryStore(db, embedder=shared_embedder().embed)
    first = store.open_session(time.time() - 600)
    store.record_turn(first.id, TurnRecord(1, 'console/1', 'console', FACTS[0], 'noted', 'ok',
                                           '', 0.6, 'small', 'tiny', time.time() - 590,
                                           time.time() - 589))
    for text in FACTS:
        store.add_memory('pinned', text, source='console', session=first.id)
    store.close_session(first.id, 'user quit', time.time() - 300, summary='We talked.',
                        note='ask about Lyon')
    store.add_memory('note', 'ask about Lyon', source='kernel', session=first.id)
    second = store.open_session(time.time())
    store.add_memory('episode', 'hello robot', source='console', session=second.id)
    store.close()
    return db


def test_search_finds_the_fact_in_other_words_with_the_fields_asked_for(
        robot_db: Path, sage: Any) -> None:
    held = MemoryStore(robot_db)          # as a running graph holds it
    proc = subprocess.run([*SAGE, 'memory', 'search', 'where', 'is', 'the', 'extra', 'battery?',
                           '--k', '2', '--json', '--state-file', str(robot_db)],
                          capture_output=True, text=True, timeout=120)
    held.close()
    assert proc.returncode == 0, proc.stderr
    hits = lines(proc)
    # Only hits at least min_similarity alike come back: the battery fact, first.
    assert 1 <= len(hits) <= 2 and hits[0]['text'] == FACTS[0]
    assert {'text', 'score', 'session', 'kind', 'id', 'source', 'created'} <= set(hits[0])
    assert hits[0]['kind'] == 'pinned' and hits[0]['session'] == 1
    assert all(a['score'] >= b['score'] for a, b in zip(hits, hits[1:]))
    text = sage('memory', 'search', 'battery', '--state-file', str(robot_db)).stdout
    assert FACTS[0] in text.splitlines()[0]


def test_list_forget_and_sessions(robot_db: Path, tmp_path: Path, sage: Any) -> None:
    db = tmp_path / 'copy.db'
    db.write_bytes(robot_db.read_bytes())
    pinned = lines(sage('memory', 'list', '--kind', 'pinned', '--json', '--state-file', str(db)))
    assert sorted(m['text'] for m in pinned) == sorted(FACTS)
    target = next(m for m in pinned if m['text'] == FACTS[1])
    out = sage('memory', 'forget', str(target['id']), '--state-file', str(db)).stdout
    assert out.strip() == f'forgot memory {target["id"]} (pinned): {FACTS[1]}'
    left = lines(sage('memory', 'list', '--json', '--state-file', str(db)))
    assert FACTS[1] not in [m['text'] for m in left] and len(left) == 4
    again = sage('memory', 'forget', str(target['id']), '--state-file', str(db), ok=False)
    assert again.returncode == 2
    assert again.stderr.strip() == (f'sage: error: no memory {target["id"]} (already forgotten, '
                                    'or never stored)')
    sessions = lines(sage('sessions', '--json', '--state-file', str(db)))
    assert [s['number'] for s in sessions] == [2, 1]
    assert sessions[1]['summary'] == 'We talked.' and sessions[1]['note'] == 'ask about Lyon'
    assert sessions[0]['ended'] is None
    text = sage('sessions', '--state-file', str(db)).stdout
    assert 'session 1' in text and 'summary: We talked.' in text
    assert 'remember next time: ask about Lyon' in text


@pytest.mark.parametrize('args, message', [
    (['memory', 'list'], 'no robot database at '),
    (['sessions'], 'no robot database at '),
    (['memory', 'forget', 'x7'], "not a memory id: 'x7'"),
    (['memory', 'search', '--state-file', '{junk}', 'hi'], 'cannot be used'),
    (['memory', 'list', '--state-file', '{dir}'], 'is a directory'),
])
def test_a_mistake_is_one_error_line(args: List[str], message: str, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch, robot_db: Path,
                                     sage: Any) -> None:
    junk = tmp_path / 'junk.db'
    junk.write_text('not a database\n' * 200)
    monkeypatch.setenv('SAGE_STATE_DIR', str(tmp_path / 'empty'))
    if 'forget' in args:
        args = [*args, '--state-file', str(robot_db)]
    args = [a.format(junk=junk, dir=tmp_path) for a in args]
    proc = sage(*args, ok=False)
    assert proc.returncode == 2 and proc.stdout == ''
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith('sage: error: ') and message in proc.stderr


def test_help_says_what_each_command_does(sage: Any) -> None:
    assert '--state-file' in sage('memory', 'search', '--help').stdout
    assert 'summary' in sage('sessions', '--help').stdout
    assert 'search' in sage('--help').stdout and 'sessions' in sage('--help').stdout
