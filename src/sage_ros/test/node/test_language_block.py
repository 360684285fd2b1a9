"""The language block over real rclpy with the model manager and the tiny models: readiness that
follows the model manager, one FIFO of goals, failing at once when the model manager stops,
using it again when it is back, run-time parameters, and a bounded destroy."""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Tuple

from action_msgs.msg import GoalStatus
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState
from rcl_interfaces.srv import SetParameters
from rclpy.action import ActionClient
from rclpy.node import Node
from rclpy.parameter import Parameter
from sage_interfaces.action import Language
from sage_interfaces.msg import BlockDescription, Heartbeat

from node_harness import Harness, LoadGate, call, send_goal, wait_for
from sage_ros import graph, names
from sage_ros.nodes.common import LATCHED
from sage_ros.nodes.language_block import LanguageBlockNode
from sage_ros.nodes.liveness import HEARTBEAT_QOS, HeartbeatPublisher
from sage_ros.nodes.model_manager import ModelManagerNode

GRAPH = (graph.LANGUAGE_BLOCK, graph.MODEL_MANAGER)
# Follow the requested roles (no stand-in by the resident large model).
NO_SUBSTITUTE = {'model_manager:policy.substitute': False}


def nodes(h: Harness) -> Tuple[LanguageBlockNode, ModelManagerNode]:
    lb, mm = h.node(LanguageBlockNode), h.node(ModelManagerNode)
    assert isinstance(lb, LanguageBlockNode) and isinstance(mm, ModelManagerNode)
    return lb, mm


def language_beats(h: Harness) -> List[Any]:
    beats: List[Any] = []

    def on_beat(m: Any) -> None:
        if m.block == 'language':
            beats.append(m)
    h.probe.create_subscription(Heartbeat, names.HEARTBEAT, on_beat, HEARTBEAT_QOS)
    return beats


def language_descriptions(h: Harness) -> List[Any]:
    got: List[Any] = []

    def on_description(m: Any) -> None:
        if m.name == 'language':
            got.append(m)
    h.probe.create_subscription(BlockDescription, names.BLOCKS_DESCRIPTION, on_description,
                                LATCHED)
    return got


def started(make: Callable[..., Harness], **overrides: object
            ) -> Tuple[Harness, LanguageBlockNode, ModelManagerNode, ActionClient]:
    h = make(GRAPH, **{**NO_SUBSTITUTE, **overrides})
    lb, mm = nodes(h)
    wait_for(lambda: lb.readiness.evaluate()[0], 60.0, 'language block ready')
    client = ActionClient(h.probe, Language, names.BLOCK_LANGUAGE)
    assert client.wait_for_server(timeout_sec=10.0)
    return h, lb, mm, client


def test_loaded_and_ready_follow_the_model_managers_lifecycle(
        harness: Callable[..., Harness]) -> None:
    h = harness(GRAPH, **{'model_manager:autostart': False})
    lb, mm = nodes(h)
    beats, descriptions = language_beats(h), language_descriptions(h)
    wait_for(lambda: descriptions and beats, what='description and heartbeat')
    assert not descriptions[-1].loaded and descriptions[-1].concurrency == 1
    assert not beats[-1].ready and 'model manager' in beats[-1].not_ready_reason

    def change(transition_id: int) -> bool:
        req = ChangeState.Request(transition=Transition(id=transition_id))
        return bool(call(h, ChangeState, f'{names.MODEL_MANAGER}/change_state', req).success)

    assert change(Transition.TRANSITION_CONFIGURE)
    wait_for(lambda: 'inactive' in beats[-1].not_ready_reason, what='not ready: inactive')
    assert not descriptions[-1].loaded
    assert change(Transition.TRANSITION_ACTIVATE)
    wait_for(lambda: descriptions[-1].loaded and beats[-1].ready, what='loaded once active')
    assert beats[-1].not_ready_reason == ''
    assert change(Transition.TRANSITION_DEACTIVATE)
    wait_for(lambda: not descriptions[-1].loaded and not beats[-1].ready,
             what='not loaded once inactive')
    ok, result, _ = send_goal(ActionClient(h.probe, Language, names.BLOCK_LANGUAGE),
                              Language.Goal(turn_id=1, text='hello'))
    assert ok and result.error_code == Language.Result.MODEL_UNAVAILABLE
    assert result.error_msg == 'model manager not ready: model manager inactive'


def test_turns_are_answered_one_at_a_time_in_order_and_a_waiting_one_can_be_cancelled(
        harness: Callable[..., Harness]) -> None:
    h, lb, mm, client = started(harness)
    beats = language_beats(h)
    gate = LoadGate(mm, 'large')
    order: List[str] = []
    handles: Dict[str, Any] = {}
    results: Dict[str, Any] = {}
    for name, complexity in (('first', 'complex'), ('second', 'simple'), ('third', 'simple'),
                             ('fourth', 'simple')):
        sent = client.send_goal_async(Language.Goal(turn_id=len(handles) + 1, text=name,
                                                    complexity=complexity, ephemeral=True))
        wait_for(sent.done, what=f'{name} accepted')
        handles[name] = sent.result()
        assert handles[name].accepted
        results[name] = handles[name].get_result_async()
        results[name].add_done_callback(lambda _, n=name: order.append(n))
    wait_for(gate.held.is_set, what='first turn held in its swap')
    wait_for(lambda: lb.queue.counts() == (1, 3), what='one running, three waiting')
    wait_for(lambda: beats and (beats[-1].goals_active, beats[-1].goals_queued) == (1, 3),
             what='goal counts in the heartbeat')
    assert mm.queue.counts() == (1, 0), 'the model manager sees one goal at a time'
    cancel = handles['third'].cancel_goal_async()
    wait_for(cancel.done, what='cancel answered')
    wait_for(lambda: order == ['third'], what='the waiting goal answered at once')
    third = results['third'].result()
    assert third.status == GoalStatus.STATUS_CANCELED
    assert third.result.error_code == Language.Result.CANCELLED
    gate.open()
    wait_for(lambda: len(order) == 4, 60.0, 'every turn answered')
    assert order == ['third', 'first', 'second', 'fourth']
    roles = [results[n].result().result.role for n in ('first', 'second', 'fourth')]
    assert roles == ['large', 'small', 'small']


def test_a_generation_fails_at_once_when_the_model_manager_stops_and_it_is_used_again(
        harness: Callable[..., Harness]) -> None:
    h, lb, mm, client = started(harness)
    descriptions = language_descriptions(h)
    gate = LoadGate(mm, 'large')
    sent = client.send_goal_async(Language.Goal(turn_id=1, text='Design a plan',
                                                complexity='complex'))
    wait_for(gate.held.is_set, what='generation held in its swap')
    # The model manager hangs (as a killed process would: no heartbeat, no answer).
    h.executor.remove_node(mm)
    t0 = time.monotonic()
    result_future = sent.result().get_result_async()
    wait_for(result_future.done, 10.0, 'the turn failed')
    took = time.monotonic() - t0
    result = result_future.result().result
    assert result.error_code == Language.Result.MODEL_UNAVAILABLE
    assert result.error_msg == 'model manager stopped (no heartbeat for 2.0 s)'
    assert took < 6.0, took
    wait_for(lambda: descriptions and not descriptions[-1].loaded, what='advertised not loaded')
    assert not lb.readiness.evaluate()[0]
    gate.open()
    h.executor.add_node(mm)      # back: the block serves again by itself
    wait_for(lambda: descriptions[-1].loaded, 30.0, 'loaded again')
    ok, result, _ = send_goal(client, Language.Goal(turn_id=2, text='hello', complexity='simple'))
    assert ok and result.error_code == Language.Result.NONE and result.role == 'small'


def test_parameters_set_at_run_time_take_effect(harness: Callable[..., Harness]) -> None:
    h, lb, mm, client = started(harness)

    def set_params(**values: object) -> List[Any]:
        req = SetParameters.Request(parameters=[
            Parameter(k.replace('__', '.'), value=v).to_parameter_msg()
            for k, v in values.items()])
        return list(call(h, SetParameters, f'{names.LANGUAGE_BLOCK}/set_parameters',
                         req).results)

    results = set_params(roles__simple='large', temperature=0.7, system_prompt='Be terse.',
                         max_new_tokens=4, max_exchanges=2)
    assert all(r.successful for r in results), [r.reason for r in results]
    assert lb.block.temperature == 0.7 and lb.block.max_new_tokens == 4
    assert lb.block.conversation.system_prompt == 'Be terse.'
    assert lb.block.conversation.max_exchanges == 2
    ok, result, _ = send_goal(client, Language.Goal(turn_id=1, text='hello', complexity='simple'))
    assert ok and result.role == 'large' and result.completion_tokens == 4
    assert lb.block.conversation.messages_for('next')[0].content == 'Be terse.'
    for _ in range(2):
        assert send_goal(client, Language.Goal(turn_id=2, text='again'))[0]
    assert len(lb.block.conversation) == 2, 'max_exchanges applies'
    for name, value, why in (('roles__simple', '  ', 'must not be empty'),
                             ('roles__complex', 'xl', "'xl' is not a model manager role"),
                             ('temperature', 9.0, 'range'),
                             ('router', 'keyword', 'read-only')):
        r = set_params(**{name: value})[0]
        assert not r.successful and why in r.reason, (name, r.reason)


def test_destroy_node_is_bounded_during_a_generation(harness: Callable[..., Harness]) -> None:
    h, lb, mm, client = started(harness)
    gate = LoadGate(mm, 'large')
    client.send_goal_async(Language.Goal(turn_id=1, text='Design a plan', complexity='complex'))
    wait_for(gate.held.is_set, what='generation held in its swap')
    h.executor.remove_node(lb)
    h.nodes.remove(lb)
    t0 = time.monotonic()
    lb.destroy_node()           # its call waits on the model manager: it must not wait it out
    assert time.monotonic() - t0 < 4.0
    gate.open()


def test_a_generation_past_its_timeout_is_cancelled_with_the_reason(
        harness: Callable[..., Harness]) -> None:
    h, lb, mm, client = started(harness)
    assert lb.set_parameters([Parameter('generate_timeout_s', value=1.0)])[0].successful
    gate = LoadGate(mm, 'large')
    sent = client.send_goal_async(Language.Goal(turn_id=1, text='Design a plan',
                                                complexity='complex'))
    wait_for(gate.held.is_set, what='generation held in its swap')
    wait_for(sent.done, what='accepted')
    result_future = sent.result().get_result_async()
    wait_for(result_future.done, 10.0, 'the turn failed')
    result = result_future.result().result
    assert result.error_code == Language.Result.FAILED, 'a timeout is no reason to try again'
    assert result.error_msg == 'the model manager took longer than 1 s'
    gate.open()
    wait_for(lambda: mm.queue.idle(), 30.0, 'the model manager goal cancelled')



def test_a_generation_the_model_manager_stops_for_a_silent_block_fails_with_its_reason(
        harness: Callable[..., Harness]) -> None:
    """A language block that stalls (no heartbeat) past the liveness timeout is taken for gone
    by the model manager, which stops its generation; the block, running again, fails the turn
    with that reason rather than calling it a cancel of its own."""
    h, lb, mm, client = started(harness, **{'model_manager:models.small.max_new_tokens': 4000,
                                            'model_manager:models.small.context_window': 5000})
    sent = client.send_goal_async(Language.Goal(turn_id=1, text='hello', complexity='simple'))
    wait_for(lambda: mm.queue.counts()[0] == 1, 30.0, 'the generation running')
    wait_for(sent.done, what='accepted')
    result_future = sent.result().get_result_async()
    h.executor.remove_node(lb)                       # the block stalls
    wait_for(lambda: mm.queue.idle(), 30.0, 'the model manager stopped the generation')
    h.executor.add_node(lb)
    wait_for(result_future.done, 10.0, 'the turn answered')
    result = result_future.result().result
    assert result.error_code == Language.Result.FAILED
    assert result.error_msg == ('the model manager stopped the generation: abandoned: its '
                                'requester /sage/language_block stopped (no heartbeat for 2.0 s)')

def test_reasoning_steps_are_abandoned_when_the_reasoning_block_stops(
        harness: Callable[..., Harness]) -> None:
    h, lb, mm, client = started(harness)
    # A stand-in reasoning block: only its heartbeat (the steps come from the probe).
    stand_in = Node(names.REASONING_BLOCK, namespace=names.DEFAULT_NAMESPACE, context=h.context)
    HeartbeatPublisher(stand_in, 'reasoning')
    h.executor.add_node(stand_in)
    wait_for(lambda: lb._requester.watch.alive(lb._requester.watched), what='stand-in seen')
    gate = LoadGate(mm, 'large')
    sent = [client.send_goal_async(Language.Goal(turn_id=1, text=text, complexity=complexity,
                                                 ephemeral=ephemeral))
            for text, complexity, ephemeral in (('Design a plan', 'complex', True),
                                                ('a part', 'simple', True),
                                                ('a turn', 'simple', False))]
    wait_for(gate.held.is_set, what='the first step held in its swap')
    wait_for(lambda: all(s.done() for s in sent), what='accepted')
    results = [s.result().get_result_async() for s in sent]
    h.executor.remove_node(stand_in)          # the reasoning block stops
    wait_for(lambda: results[0].done() and results[1].done(), 10.0, 'the steps answered')
    for r in results[:2]:
        res = r.result().result
        assert res.error_code == Language.Result.FAILED
        assert res.error_msg == ('step abandoned: reasoning block stopped (no heartbeat for '
                                 '2.0 s)')
    gate.open()
    wait_for(results[2].done, 60.0, 'the kernel\'s turn answered')
    assert results[2].result().result.error_code == Language.Result.NONE
    stand_in.destroy_node()


# ---- memory in the prompt ----------------------------------------------------------------------

def test_a_turn_gets_the_recalled_memory_and_the_preamble(
        harness: Callable[..., Harness], tmp_path: Any) -> None:
    from sage_interfaces.action import Memory
    from sage_ros.nodes.memory_block import MemoryBlockNode
    h = harness((*GRAPH, graph.MEMORY_BLOCK), **{
        # The tiny models' 512-token window and byte-level tokenizer: room for both.
        **NO_SUBSTITUTE, 'model_manager:context.memory_share': 0.6,
        'memory_block:embedder': 'ngram',
        'memory_block:state_file': str(tmp_path / 'sage.db')})
    lb, mm = nodes(h)
    memory = h.node(MemoryBlockNode)
    assert isinstance(memory, MemoryBlockNode)
    wait_for(lambda: lb.readiness.evaluate()[0], 60.0, 'language block ready')
    stored = send_goal(ActionClient(h.probe, Memory, names.BLOCK_MEMORY), Memory.Goal(
        operation=Memory.Goal.OP_STORE, text='the spare battery is in locker 12', pinned=True))
    assert stored[0] and stored[1].error_code == 0
    seen: List[Any] = []
    pool = mm.pool
    assert pool is not None
    real = pool.generate

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return real(*args, **kwargs)
    pool.generate = spy      # type: ignore[method-assign]
    client = ActionClient(h.probe, Language, names.BLOCK_LANGUAGE)
    ok, result, _ = send_goal(client, Language.Goal(turn_id=1, text='where is the spare battery?'))
    assert ok and result.error_code == result.NONE and result.memory_used >= 1
    assert seen[-1]['memory'][0] == 'You were asked to remember: the spare battery is in locker 12'
    assert 'This is session 1' in seen[-1]['preamble']
    assert lb.recall.outage == ''
    # An ephemeral step (the reasoning block's) is answered without asking memory.
    ok, result, _ = send_goal(client, Language.Goal(turn_id=2, text='spare battery?',
                                                    ephemeral=True))
    assert ok and result.memory_used == 0 and list(seen[-1]['memory']) == []


def test_without_a_memory_block_turns_are_answered_without_memory(
        harness: Callable[..., Harness]) -> None:
    h, lb, mm, client = started(harness)
    for i in range(2):
        ok, result, _ = send_goal(client, Language.Goal(turn_id=i + 1, text='hello there'))
        assert ok and result.error_code == result.NONE and result.memory_used == 0
    assert 'memory block' in lb.recall.outage    # said once (the log), kept as the reason
