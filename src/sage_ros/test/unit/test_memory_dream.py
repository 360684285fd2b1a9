"""DREAM consolidation on a real MemoryStore (sqlite in tmp_path): paraphrases merged, changed
facts superseded, episodes pruned, the bundle, interruption (should_stop, max_items, a real
kill -9) and resuming without duplicates; with the real MiniLM, what a dream changes in recall."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import pytest

from sage_ros.core.memory.dream import DreamParams, consolidate, importance
from sage_ros.core.memory.store import DreamRecord, MemoryStore, TurnRecord
from sage_ros.core.params import param_docs
from sage_ros.core.salience import TextEmbedder, ngram_embedder

T0 = 1_700_000_000.0
FAST = DreamParams(duty_cycle=1.0)


def _store(path: Path, embedder: Optional[TextEmbedder] = None) -> MemoryStore:
    return MemoryStore(path, embedder=embedder or ngram_embedder())


def _session(store: MemoryStore, texts: Sequence[str], t: float, *, close: bool = True,
             salience: float = 0.5, episodes: bool = True) -> int:
    """A session as the kernel journals it and the memory block indexes it."""
    s = store.open_session(t)
    for i, text in enumerate(texts):
        turn = store.record_turn(s.id, TurnRecord(
            turn_id=i + 1, observation_id=f's{s.id}-{i}', source='console', text=text,
            answer=f'answer {i}', status='ok', error='', salience=salience, role='small',
            model='tiny', received=t + i, answered=t + i + 0.5))
        if episodes:
            store.add_memory('episode', text, source='console', session=s.id,
                             turn_id=turn.id, salience=salience, now=t + i)
            store.mark_indexed([turn.id])
    if close:
        store.close_session(s.id, 'test', t + len(texts) + 1)
    return s.id


def _dream(store: MemoryStore, sessions: Sequence[int], tmp: Path,
           params: DreamParams = FAST, stop: Callable[[], bool] = lambda: False,
           now: float = T0 + 10_000) -> DreamRecord:
    return consolidate(store, sessions, params, stop, lambda stage, f: None, tmp / 'dreams',
                       now)


def _live_facts(store: MemoryStore) -> List[str]:
    return sorted(m.text for kind in ('fact', 'pinned')
                  for m in store.list_memories(kind=kind, limit=10_000))


CHARGER = ['The charger is in room 4.', "You'll find the charger in room four.",
           'Room 4 is where the charger is kept.', 'What is the weather like?',
           'hello there']


def test_paraphrases_merge_into_one_fact_and_episodes_are_pruned(tmp_path: Path) -> None:
    store = _store(tmp_path / 'sage.db')
    s1 = _session(store, CHARGER, T0)
    record = _dream(store, [s1], tmp_path)
    assert not record.interrupted and record.stage == 'done'
    facts = store.list_memories(kind='fact')
    assert len(facts) == 1 and 'room 4' in facts[0].text and facts[0].mentions == 3
    assert facts[0].session == s1 and facts[0].source == 'console'
    assert 0.0 < facts[0].importance <= 1.0
    assert (record.facts, record.merged) == (1, 2)
    # The three episodes are held by the fact now; the others stay.
    episodes = sorted(m.text for m in store.list_memories(kind='episode'))
    assert episodes == ['What is the weather like?', 'hello there']
    assert record.pruned == 3
    assert len(store.turns(s1)) == 5                            # the journal keeps every turn
    assert store.undreamed_sessions() == []
    assert store.dreams()[0].session == s1 and store.dreams()[0].stage == 'done'


def test_a_changed_fact_supersedes_the_old_value(tmp_path: Path) -> None:
    store = _store(tmp_path / 'sage.db')
    _dream(store, [_session(store, CHARGER, T0)], tmp_path)
    s2 = _session(store, ['Actually, the charger is now in room 7.', 'thanks'], T0 + 3600)
    record = _dream(store, [s2], tmp_path)
    assert record.updated == 1
    hits = store.search('where is the charger', k=10, now=T0 + 7200)
    assert 'room 7' in hits[0].memory.text
    assert not any('room 4' in h.memory.text or 'four' in h.memory.text for h in hits)
    assert _live_facts(store) == ['The charger is now in room 7.']


def test_a_pin_absorbs_paraphrases_and_a_new_value_keeps_the_pin(tmp_path: Path) -> None:
    store = _store(tmp_path / 'sage.db')
    s1 = _session(store, ['I keep the spare keys under the blue mat.',
                          'remember that the spare keys are under the blue mat'], T0)
    turn = store.turns(s1)[1]
    store.add_memory('pinned', 'the spare keys are under the blue mat', source='console',
                     session=s1, turn_id=turn.id, now=T0 + 1)   # what the memory block does
    _dream(store, [s1], tmp_path)
    assert _live_facts(store) == ['the spare keys are under the blue mat']
    assert store.pinned()[0].mentions == 2
    s2 = _session(store, ['I moved the spare keys to the flower pot.'], T0 + 3600)
    _dream(store, [s2], tmp_path)
    pins = store.pinned()
    assert [p.text for p in pins] == ['I moved the spare keys to the flower pot.']
    assert _live_facts(store) == ['I moved the spare keys to the flower pot.']


def test_bundle_is_valid_jsonl_of_the_kept_exchanges(tmp_path: Path) -> None:
    store = _store(tmp_path / 'sage.db')
    s1 = _session(store, CHARGER, T0)
    low = store.open_session(T0 + 100)
    store.close_session(low.id, 'test', T0 + 101)
    record = _dream(store, [s1, low.id], tmp_path, DreamParams(duty_cycle=1.0,
                                                               min_salience=0.3))
    path = Path(record.bundle_path)
    assert path.parent == tmp_path / 'dreams' and path.name.startswith(f'session-{s1}-')
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == len(CHARGER)
    assert set(lines[0]) == {'prompt', 'answer', 'salience', 'session', 'turn_id'}
    assert lines[0]['prompt'] == CHARGER[0] and lines[0]['session'] == s1
    assert [p.name for p in (tmp_path / 'dreams').iterdir()] == [path.name]   # no tmp left
    assert store.undreamed_sessions() == []                      # the empty one is dreamed too


FACT_TURNS = [f'The box number {i} is in room {i + 10}.' for i in range(8)] + \
    [f'My friend {n} lives in {c}.' for n, c in (('Anna', 'Lyon'), ('Omar', 'Cairo'),
                                                  ('Lucy', 'Dublin'), ('Leo', 'Berlin'))]


def _dreamed_control(tmp_path: Path) -> List[str]:
    control = _store(tmp_path / 'control.db')
    _dream(control, [_session(control, FACT_TURNS, T0)], tmp_path / 'c')
    return _live_facts(control)


def test_an_interrupted_dream_is_consistent_and_resumes_without_duplicates(
        tmp_path: Path) -> None:
    expected = _dreamed_control(tmp_path)
    assert len(expected) == len(FACT_TURNS)
    store = _store(tmp_path / 'sage.db')
    s1 = _session(store, FACT_TURNS, T0)
    calls = [0]

    def stop_after_five() -> bool:
        calls[0] += 1
        return calls[0] > 5

    first = _dream(store, [s1], tmp_path, stop=stop_after_five)
    assert first.interrupted and first.stage == 'facts'
    assert 0 < first.facts < len(FACT_TURNS)
    assert store.integrity_check() == 'ok'
    assert [s.id for s in store.undreamed_sessions()] == [s1]
    assert not (tmp_path / 'dreams').exists() or not list((tmp_path / 'dreams').iterdir())
    second = _dream(store, [s1], tmp_path)
    assert not second.interrupted and second.stage == 'done'
    assert first.facts + second.facts == len(FACT_TURNS)
    assert _live_facts(store) == expected
    assert store.undreamed_sessions() == []
    assert [d.interrupted for d in store.dreams()] == [False, True]


def test_max_items_ends_a_pass_that_the_next_pass_continues(tmp_path: Path) -> None:
    store = _store(tmp_path / 'sage.db')
    s1 = _session(store, FACT_TURNS, T0, episodes=False)
    stages = []
    for _ in range(10):
        record = _dream(store, [s1], tmp_path, DreamParams(duty_cycle=1.0, max_items=5))
        stages.append(record.stage)
        if record.stage == 'done':
            break
    assert stages[0] == 'partial' and stages[-1] == 'done'
    assert not any(d.interrupted for d in store.dreams())
    assert _live_facts(store) == _dreamed_control(tmp_path)


def test_a_kill_9_in_the_middle_of_a_dream_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / 'sage.db'
    store = _store(path)
    s1 = _session(store, FACT_TURNS, T0)
    store.close()
    code = (
        'import os, signal\n'
        'from pathlib import Path\n'
        'from sage_ros.core.memory.dream import DreamParams, consolidate\n'
        'from sage_ros.core.memory.store import MemoryStore\n'
        'from sage_ros.core.salience import ngram_embedder\n'
        f'store = MemoryStore({str(path)!r}, embedder=ngram_embedder())\n'
        'n = [0]\n'
        'def sleep(s):\n'
        '    n[0] += 1\n'
        '    if n[0] == 6:\n'
        '        os.kill(os.getpid(), signal.SIGKILL)\n'
        f'consolidate(store, [{s1}], DreamParams(duty_cycle=0.99), lambda: False,\n'
        f'            lambda s, f: None, Path({str(tmp_path / "dreams")!r}), {T0 + 1e4},\n'
        '            sleep=sleep)\n')
    proc = subprocess.run([sys.executable, '-c', code], timeout=120)
    assert proc.returncode == -signal.SIGKILL
    store = _store(path)
    assert store.integrity_check() == 'ok'
    assert 0 < len(_live_facts(store)) < len(FACT_TURNS)
    assert [s.id for s in store.undreamed_sessions()] == [s1]
    _dream(store, [s1], tmp_path)
    assert _live_facts(store) == _dreamed_control(tmp_path)


def test_an_open_session_is_consolidated_but_not_marked_dreamed(tmp_path: Path) -> None:
    store = _store(tmp_path / 'sage.db')
    s1 = _session(store, FACT_TURNS[:3], T0, close=False)
    record = _dream(store, [s1], tmp_path)
    assert record.stage == 'done' and record.bundle_path == ''
    assert store.session(s1).dreamed is False                   # type: ignore[union-attr]
    store.close_session(s1, 'test', T0 + 50)
    again = _dream(store, [s1], tmp_path)
    assert again.facts == 0 and again.bundle_path
    assert len(_live_facts(store)) == 3 and store.undreamed_sessions() == []


def test_duty_cycle_sleeps_between_items(tmp_path: Path) -> None:
    store = _store(tmp_path / 'sage.db')
    s1 = _session(store, FACT_TURNS[:4], T0, episodes=False)
    slept: List[float] = []
    consolidate(store, [s1], DreamParams(duty_cycle=0.25), lambda: False,
                lambda s, f: None, tmp_path / 'd', T0, sleep=slept.append)
    assert len(slept) == 4 and all(s > 0 for s in slept)
    s2 = _session(store, FACT_TURNS[4:8], T0 + 100, episodes=False)
    slept.clear()
    consolidate(store, [s2], FAST, lambda: False, lambda s, f: None, tmp_path / 'd', T0,
                sleep=slept.append)
    assert slept == []


def test_params_are_documented_and_checked() -> None:
    docs = {d.name: d for d in param_docs(DreamParams)}
    assert {'min_salience', 'duty_cycle', 'max_items', 'merge_similarity'} <= set(docs)
    assert all(d.doc for d in docs.values())
    with pytest.raises(ValueError):
        DreamParams(duty_cycle=0.0)
    assert DreamParams().thresholds().merge_similarity == DreamParams().merge_similarity


def test_importance_grows_with_mentions_salience_and_pin(tmp_path: Path) -> None:
    store = _store(tmp_path / 'sage.db')
    a = store.add_memory('fact', 'a', salience=0.2, now=T0)
    b = store.add_memory('pinned', 'b', salience=0.9, now=T0)
    assert importance(a, T0, 86400.0) < importance(b, T0, 86400.0)
    assert importance(a, T0 + 30 * 86400.0, 86400.0) < importance(a, T0, 86400.0)


@pytest.mark.slow
def test_a_dream_changes_what_the_next_session_recalls(tmp_path: Path) -> None:
    """Real MiniLM: three paraphrases of the old value, then one new value. Without the dream
    the old value's episodes still come first; after it, only the new value is recalled."""
    from sage_ros.core.embeddings import shared_embedder
    embed = shared_embedder().embed
    store = _store(tmp_path / 'sage.db', embed)
    s1 = _session(store, ['My sister Anna lives in Lyon.', 'Anna, my sister, lives in Lyon.',
                          'My sister Anna has her home in Lyon.', 'Tell me a joke.'], T0)
    s2 = _session(store, ['Anna moved to Paris.', 'What can you do?'], T0 + 3600)
    query = 'Where does my sister live?'
    before = store.search(query, k=5, now=T0 + 7200)
    assert 'Lyon' in before[0].memory.text
    record = consolidate(store, [s1, s2], FAST, lambda: False, lambda s, f: None,
                         tmp_path / 'dreams', T0 + 7200)
    assert (record.facts, record.merged, record.updated) == (1, 2, 1)
    after = store.search(query, k=5, now=T0 + 7200)
    assert 'Paris' in after[0].memory.text
    assert not any('Lyon' in h.memory.text for h in after)
    assert store.count('fact') == 1


def test_a_low_salience_repeat_still_merges_but_adds_nothing_new(tmp_path: Path) -> None:
    """A repeat or an update is not novel, so its salience is low: below min_salience a turn
    is only linked to earlier facts (above link_min_salience)."""
    store = _store(tmp_path / 'sage.db')
    _dream(store, [_session(store, CHARGER, T0)], tmp_path)
    low = ['Room 4 is where the charger is kept.', 'The kettle is in the pantry.']
    s2 = _session(store, low, T0 + 3600, salience=0.1)
    record = _dream(store, [s2], tmp_path, DreamParams(duty_cycle=1.0, link_min_salience=0.15))
    assert (record.merged, record.facts) == (0, 0)               # below both floors: untouched
    s3 = _session(store, low, T0 + 7200, salience=0.1)
    record = _dream(store, [s3], tmp_path)
    assert (record.merged, record.facts, record.updated) == (1, 0, 0)
    facts = store.list_memories(kind='fact')
    assert len(facts) == 1 and facts[0].mentions == 4
    assert _dream(store, [s3], tmp_path).merged == 0             # no second merge on a rerun
