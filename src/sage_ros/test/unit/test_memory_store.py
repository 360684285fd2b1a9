"""The memory store on real sqlite with the deterministic n-gram embedder: sessions, recovery,
the turn journal, memories, recall with filters and weights, supersede/merge/forget, other
processes' writes, and the vector indexes against an exact scan."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator, List

import numpy as np
import pytest

from sage_ros.core.memory.index import ExactIndex, HnswIndex, usearch_available
from sage_ros.core.memory.schema import StoreError
from sage_ros.core.memory.store import (RECOVERED_REASON, DreamRecord, MemoryStore,
                                        RecallWeights, TurnRecord)
from sage_ros.core.salience import ngram_embedder

DAY = 86400.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MemoryStore]:
    with MemoryStore(tmp_path / 'sage.db', ngram_embedder()) as s:
        yield s


def turn(i: int, text: str = '', status: str = 'ok', t: float = 100.0) -> TurnRecord:
    return TurnRecord(turn_id=i, observation_id=f'obs-{i}', source='console',
                      text=text or f'turn number {i}', answer=f'answer {i}', status=status,
                      error='', salience=0.4, role='small', model='tiny', received=t,
                      answered=t + 1.0)


def texts(hits: List) -> List[str]:
    return [h.memory.text for h in hits]


def test_a_session_opens_counts_its_turns_and_closes_once(store: MemoryStore) -> None:
    assert store.current_session() is None and store.recover(10.0) == []
    first = store.open_session(10.0)
    assert (first.number, first.ended, first.turns) == (1, None, 0)
    assert store.current_session() == first
    store.record_turn(first.id, turn(1, 'My name is Ada.'))
    closed = store.close_session(first.id, 'shutdown', 20.0)
    assert closed.ended == 20.0 and closed.turns == 1 and closed.end_reason == 'shutdown'
    assert 'Ada' in closed.summary                       # extractive when none is given
    assert store.close_session(first.id, 'again', 30.0) == closed   # idempotent
    second = store.open_session(40.0)
    store.close_session(second.id, 'session/end', 50.0, summary='We talked.', note='Ask Ada.')
    assert [s.number for s in store.sessions()] == [2, 1]
    assert store.sessions()[0].note == 'Ask Ada.' and store.completed_sessions() == 2
    assert [s.id for s in store.undreamed_sessions()] == [1, 2]
    store.mark_dreamed(1)
    assert [s.id for s in store.undreamed_sessions()] == [2]
    with pytest.raises(KeyError):
        store.close_session(99, 'x', 1.0)


def test_recover_closes_what_a_kill_left_open(tmp_path: Path) -> None:
    path = tmp_path / 'sage.db'
    killed = MemoryStore(path)
    session = killed.open_session(100.0)
    for i in range(3):
        killed.record_turn(session.id, turn(i, f'The blue box is in room {i}.', t=100.0 + i))
    killed.close()                                       # as if the process had died
    again = MemoryStore(path)
    [recovered] = again.recover(500.0)
    assert recovered.end_reason == RECOVERED_REASON and recovered.turns == 3
    assert recovered.ended == 103.0                      # its last journalled activity
    assert 'blue box' in recovered.summary
    assert again.recover(600.0) == [] and again.current_session() is None
    assert again.open_session(600.0).number == 2


def test_the_journal_keeps_turns_and_tracks_indexing(store: MemoryStore) -> None:
    session = store.open_session(1.0)
    rows = [store.record_turn(session.id, turn(i, status=s))
            for i, s in enumerate(['ok', 'rejected', 'ok', 'expired', 'ok'])]
    assert [t.turn_id for t in store.turns(session.id)] == [0, 1, 2, 3, 4]
    assert [t.turn_id for t in store.turns(session.id, limit=2)] == [3, 4]
    assert [t.id for t in store.unindexed_turns()] == [rows[0].id, rows[2].id, rows[4].id]
    store.mark_indexed([rows[0].id, rows[2].id])
    assert [t.id for t in store.unindexed_turns()] == [rows[4].id]
    assert store.unindexed_count() == 1 and store.turns()[0].indexed
    with pytest.raises(ValueError, match='unknown turn status'):
        store.record_turn(session.id, turn(9, status='maybe'))
    with pytest.raises(KeyError):
        store.record_turn(12345, turn(9))
    oid = store.record_observation(session.id, 'camera', 'text', 'a person waves', 0.9, 5.0,
                                   {'box': [1, 2]})
    assert store.observations(session.id) == [{'id': oid, 'source': 'camera', 'kind': 'text',
                                                'text': 'a person waves', 'salience': 0.9,
                                                't': 5.0, 'data': {'box': [1, 2]}}]


def test_threads_share_one_store(store: MemoryStore) -> None:
    session = store.open_session(1.0)

    def write(base: int) -> None:
        for i in range(25):
            store.record_turn(session.id, turn(base + i))
            store.add_memory('episode', f'thread {base} memory {i}')

    threads = [threading.Thread(target=write, args=(b,)) for b in (0, 100, 200, 300)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(store.turns(session.id)) == 100 and store.count('episode') == 100
    assert store.integrity_check() == 'ok'


def test_search_ranks_by_similarity_and_filters(store: MemoryStore) -> None:
    store.add_memory('fact', 'the red cup is on the kitchen table', source='console',
                     person='ada', now=10.0)
    store.add_memory('episode', 'the red cup is in the kitchen', source='camera', now=20.0)
    store.add_memory('pinned', 'the charger lives under the desk', now=30.0)
    store.add_memory('episode', 'completely unrelated zebra xylophone', now=40.0)
    hits = store.search('where is the red cup in the kitchen', k=5, now=50.0)
    assert texts(hits)[:2] == ['the red cup is in the kitchen',
                               'the red cup is on the kitchen table']
    assert 'completely unrelated zebra xylophone' not in texts(hits)   # under min_similarity
    assert all(0.0 <= h.score <= 1.0 and h.similarity >= 0.2 for h in hits)
    q = 'red cup kitchen'
    assert texts(store.search(q, kinds=['fact'])) == ['the red cup is on the kitchen table']
    assert texts(store.search(q, source='camera')) == ['the red cup is in the kitchen']
    assert texts(store.search(q, person='ada')) == ['the red cup is on the kitchen table']
    assert texts(store.search(q, since=15.0)) == ['the red cup is in the kitchen']
    assert texts(store.search(q, until=15.0)) == ['the red cup is on the kitchen table']
    assert store.search(q, kinds=[]) == [] and store.search(q, k=0) == []
    with pytest.raises(ValueError, match='unknown memory kind'):
        store.search(q, kinds=['dream'])
    assert [m.text for m in store.pinned()] == ['the charger lives under the desk']
    assert store.get(3) is not None and store.get(3).pinned  # type: ignore[union-attr]


def test_weights_move_importance_and_recency(store: MemoryStore) -> None:
    old = store.add_memory('fact', 'ada likes green tea', importance=1.0, now=0.0)
    new = store.add_memory('fact', 'ada likes green tea a lot', importance=0.0, now=30 * DAY)
    by_importance = RecallWeights(similarity=0.1, recency=0.0, salience=0.0, importance=0.9)
    assert store.search('ada likes green tea', k=2, weights=by_importance,
                        now=30 * DAY)[0].memory.id == old.id
    by_recency = RecallWeights(similarity=0.1, recency=0.9, salience=0.0, importance=0.0,
                               half_life_s=DAY)
    assert store.search('ada likes green tea', k=2, weights=by_recency,
                        now=30 * DAY)[0].memory.id == new.id


def test_superseded_merged_and_forgotten_memories_leave_search_and_list(
        store: MemoryStore) -> None:
    a = store.add_memory('fact', 'the robot dog is called rex', salience=0.2)
    b = store.add_memory('fact', 'the robot dog is named rex', salience=0.9)
    c = store.add_memory('fact', 'the robot dog has the name rex', importance=0.7)
    q = 'what is the robot dog called'
    assert len(store.search(q, k=5)) == 3
    merged = store.merge(a.id, [b.id, c.id])
    assert (merged.mentions, merged.salience, merged.importance) == (3, 0.9, 0.7)
    assert texts(store.search(q, k=5)) == ['the robot dog is called rex']
    assert [m.id for m in store.list_memories()] == [a.id]
    assert {m.id for m in store.list_memories(include_superseded=True)} == {a.id, b.id, c.id}
    assert store.get(b.id).superseded_by == a.id  # type: ignore[union-attr]
    assert store.count('fact') == 1
    d = store.add_memory('fact', 'the robot dog is called max')
    store.supersede(a.id, d.id)
    assert texts(store.search(q, k=5)) == ['the robot dog is called max']
    assert store.forget(d.id) and not store.forget(d.id)
    assert store.search(q, k=5) == [] and store.get(d.id) is None
    assert store.embedding(d.id) is None and store.count() == 0
    # forgetting cascades to what it superseded or absorbed: a, and b and c merged into a
    assert store.list_memories(include_superseded=True) == [] and not store.forget(a.id)
    assert [s.memory.id for s in store.similar(store._embed(['dog'])[0])] == []


def test_update_memory_re_embeds_changed_text(store: MemoryStore) -> None:
    m = store.add_memory('fact', 'ada lives in paris')
    assert texts(store.search('ada lives in paris')) == ['ada lives in paris']
    store.update_memory(m.id, text='ada moved to tokyo in japan', importance=0.5, now=99.0)
    hits = store.search('moved to tokyo japan')
    assert texts(hits) == ['ada moved to tokyo in japan'] and hits[0].memory.updated == 99.0
    assert store.search('ada lives in paris', weights=RecallWeights(min_similarity=0.6)) == []
    with pytest.raises(KeyError):
        store.update_memory(999, text='x')


def test_similar_is_pure_cosine(store: MemoryStore) -> None:
    ids = [store.add_memory('episode', t).id for t in
           ['open the garage door', 'open the garage door please', 'bake a cake']]
    store.add_memory('fact', 'open the garage door now')
    vec = store.embedding(ids[0])
    assert vec is not None
    hits = store.similar(vec, k=2, kinds=['episode'])
    assert [h.memory.id for h in hits] == ids[:2]
    assert hits[0].score == hits[0].similarity == pytest.approx(1.0, abs=1e-5)


def test_a_filter_finds_rare_kinds_beyond_the_oversampled_neighbours(tmp_path: Path) -> None:
    with MemoryStore(tmp_path / 'sage.db', ngram_embedder()) as store:
        with store.transaction():
            for i in range(400):
                store.add_memory('episode', f'the kitchen light is on, report {i}')
        store.add_memory('pinned', 'the garden light is off')
        hits = store.search('the kitchen light is on', k=3, kinds=['pinned'])
        assert texts(hits) == ['the garden light is off']


def test_a_failed_transaction_leaves_nothing(store: MemoryStore) -> None:
    store.add_memory('fact', 'alpha beta gamma')
    assert len(store.search('alpha beta gamma')) == 1     # the index is built
    with pytest.raises(RuntimeError):
        with store.transaction():
            store.add_memory('fact', 'alpha beta gamma delta')
            store.forget(1)
            raise RuntimeError('interrupted')
    assert texts(store.search('alpha beta gamma', k=5)) == ['alpha beta gamma']
    assert store.count() == 1


def test_read_only_and_embedder_less_stores(tmp_path: Path) -> None:
    path = tmp_path / 'sage.db'
    with MemoryStore(path, ngram_embedder()) as writer:
        writer.add_memory('fact', 'the door code is blue')
    with MemoryStore(path, ngram_embedder(), read_only=True) as reader:
        assert texts(reader.search('door code')) == ['the door code is blue']
        with pytest.raises(StoreError, match='read-only'):
            reader.add_memory('fact', 'x')
        with pytest.raises(StoreError, match='read-only'):
            reader.open_session(1.0)
    with MemoryStore(path) as plain:
        assert [m.text for m in plain.list_memories()] == ['the door code is blue']
        with pytest.raises(StoreError, match='no embedder'):
            plain.search('door')
        assert plain.add_memory('note', 'unembedded').kind == 'note'


def test_dreams_are_recorded(store: MemoryStore) -> None:
    record = DreamRecord(session=1, started=1.0, ended=2.0, interrupted=True, stage='merge',
                         merged=3, facts=2, updated=1, pruned=0, bundle_path='/x.jsonl',
                         summary='merged 3')
    store.record_dream(record)
    store.record_dream(DreamRecord(**{**record.__dict__, 'session': 2}))
    assert [d.session for d in store.dreams()] == [2, 1] and store.dreams()[1] == record
    assert store.dream_count() == 2


ADDER = '''
import sys
from sage_ros.core.memory.store import MemoryStore
from sage_ros.core.salience import ngram_embedder
store = MemoryStore(sys.argv[1], ngram_embedder())
store.add_memory('fact', sys.argv[2])
if len(sys.argv) > 3:
    store.forget(int(sys.argv[3]))
'''


def test_search_sees_what_another_process_wrote(store: MemoryStore) -> None:
    first = store.add_memory('fact', 'the spare battery is in the left drawer')
    assert len(store.search('spare battery drawer')) == 1   # index built, in step
    subprocess.run([sys.executable, '-c', ADDER, str(store.path),
                    'the spare battery is charging in the right drawer', str(first.id)],
                   check=True)
    assert texts(store.search('spare battery drawer', k=5)) == [
        'the spare battery is charging in the right drawer']


def test_exact_index_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(300, 32)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = ExactIndex(32, capacity=16)                    # grows
    index.add(list(range(300)), vecs)
    index.remove([5, 7, 299, 1000])
    index.add([8], vecs[0])                                # replaced in place
    assert len(index) == 297 and 5 not in index and 8 in index
    keep = [i for i in range(300) if i not in (5, 7, 299)]
    table = {i: vecs[0] if i == 8 else vecs[i] for i in keep}
    for q in rng.normal(size=(10, 32)):
        q = q / np.linalg.norm(q)
        ids, sims = index.search(q, 10)
        truth = sorted(keep, key=lambda i: -float(table[i] @ q))[:10]
        assert list(ids) == truth
        assert np.allclose(sims, [table[i] @ q for i in truth], atol=1e-5)
    ids, sims = index.similarities(vecs[1], [1, 2, 5])
    assert list(ids) == [1, 2] and sims[0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.skipif(not usearch_available(), reason='usearch is not installed')
def test_hnsw_index_finds_what_the_exact_one_does(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(2000, 64)).astype(np.float32)
    exact, hnsw = ExactIndex(64), HnswIndex(64)
    for index in (exact, hnsw):
        index.add(list(range(2000)), vecs)
        index.remove(list(range(0, 2000, 10)))
        index.add([11], vecs[0])
    assert len(hnsw) == len(exact) == 1800 and 10 not in hnsw
    found = 0
    for q in rng.normal(size=(20, 64)):
        found += len(set(exact.search(q, 10)[0]) & set(hnsw.search(q, 10)[0]))
    assert found / 200 >= 0.9
    ids, sims = hnsw.search(vecs[0], 1)
    assert int(ids[0]) in (11,) and sims[0] == pytest.approx(1.0, abs=1e-4)
    with MemoryStore(tmp_path / 'sage.db', ngram_embedder(), index='hnsw') as store:
        store.add_memory('fact', 'the window faces north')
        store.add_memory('fact', 'the door faces south')
        assert store.index_info()['index'] == 'usearch-hnsw'
        assert texts(store.search('which way does the window face', k=1)) == [
            'the window faces north']


def test_the_exact_index_grows_into_hnsw_past_the_threshold(tmp_path: Path) -> None:
    with MemoryStore(tmp_path / 'sage.db', ngram_embedder(), hnsw_threshold=50) as store:
        for i in range(30):
            store.add_memory('episode', f'note number {i} about the garden')
        assert store.index_info() == {'index': 'numpy-exact', 'vectors': 30}
        for i in range(30, 60):
            store.add_memory('episode', f'note number {i} about the garden')
        expected = 'usearch-hnsw' if usearch_available() else 'numpy-exact'
        assert store.index_info() == {'index': expected, 'vectors': 60}
        assert len(store.search('note number 42 about the garden', k=5)) == 5


def test_without_usearch_hnsw_falls_back_to_exact_and_says_so_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import sage_ros.core.memory.index as index_module
    import sage_ros.core.memory.store as store_module
    monkeypatch.setattr(index_module, 'usearch_available', lambda: False)
    monkeypatch.setattr(store_module, 'usearch_available', lambda: False)
    with MemoryStore(tmp_path / 'sage.db', ngram_embedder(), index='hnsw') as store:
        store.add_memory('fact', 'the lamp is blue')
        with caplog.at_level('WARNING', logger='sage_ros.memory'):
            assert texts(store.search('blue lamp')) == ['the lamp is blue']
            assert store.index_info()['index'] == 'numpy-exact'
        assert sum('usearch is not installed' in r.message for r in caplog.records) == 1
    with pytest.raises(ValueError, match='unknown index'):
        MemoryStore(tmp_path / 'sage.db', index='faiss')
