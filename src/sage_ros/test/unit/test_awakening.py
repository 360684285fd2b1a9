"""Coherent awakening from a real store: session number, phase by sessions and milestones,
continuity threads from earlier sessions' notes, and a bounded boot preamble."""

from __future__ import annotations

from pathlib import Path

import pytest

from sage_ros.core.memory.awakening import (DEFAULT_PHASES, Phase, awaken, boot_preamble,
                                            parse_phases, phase_for)
from sage_ros.core.memory.store import DreamRecord, MemoryStore
from sage_ros.core.salience import ngram_embedder


def store_at(tmp_path: Path) -> MemoryStore:
    return MemoryStore(tmp_path / 'sage.db', embedder=ngram_embedder())


def run_session(store: MemoryStore, t: float, note: str = '', summary: str = '') -> int:
    s = store.open_session(t)
    if note:
        store.add_memory('note', note, session=s.id, now=t + 1)
    store.close_session(s.id, 'test', t + 2, summary=summary, note=note)
    return s.number


def test_a_new_store_awakens_as_session_one_newborn(tmp_path: Path) -> None:
    with store_at(tmp_path) as store:
        a = awaken(store, name='Robo')
        assert (a.session, a.completed, a.phase) == (1, 0, 'newborn')
        assert a.threads == () and a.pinned == () and a.last_summary == ''
        assert a.preamble.startswith('You are Robo. This is session 1, your first')
        assert 'newborn' in a.preamble and '\n' not in a.preamble
        store.open_session(10.0)           # the kernel opened it: the same number
        assert awaken(store).session == 1


def test_sessions_notes_and_pinned_memories_carry_forward(tmp_path: Path) -> None:
    with store_at(tmp_path) as store:
        run_session(store, 100.0, note='ask Alice how her exam went', summary='Met Alice.')
        run_session(store, 200.0, note='the lab moves to room 7 on Monday',
                    summary='Talked about the lab move.')
        store.add_memory('pinned', 'the charger is behind the blue door', pinned=True)
        current = store.open_session(300.0)
        store.add_memory('note', 'written in this session', session=current.id)
        a = awaken(store)
        assert (a.session, a.completed, a.phase) == (3, 2, 'infant')
        assert [t.text for t in a.threads] == ['the lab moves to room 7 on Monday',
                                               'ask Alice how her exam went']   # newest first
        assert [t.session for t in a.threads] == [2, 1]
        assert a.pinned == ('the charger is behind the blue door',)
        assert (a.last_session, a.last_summary) == (2, 'Talked about the lab move.')
        lines = a.preamble.splitlines()
        assert lines[0].startswith('You are SAGE. This is session 3, after 2 completed')
        assert lines[1] == 'Last time (session 2): Talked about the lab move.'
        assert lines[2] == 'In session 2 you wanted to remember: the lab moves to room 7 on Monday'
        assert 'In session 1 you wanted to remember: ask Alice' in a.preamble
        assert 'You were asked to remember: the charger is behind the blue door' in a.preamble
        assert 'written in this session' not in a.preamble
        # A forgotten note is no longer a thread.
        note = store.list_memories(kind='note', session=2)[0]
        store.forget(note.id)
        assert [t.session for t in awaken(store).threads] == [1]
        # Without pinned memories in the preamble (the recall gives them as memories).
        assert 'blue door' not in awaken(store, max_pinned=0).preamble


def test_the_preamble_is_bounded_by_whole_lines(tmp_path: Path) -> None:
    with store_at(tmp_path) as store:
        for i in range(6):
            run_session(store, 100.0 * (i + 1), note=f'thread number {i} ' + 'x' * 150)
        a = awaken(store, max_threads=5, max_chars=400)
        assert len(a.preamble) <= 400
        assert len(a.threads) == 5
        kept = a.preamble.splitlines()
        assert 2 <= len(kept) < 1 + 5 and kept[0].startswith('You are SAGE')
        assert all(line in boot_preamble(a, 10_000).splitlines() for line in kept)
        assert awaken(store, max_threads=0).threads == ()


def test_phases_climb_by_sessions_and_milestones(tmp_path: Path) -> None:
    phases = parse_phases(['egg:0', 'chick:1', 'bird:2:facts=2,dreams=1'])
    assert phases[2] == Phase('bird', 2, {'facts': 2, 'dreams': 1})
    assert [p.spec() for p in phases] == ['egg:0', 'chick:1', 'bird:2:facts=2,dreams=1']
    with store_at(tmp_path) as store:
        assert awaken(store, phases=phases).phase == 'egg'
        run_session(store, 100.0)
        run_session(store, 200.0)
        assert awaken(store, phases=phases).phase == 'chick'   # sessions enough, no facts yet
        store.add_memory('fact', 'Alice likes tea')
        store.add_memory('fact', 'Bob works nights')
        assert awaken(store, phases=phases).phase == 'chick'   # and no dream yet
        store.record_dream(DreamRecord(session=1, started=1.0, ended=2.0, interrupted=False,
                                       stage='done', merged=0, facts=2, updated=0, pruned=0,
                                       bundle_path='', summary=''))
        a = awaken(store, phases=phases)
        assert a.phase == 'bird' and a.counts['facts'] == 2 and a.counts['dreams'] == 1
    # Climbed in order: a later phase's lower bar does not skip an unmet one.
    ladder = parse_phases(['a:0', 'b:1:facts=5', 'c:1'])
    assert phase_for(ladder, 3, {'facts': 0}).name == 'a'
    assert phase_for(DEFAULT_PHASES, 0, {}).name == 'newborn'
    assert phase_for(DEFAULT_PHASES, 5, {'memories': 20}).name == 'child'


@pytest.mark.parametrize('specs, message', [
    ([], 'at least one phase'),
    (['baby'], 'expected name:min_sessions'),
    (['baby:x'], 'not a whole number'),
    (['baby:-1'], 'at least 0'),
    (['baby:0:friends=2'], 'must be one of'),
    (['baby:0:facts=many'], 'not a whole number'),
    (['a:3', 'b:1'], 'list phases in order'),
    (['a:0', 'a:1'], 'listed twice'),
])
def test_bad_phases_are_one_clear_error(specs: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_phases(specs)
