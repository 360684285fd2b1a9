"""The kernel's sessions over real rclpy and a real SQLite file: every finished turn is in the
journal before its Response is published, `session/end` closes the session with the language
block's summary and note (extractive when no block answers) and opens the next, `kernel/sleep`
enters DREAM, a person's turn in DREAM is answered without ending the dream, and a shutdown
closes the session so the next start numbers the next one. The kill -9 recovery runs against
real processes in test/graph/test_memory_e2e.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
from sage_interfaces.action import Language
from sage_interfaces.msg import KernelState, MemoryItem, Response
from sage_interfaces.srv import EndSession, Sleep

from node_harness import Harness, call, wait_for
from sage_ros import graph, names
from sage_ros.core.memory.store import MemoryStore
from sage_ros.nodes.kernel import KernelNode
from test_kernel_node import ALL_STATES, FAST, FakeBlock, ready, tell

SUMMARY = 'We talked about batteries.\nRemember next time: the spare battery is in locker 12.'


class SummarisingBlock(FakeBlock):
    """A language block that answers turns with 'ok' and the ephemeral summary request with
    SUMMARY (or refuses it, `refuse_summary`)."""

    def __init__(self, h: Harness) -> None:
        super().__init__(h, Language, 'language', 'conversation')
        self.refuse_summary = False

    def _execute(self, gh: Any) -> Any:
        if not gh.request.ephemeral:
            return super()._execute(gh)
        self.requests.append(gh.request)
        if self.refuse_summary:
            gh.abort()
            return Language.Result(error_code=Language.Result.FAILED, error_msg='no model')
        gh.succeed()
        return Language.Result(text=SUMMARY, model='fake', role='small')


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / 'sage.db'


@pytest.fixture
def kernel_with_store(harness: Callable[..., Harness], db: Path) -> Callable[..., Harness]:
    def make(**overrides: Any) -> Harness:
        return harness((graph.KERNEL,), **{**FAST, 'kernel:state_file': str(db), **overrides})
    return make


def test_every_turn_is_journalled_before_its_response_is_published(
        kernel_with_store: Callable[..., Harness], db: Path) -> None:
    h = kernel_with_store()
    SummarisingBlock(h)
    states = h.collect(KernelState, names.STATE, ALL_STATES)
    reader = MemoryStore(db, read_only=True)
    # Looked up in the store the moment each Response arrives, on the probe's thread.
    seen: Dict[str, List[str]] = {}

    responses: List[Response] = []

    def on_response(msg: Response) -> None:
        seen[msg.observation_id] = [t.status for t in reader.turns()
                                    if t.observation_id == msg.observation_id]
        responses.append(msg)
    h.probe.create_subscription(Response, names.RESPONSE, on_response, 50)
    wait_for(ready(states), 10, 'ready')
    ok, bad = tell(h, 'console', 'where is the spare battery?', '\x00\x01')
    wait_for(lambda: len(responses) == 2, 10, 'two responses')
    assert seen == {ok: ['ok'], bad: ['rejected']}
    assert all(r.session == 1 for r in responses) and states[-1].session == 1
    (turn,) = [t for t in reader.turns() if t.observation_id == ok]
    assert (turn.text, turn.answer, turn.source, turn.model) == (
        'where is the spare battery?', 'ok', 'console', 'fake')
    assert turn.received <= turn.answered and turn.salience > 0
    reader.close()


def test_session_end_closes_with_summary_and_note_opens_the_next_and_dreams(
        kernel_with_store: Callable[..., Harness], db: Path) -> None:
    h = kernel_with_store()
    block = SummarisingBlock(h)
    states = h.collect(KernelState, names.STATE, ALL_STATES)
    responses = h.collect(Response, names.RESPONSE)
    wait_for(ready(states), 10, 'ready')
    tell(h, 'console', 'remember that the spare battery is in locker 12')
    wait_for(lambda: len(responses) == 1, 10, 'the answer')
    res = call(h, EndSession, names.SESSION_END, EndSession.Request(reason='user quit',
                                                                     dream=True))
    assert res.success and res.session == 1, res.message
    assert res.summary == 'We talked about batteries.'
    assert res.note == 'the spare battery is in locker 12.'
    assert 'summary and note by the model' in res.message and 'dreaming' in res.message
    (summary_goal,) = [g for g in block.requests if g.ephemeral]
    assert 'User: remember that the spare battery is in locker 12' in summary_goal.context
    wait_for(lambda: states[-1].session == 2 and states[-1].metabolic_state == 'DREAM', 10,
             'session 2, dreaming')
    assert 'session 1 ended' in states[-1].transition_reason
    assert states[-1].consolidation_allowed
    store = MemoryStore(db, read_only=True)
    first, = [s for s in store.sessions() if s.number == 1]
    assert (first.end_reason, first.summary, first.note) == (
        'user quit', 'We talked about batteries.', 'the spare battery is in locker 12.')
    (note,) = store.list_memories(kind=MemoryItem.KIND_NOTE)
    assert note.text == first.note and note.session == first.id
    current = store.current_session()
    assert current is not None and current.number == 2
    store.close()


def test_without_a_summary_the_session_closes_extractively_and_says_so(
        kernel_with_store: Callable[..., Harness], db: Path) -> None:
    h = kernel_with_store()
    block = SummarisingBlock(h)
    block.refuse_summary = True
    states = h.collect(KernelState, names.STATE, ALL_STATES)
    responses = h.collect(Response, names.RESPONSE)
    wait_for(ready(states), 10, 'ready')
    tell(h, 'console', 'remember that the charger is in room 4')
    wait_for(lambda: len(responses) == 1, 10, 'the answer')
    res = call(h, EndSession, names.SESSION_END, EndSession.Request(reason='', dream=False))
    assert res.success and 'extractive summary (no model)' in res.message, res.message
    assert 'charger is in room 4' in res.summary           # the store's extractive summary
    assert res.note == 'the charger is in room 4.'        # what the user asked to remember
    wait_for(lambda: states[-1].session == 2, 10, 'session 2')
    assert states[-1].metabolic_state != 'DREAM'


def test_sleep_enters_dream_and_a_person_is_still_answered_in_it(
        kernel_with_store: Callable[..., Harness]) -> None:
    # Waking takes more salience than a hello here, so the turn is answered inside the dream.
    h = kernel_with_store(**{'kernel:metabolism.dream_wake_salience': 0.99})
    SummarisingBlock(h)
    states = h.collect(KernelState, names.STATE, ALL_STATES)
    responses = h.collect(Response, names.RESPONSE)
    wait_for(ready(states), 10, 'ready')
    res = call(h, Sleep, names.KERNEL_SLEEP, Sleep.Request(reason='the user asked'))
    assert res.success and res.message == 'WAKE -> DREAM: the user asked'
    wait_for(lambda: states[-1].metabolic_state == 'DREAM', 10, 'DREAM')
    again = call(h, Sleep, names.KERNEL_SLEEP, Sleep.Request(reason=''))
    assert again.success and again.message == 'already in DREAM'
    (oid,) = tell(h, 'console', 'hello, are you asleep?')
    wait_for(lambda: len(responses) == 1, 10, 'the answer')
    r = responses[0]
    assert r.observation_id == oid and r.status == Response.STATUS_OK
    assert r.metabolic_state == 'DREAM' and states[-1].metabolic_state == 'DREAM'


def test_shutdown_closes_the_session_and_the_next_start_opens_the_next(
        kernel_with_store: Callable[..., Harness], db: Path) -> None:
    h = kernel_with_store()
    SummarisingBlock(h)
    states = h.collect(KernelState, names.STATE, ALL_STATES)
    responses = h.collect(Response, names.RESPONSE)
    wait_for(ready(states), 10, 'ready')
    tell(h, 'console', 'my name is Sam')
    wait_for(lambda: len(responses) == 1, 10, 'the answer')
    h.close()
    again = kernel_with_store()
    node = again.node(KernelNode)
    assert isinstance(node, KernelNode) and node.session.number == 2
    store = MemoryStore(db, read_only=True)
    first, = [s for s in store.sessions() if s.number == 1]
    assert first.end_reason == 'shutdown (signal)' and 'Sam' in first.summary
    assert first.turns == 1 and not first.dreamed
    assert [s.number for s in store.undreamed_sessions()] == [1]
    store.close()


def test_without_a_store_sessions_count_in_memory(
        harness: Callable[..., Harness]) -> None:
    h = harness((graph.KERNEL,), **FAST)       # state_file none
    states = h.collect(KernelState, names.STATE, ALL_STATES)
    wait_for(lambda: bool(states) and states[-1].session == 1, 10, 'session 1')
    res = call(h, EndSession, names.SESSION_END, EndSession.Request(reason='quit', dream=False))
    assert res.success and 'not kept (state_file none)' in res.message and res.session == 1
    wait_for(lambda: states[-1].session == 2, 10, 'session 2')
