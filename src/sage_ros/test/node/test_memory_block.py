"""The memory block over real rclpy and a real SQLite store: STORE, RECALL with filters and
pinned memories first, FORGET, the journal indexed into episodes and pinned memories, status on
`memory/status`, and DREAM consolidation that the kernel's state starts and stops."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, List, Sequence, Tuple

import pytest
from rclpy.action import ActionClient
from sage_interfaces.action import Memory
from sage_interfaces.msg import KernelState, MemoryStatus

from node_harness import Harness, send_goal, wait_for
from sage_ros import graph, names
from sage_ros.core.memory.facts import pinned_request
from sage_ros.core.memory.store import DreamRecord, MemoryStore, TurnRecord
from sage_ros.core.params import tunable
from sage_ros.nodes.common import LATCHED
from sage_ros.nodes.memory_block import MemoryBlockNode

Goal = Memory.Goal


def started(make: Callable[..., Harness], db: Path, **overrides: object
            ) -> Tuple[Harness, MemoryBlockNode, ActionClient]:
    h = make((graph.MEMORY_BLOCK,), **{'memory_block:state_file': str(db),
                                       'memory_block:embedder': 'ngram',
                                       'memory_block:index_period_s': 0.1, **overrides})
    node = h.node(MemoryBlockNode)
    assert isinstance(node, MemoryBlockNode)
    client = ActionClient(h.probe, Memory, names.BLOCK_MEMORY)
    assert client.wait_for_server(timeout_sec=10.0)
    return h, node, client


def op(client: ActionClient, **fields: Any) -> Any:
    ok, result, _ = send_goal(client, Goal(**fields), timeout=30.0)
    assert ok
    return result


def store(client: ActionClient, text: str, **fields: Any) -> int:
    r = op(client, operation=Goal.OP_STORE, text=text, **fields)
    assert r.error_code == r.NONE, r.error_msg
    return int(r.items[0].id)


def recall(client: ActionClient, text: str, **fields: Any) -> List[Any]:
    r = op(client, operation=Goal.OP_RECALL, text=text, **fields)
    assert r.error_code == r.NONE, r.error_msg
    return list(r.items)


def turn(text: str, salience: float = 0.5, status: str = 'ok') -> TurnRecord:
    t = time.time()
    return TurnRecord(turn_id=1, observation_id=f'obs-{t}', source='console', text=text,
                      answer='ok', status=status, error='', salience=salience, role='small',
                      model='tiny', received=t, answered=t)


def test_remember_requests_are_recognised() -> None:
    assert pinned_request('Remember that the spare battery is in locker 12.') == \
        'the spare battery is in locker 12'
    assert pinned_request('remember: Bob takes his pills at 8') == 'Bob takes his pills at 8'
    assert pinned_request('please remember my name is Ada') == 'my name is Ada'
    for not_a_request in ('do you remember me?', 'remember when we met', 'what do you remember',
                          'I remember the old lab', 'remember'):
        assert pinned_request(not_a_request) is None, not_a_request


def test_store_recall_with_filters_pinned_first_and_forget(
        harness: Callable[..., Harness], tmp_path: Path) -> None:
    h, node, client = started(harness, tmp_path / 'sage.db')
    statuses = h.collect(MemoryStatus, names.MEMORY_STATUS, LATCHED)
    cup = store(client, 'the red cup is on the kitchen table', source='console', person='ada')
    store(client, 'the red cup belongs to bob', source='camera', person='bob')
    store(client, 'turn left at the kitchen door', source='console')
    locker = store(client, 'the spare battery is in locker 12', pinned=True)

    hits = recall(client, 'where is the red cup?')
    assert hits[0].id == locker and hits[0].pinned and hits[0].kind == 'pinned'  # pinned first
    others = [i for i in hits[1:]]
    assert {i.id for i in others[:2]} >= {cup}
    assert all(0.0 <= i.score <= 1.0 for i in hits)
    assert others == sorted(others, key=lambda i: -i.score)           # best first
    # Filters: source, person, kind, time.
    assert [i.text for i in recall(client, 'red cup', source='camera')] == \
        ['the red cup belongs to bob']
    assert [i.id for i in recall(client, 'red cup', person='ada')] == [cup]
    assert [i.id for i in recall(client, 'red cup', kind='pinned')] == [locker]
    assert recall(client, 'red cup', kind='fact', since=time.time() + 60) == []
    assert [i.id for i in recall(client, 'red cup on the kitchen table', kind='fact',
                                       max_results=1)] == [cup]

    # FORGET by id, by text, and a miss.
    forgot = op(client, operation=Goal.OP_FORGET, memory_id=cup)
    assert forgot.error_code == forgot.NONE and forgot.items[0].id == cup
    assert cup not in {i.id for i in recall(client, 'where is the red cup?')}
    gone = op(client, operation=Goal.OP_FORGET, memory_id=cup)
    assert gone.error_code == gone.NOT_FOUND
    by_text = op(client, operation=Goal.OP_FORGET, text='turn left at the kitchen door')
    assert by_text.error_code == by_text.NONE and len(by_text.items) == 1
    miss = op(client, operation=Goal.OP_FORGET, text='zebra quantum xylophone')
    assert miss.error_code == miss.NOT_FOUND

    # Bad input is one clear refusal, not a dead node.
    for bad, why in ((dict(operation=Goal.OP_STORE, text='  '), 'empty'),
                     (dict(operation=Goal.OP_STORE, text='x', kind='gossip'), 'unknown kind'),
                     (dict(operation=9, text='x'), 'unknown operation'),
                     (dict(operation=Goal.OP_RECALL, text='x' * 5000), 'max_text_chars')):
        r = op(client, **bad)
        assert r.error_code == r.INVALID_INPUT and why in r.error_msg
    wait_for(lambda: statuses and statuses[-1].memories == 2 and statuses[-1].pinned == 1,
             10, 'status counts')
    assert statuses[-1].session == 1 and statuses[-1].phase == 'newborn'


def test_the_journal_becomes_episodes_and_pinned_memories(
        harness: Callable[..., Harness], tmp_path: Path) -> None:
    db = tmp_path / 'sage.db'
    kernel_side = MemoryStore(db)                 # the kernel's connection: journal only
    s = kernel_side.open_session(time.time())
    h, node, client = started(harness, db, **{'memory_block:min_salience': 0.2})
    statuses = h.collect(MemoryStatus, names.MEMORY_STATUS, LATCHED)
    kernel_side.record_turn(s.id, turn('my sister Anna lives in Lyon', salience=0.6))
    kernel_side.record_turn(s.id, turn('remember that the spare battery is in locker 12'))
    kernel_side.record_turn(s.id, turn('hm', salience=0.05))            # below min_salience
    kernel_side.record_turn(s.id, turn('never answered', status='failed'))
    wait_for(lambda: kernel_side.unindexed_count() == 0, 10, 'journal indexed')
    episodes = kernel_side.list_memories(kind='episode')
    assert [m.text for m in episodes] == ['my sister Anna lives in Lyon']
    assert episodes[0].session == s.id and episodes[0].salience == pytest.approx(0.6)
    assert episodes[0].turn_id == kernel_side.turns(s.id)[0].id
    assert [m.text for m in kernel_side.pinned()] == ['the spare battery is in locker 12']
    hits = recall(client, 'where does Anna live?')
    assert hits[0].kind == 'pinned'                                       # pinned first
    assert hits[1].text == 'my sister Anna lives in Lyon' and hits[1].session == s.id
    r = op(client, operation=Goal.OP_RECALL, text='Anna')
    assert 'This is session 1' in r.preamble
    wait_for(lambda: statuses and statuses[-1].memories == 2 and
             statuses[-1].unindexed_turns == 0, 10, 'status after indexing')
    kernel_side.close()


def kernel_state(state: str, consolidation: bool) -> KernelState:
    return KernelState(metabolic_state=state, consolidation_allowed=consolidation, ready=True)


class SlowDream:
    """A stand-in for `core.memory.dream` with the same contract (DreamParams, consolidate):
    one item per step until `should_stop`, each recorded, so the node's part (when a dream
    starts, what stops it, what it reports) is tested apart from the consolidation itself."""

    @dataclass(frozen=True)
    class DreamParams:
        items: int = tunable(200, 'items per dream', 1, 10_000)

    def __init__(self) -> None:
        self.calls: List[Tuple[List[int], bool]] = []
        self.step = threading.Event()     # set: items go on; clear: the dream waits

    def consolidate(self, store: MemoryStore, sessions: Sequence[int], params: Any,
                    should_stop: Callable[[], bool], on_progress: Callable[[str, float], None],
                    bundle_dir: Path, now: float) -> DreamRecord:
        done = 0
        while done < params.items and not should_stop():
            self.step.wait(5.0)
            on_progress('merging', done / params.items)
            done += 1
            time.sleep(0.005)
        interrupted = done < params.items
        record = DreamRecord(session=sessions[-1], started=now, ended=time.time(),
                             interrupted=interrupted, stage='merging' if interrupted else 'done',
                             merged=done, facts=0, updated=0, pruned=0, bundle_path='',
                             summary='')
        store.record_dream(record)
        if not interrupted:
            for sid in sessions:
                session = store.session(sid)
                if session is not None and session.ended is not None:
                    store.mark_dreamed(sid)
        self.calls.append((list(sessions), interrupted))
        return record


def test_dream_starts_on_entering_dream_and_stops_when_the_kernel_wakes(
        harness: Callable[..., Harness], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sage_ros.nodes import memory_block
    fake = SlowDream()
    monkeypatch.setattr(memory_block, '_dream', lambda: fake)
    db = tmp_path / 'sage.db'
    kernel_side = MemoryStore(db)
    closed = kernel_side.open_session(time.time())
    kernel_side.record_turn(closed.id, turn('the charger is in room 4'))
    kernel_side.close_session(closed.id, 'signal', time.time())
    current = kernel_side.open_session(time.time())
    kernel_side.record_turn(current.id, turn('my name is Ada'))
    fake.step.set()
    # At start: the closed session not dreamed yet (the kernel's state not known yet).
    h, node, client = started(harness, db, **{'memory_block:dream.items': 20})
    statuses = h.collect(MemoryStatus, names.MEMORY_STATUS, LATCHED)
    wait_for(lambda: fake.calls == [([closed.id], False)], 20, 'the start-up dream')
    assert kernel_side.undreamed_sessions() == []
    wait_for(lambda: statuses and statuses[-1].dreams_total == 1 and not statuses[-1].dreaming,
             10, 'status after the start-up dream')
    assert 'complete' in statuses[-1].last_dream
    assert kernel_side.count('episode') == 2        # both sessions' turns indexed first
    # DREAM with consolidation: the current session; published states repeat, one dream.
    fake.step.clear()
    state_pub = h.probe.create_publisher(KernelState, names.STATE, LATCHED)
    state_pub.publish(kernel_state('DREAM', True))
    state_pub.publish(kernel_state('DREAM', True))
    wait_for(lambda: statuses[-1].dreaming, 10, 'dreaming on memory/status')
    fake.step.set()
    wait_for(lambda: len(fake.calls) == 2, 20, 'the DREAM dream')
    assert fake.calls[1] == ([current.id], False)
    time.sleep(0.3)
    assert len(fake.calls) == 2                  # not again while the kernel stays in DREAM
    # Leaving DREAM interrupts the next one between items.
    fake.step.clear()
    state_pub.publish(kernel_state('WAKE', False))
    wait_for(lambda: not node._dream_allowed(), 10, 'the node sees WAKE')   # a latched topic
    state_pub.publish(kernel_state('DREAM', True))                       # keeps the last one
    wait_for(lambda: statuses[-1].dreaming, 10, 'the second DREAM dream started')
    state_pub.publish(kernel_state('WAKE', False))
    fake.step.set()
    wait_for(lambda: len(fake.calls) == 3, 20, 'the interrupted dream ended')
    assert fake.calls[2] == ([current.id], True)
    wait_for(lambda: not statuses[-1].dreaming and statuses[-1].dreams_total == 3, 10,
             'status after the interruption')
    assert 'interrupted' in statuses[-1].last_dream
    assert kernel_side.integrity_check() == 'ok'
    kernel_side.close()


def test_a_real_dream_consolidates_the_session(
        harness: Callable[..., Harness], tmp_path: Path) -> None:
    pytest.importorskip('sage_ros.core.memory.dream')
    db = tmp_path / 'sage.db'
    kernel_side = MemoryStore(db)
    s = kernel_side.open_session(time.time())
    for text in ('my sister Anna lives in Lyon', 'the charger is in room 4',
                 'the charger is in room 4', 'I take my pills at 8 am'):
        kernel_side.record_turn(s.id, turn(text, salience=0.8))
    h, node, client = started(harness, db, **{'memory_block:dream.at_start': False})
    statuses = h.collect(MemoryStatus, names.MEMORY_STATUS, LATCHED)
    state_pub = h.probe.create_publisher(KernelState, names.STATE, LATCHED)
    wait_for(lambda: statuses and statuses[-1].unindexed_turns == 0, 20, 'journal indexed')
    state_pub.publish(kernel_state('DREAM', True))
    wait_for(lambda: statuses[-1].dreams_total == 1 and not statuses[-1].dreaming, 60,
             'one dream, finished')
    assert node.dreams_run == 1 and statuses[-1].last_dream
    assert kernel_side.integrity_check() == 'ok'
    kernel_side.close()


def test_every_parameter_is_in_base_yaml_and_a_bad_one_is_one_error(
        harness: Callable[..., Harness], tmp_path: Path) -> None:
    import rclpy
    from rclpy.context import Context
    from rclpy.parameter import Parameter
    from sage_ros.nodes.common import ConfigError
    h, node, _ = started(harness, tmp_path / 'sage.db')
    ours = {n for n in node._parameters
            if n not in ('use_sim_time', 'heartbeat_period_s', 'start_type_description_service')}
    section = graph.load_params([graph.config_dir() / graph.BASE_PARAMS])[
        '/**/memory_block']['ros__parameters']
    documented = {}

    def flatten(d: dict, prefix: str = '') -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                flatten(v, f'{prefix}{k}.')
            else:
                documented[prefix + k] = v
    flatten(section)
    assert set(documented) == ours
    for name, value in documented.items():
        assert type(value) is type(node.get_parameter(name).value), name
    context = Context()
    rclpy.init(context=context)
    try:
        for name, value, message in (
                ('awakening.phases', ['a:2', 'b:1'], 'awakening.phases: phase'),
                ('embedder', 'word2vec', 'embedder must be one of'),
                ('state_file', str(tmp_path / 'a-file' / 'x.db'), 'state_file')):
            (tmp_path / 'a-file').write_text('not a directory')
            with pytest.raises(ConfigError, match=message):
                MemoryBlockNode(context=context, parameter_overrides=[
                    Parameter('embedder', value='ngram'), Parameter(name, value=value)])
    finally:
        rclpy.try_shutdown(context=context)


# ---- embeddings through the model manager ---------------------------------------------------
def _recall_round_trips(client: ActionClient, queries: Sequence[str]) -> List[float]:
    """Seconds from sending each RECALL goal to having its result (no feedback settling)."""
    took = []
    for q in queries:
        done = threading.Event()
        t0 = time.monotonic()
        sent = client.send_goal_async(Goal(operation=Goal.OP_RECALL, text=q))
        sent.add_done_callback(lambda _: done.set())
        assert done.wait(30.0) and sent.result().accepted
        done.clear()
        result = sent.result().get_result_async()
        result.add_done_callback(lambda _: done.set())
        assert done.wait(30.0)
        took.append(time.monotonic() - t0)
        assert result.result().result.error_code == Memory.Result.NONE
    return took


def _embed_times(embed: Callable[[List[str]], Any], queries: Sequence[str]) -> List[float]:
    took = []
    for q in queries:
        t0 = time.monotonic()
        embed([q])
        took.append(time.monotonic() - t0)
    return took


def _summary(took: Sequence[float]) -> dict:
    import statistics
    ms = sorted(t * 1000.0 for t in took)
    return {'runs': len(ms), 'median_ms': round(statistics.median(ms), 2),
            'spread_ms': round(ms[-1] - ms[0], 2), 'min_ms': round(ms[0], 2),
            'max_ms': round(ms[-1], 2)}


@pytest.mark.slow
def test_recall_embeds_through_the_model_manager_with_the_same_vectors(
        harness: Callable[..., Harness], tmp_path: Path) -> None:
    import json

    import numpy as np
    from sage_interfaces.msg import ModelStatus
    from sage_ros.nodes.memory_block import RemoteEmbedder
    h = harness((graph.MODEL_MANAGER, graph.MEMORY_BLOCK),
                **{'memory_block:state_file': str(tmp_path / 'sage.db'),
                   'memory_block:embedder': 'model_manager',
                   'memory_block:index_period_s': 0.1,
                   'memory_block:embedder_timeout_s': 60.0})
    status = h.collect(ModelStatus, names.MODELS_STATUS, LATCHED)
    wait_for(lambda: status and status[-1].lifecycle_state == 'active' and status[-1].loaded,
             120, 'the model manager active')
    node = h.node(MemoryBlockNode)
    assert isinstance(node, MemoryBlockNode)
    remote = node.remote_embedder
    assert isinstance(remote, RemoteEmbedder) and node.embedder is remote
    wait_for(lambda: remote.remote_calls > 0 or remote.fallback_reason, 120, 'the warm-up')
    assert remote.fallback_reason == '' and remote.local_calls == 0, remote.fallback_reason
    texts = ['the red cup is on the kitchen table', 'Ada takes the bus at eight']
    through_manager = remote.remote(texts)        # raises if the model manager cannot embed
    in_process = remote.local(texts)
    assert through_manager.shape == in_process.shape == (2, 384)
    assert np.allclose(through_manager, in_process, atol=1e-5), 'not the same model'
    assert np.allclose(np.linalg.norm(through_manager, axis=1), 1.0, atol=1e-5)

    client = ActionClient(h.probe, Memory, names.BLOCK_MEMORY)
    assert client.wait_for_server(timeout_sec=10.0)
    cup = store(client, 'the red cup is on the kitchen table')
    store(client, 'the charger is under the desk in the lab')
    calls = remote.remote_calls
    assert recall(client, 'where is the cup?')[0].id == cup
    assert remote.remote_calls > calls and remote.fallback_reason == ''
    assert {m.role: m.kind for m in status[-1].loaded}.get('embedder') == 'embedding'

    # What a RECALL costs each way, measured in the same run (printed, not asserted).
    # Fresh queries for each measurement: the in-process embedder caches what it embedded.
    def queries(arm: str) -> List[str]:
        return [f'where did I leave the {arm} item number {i}?' for i in range(15)]
    _recall_round_trips(client, queries('warm')[:3])                   # warm both paths
    remote.local(queries('warm local')[:3])
    remote_s = _recall_round_trips(client, queries('remote recall'))
    embed_remote_s = _embed_times(remote.remote, queries('remote embed'))
    embed_local_s = _embed_times(remote.local, queries('local embed'))
    calls = remote.remote_calls
    remote.pause_remote(3600.0, 'measuring the in-process path')      # local from now on
    local_s = _recall_round_trips(client, queries('local recall'))
    assert remote.remote_calls == calls, 'fell back, yet asked the model manager'
    # A role the model manager does not have: in-process at once, with the reason.
    remote.role = 'nobody'
    remote.resume_remote()
    assert recall(client, 'where is the cup?')[0].id == cup
    assert "no role 'nobody'" in remote.fallback_reason and remote.remote_calls == calls
    print('\nRECALL round trip ' + json.dumps({
        'recall_model_manager': _summary(remote_s), 'recall_in_process': _summary(local_s),
        'embed_model_manager': _summary(embed_remote_s),
        'embed_in_process': _summary(embed_local_s)}))


@pytest.mark.slow
def test_without_a_model_manager_recall_falls_back_to_minilm_and_says_so_once(
        harness: Callable[..., Harness], tmp_path: Path, capfd: pytest.CaptureFixture[str]
        ) -> None:
    h, node, client = started(harness, tmp_path / 'sage.db',
                              **{'memory_block:embedder': 'model_manager',
                                 'memory_block:embedder_wait_s': 0.0})
    remote = node.remote_embedder
    assert remote is not None
    cup = store(client, 'the red cup is on the kitchen table')
    assert recall(client, 'where is the cup?')[0].id == cup
    recall(client, 'the kitchen table')
    assert 'model manager not reachable' in remote.fallback_reason
    assert remote.local_calls >= 3 and remote.remote_calls == 0
    logged: List[str] = []

    def said() -> bool:
        logged.append(capfd.readouterr().err)
        return 'instead of the model manager' in ''.join(logged)
    wait_for(said, 10, 'the fallback warning')
    assert ''.join(logged).count('instead of the model manager') == 1
