"""The kernel node over real rclpy with block servers played by the probe node: routing to the
reasoning action, preemption and time-out through action cancels, run-time parameters with
validation, and the documented parameter set. Text is embedded with hashed n-grams here (fast);
the scenario tests use MiniLM."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import rclpy
import yaml
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.action.server import ServerGoalHandle
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.context import Context
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sage_interfaces.action import Language, Reasoning
from builtin_interfaces.msg import Time as TimeMsg
from rosgraph_msgs.msg import Clock  # type: ignore[import-untyped]
from sage_interfaces.msg import (BlockDescription, Heartbeat, KernelState, Response, ResponseChunk,
                                 Salience, TextObservation)
from std_msgs.msg import String

from conftest import params_for
from sage_ros import graph, names
from sage_ros.cli.graph_runner import GraphError, context_args, create_nodes
from sage_ros.core.metabolism import MetabolicState
from sage_ros.core.trust import KIND_SENSOR
from sage_ros.nodes.common import LATCHED, RELIABLE
from sage_ros.nodes.kernel import KernelNode
from sage_ros.nodes.liveness import HEARTBEAT_QOS
from node_harness import Harness, wait_for

ALL_STATES = QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.TRANSIENT_LOCAL)
FAST = {'kernel:salience.text_embedder': 'ngram', 'kernel:state_file': 'none',
        'kernel:metabolism.circadian_period_s': 0.0, 'kernel:metabolism.min_dwell_s': 0.0}


class FakeBlock:
    """A block server in the probe node: answers at once, or holds goals until cancelled. It
    beats on `heartbeat` like a block node (`beating`, `ready`; `restart` changes its instance)."""

    def __init__(self, h: Harness, action: Any, name: str, capability: str,
                 hold: bool = False, concurrency: int = 1, beating: bool = True) -> None:
        self.action, self.hold, self.name = action, hold, name
        self.requests: List[Any] = []
        self.cancelled: List[int] = []
        self.running = 0
        self.most_running = 0
        self.beating, self.ready, self.instance = beating, True, uuid.uuid4().hex[:12]
        self.unavailable = 0     # goals still to refuse as a language block whose model is gone
        self.server = ActionServer(
            h.probe, action, f'blocks/{name}', execute_callback=self._execute,
            goal_callback=lambda g: GoalResponse.ACCEPT,
            cancel_callback=lambda g: CancelResponse.ACCEPT,
            callback_group=ReentrantCallbackGroup())
        self.pub = h.probe.create_publisher(BlockDescription, names.BLOCKS_DESCRIPTION, LATCHED)
        type_name = 'Reasoning' if action is Reasoning else 'Language'
        self.pub.publish(BlockDescription(
            name=name, block_type='modular', capabilities=[capability], modalities=['text'],
            action_name=h.probe.resolve_topic_name(f'blocks/{name}'),
            action_type=f'sage_interfaces/action/{type_name}', loaded=True,
            concurrency=concurrency))
        self._beats = h.probe.create_publisher(Heartbeat, names.HEARTBEAT, HEARTBEAT_QOS)
        h.probe.create_timer(0.1, self._beat, callback_group=ReentrantCallbackGroup())

    def _beat(self) -> None:
        if self.beating:
            self._beats.publish(Heartbeat(
                node=f'/sage/fake_{self.name}', instance_id=self.instance, block=self.name,
                ready=self.ready, not_ready_reason='' if self.ready else 'model manager inactive',
                period_s=0.1))

    def restart(self) -> None:
        self.instance = uuid.uuid4().hex[:12]

    def _execute(self, gh: ServerGoalHandle) -> Any:
        goal = gh.request
        self.requests.append(goal)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            while self.hold and not gh.is_cancel_requested:
                time.sleep(0.01)
        finally:
            self.running -= 1
        if gh.is_cancel_requested:
            self.cancelled.append(goal.turn_id)
            gh.canceled()
            return self.action.Result(error_code=self.action.Result.CANCELLED)
        if self.unavailable > 0:
            self.unavailable -= 1
            gh.abort()
            return Language.Result(error_code=Language.Result.MODEL_UNAVAILABLE,
                                   error_msg='model manager stopped (no heartbeat for 2.0 s)')
        if self.action is Reasoning:
            for step in (1, 2):
                gh.publish_feedback(Reasoning.Feedback(step=step, energy=1.0 / step,
                                                       summary=f'step {step}'))
            gh.succeed()
            return Reasoning.Result(answer=f'reasoned: {goal.problem}', steps=2,
                                    final_energy=0.1, converged=True, atp_spent=4.0)
        gh.publish_feedback(Language.Feedback(text='ok', model='fake', completion_tokens=1))
        gh.succeed()
        return Language.Result(text='ok', model='fake', role='small', complexity=goal.complexity,
                               completion_tokens=1, requested_role='large',
                               fallback='large not loaded', truncated=True)


@pytest.fixture
def kernel_harness(harness: Callable[..., Harness]) -> Callable[..., Harness]:
    def make(**overrides: Any) -> Harness:
        return harness((graph.KERNEL,), **{**FAST, **overrides})
    return make


def say(h: Harness, *lines: str) -> None:
    """Bare text on `text_in` (source 'text', ids by the kernel)."""
    pub = h.probe.create_publisher(String, names.TEXT_IN, RELIABLE)
    wait_for(lambda: pub.get_subscription_count() > 0, 10, 'kernel subscribed')
    for line in lines:
        pub.publish(String(data=line))


def tell(h: Harness, source: str, *lines: str) -> List[str]:
    """Typed observations from `source`; returns their ids."""
    pub = h.probe.create_publisher(TextObservation, names.OBSERVATIONS_TEXT, RELIABLE)
    wait_for(lambda: pub.get_subscription_count() > 0, 10, 'kernel subscribed')
    ids = []
    for line in lines:
        ids.append(f'{source}/{uuid.uuid4().hex[:6]}')
        pub.publish(TextObservation(observation_id=ids[-1], source=source, text=line))
    return ids


def known_blocks(states: List[KernelState], *blocks: str) -> Callable[[], bool]:
    return lambda: bool(states) and set(blocks) <= set(states[-1].blocks)


def ready(states: List[KernelState]) -> Callable[[], bool]:
    return lambda: bool(states) and states[-1].ready


def by_id(responses: List[Response]) -> Dict[str, Response]:
    return {r.observation_id: r for r in responses}


def test_complex_salient_requests_go_to_the_reasoning_action(
        kernel_harness: Callable[..., Harness]) -> None:
    h = kernel_harness(**{'kernel:routing.reasoning_min_salience': 0.2})
    language = FakeBlock(h, Language, 'language', 'conversation')
    reasoning = FakeBlock(h, Reasoning, 'reasoning', 'reasoning')
    responses = h.collect(Response, names.RESPONSE)
    chunks = h.collect(ResponseChunk, names.RESPONSE_STREAM)
    states = h.collect(KernelState, names.STATE, ALL_STATES)
    wait_for(known_blocks(states, 'language', 'reasoning'), 10, 'kernel knows both blocks')
    started = time.time()
    say(h, 'Design a charging schedule for three robots', 'hi')
    wait_for(lambda: len(responses) == 2, 20, 'two responses')
    r1, r2 = sorted(responses, key=lambda r: r.turn_id)
    # Turn ids continue from wall ms * 1000: unique across kernel restarts.
    assert r2.turn_id == r1.turn_id + 1 and r1.turn_id // 1000 <= started * 1000 + 1
    assert r1.turn_id > 1_700_000_000_000_000
    assert (r1.source, r1.observation_id) == ('text', f'text/{r1.turn_id}')
    assert len(reasoning.requests) == 1 and len(language.requests) == 1
    goal = reasoning.requests[0]
    assert goal.turn_id == r1.turn_id and goal.problem == 'Design a charging schedule for three robots'
    # The 30 ATP grant less the run the kernel charges itself: reported + run <= grant.
    assert goal.atp_budget == pytest.approx(29.0) and goal.max_steps == 0
    # A language goal's answer is always capped by what its grant pays for.
    assert language.requests[0].max_new_tokens == 128
    assert language.requests[0].atp_budget == pytest.approx(128 * 0.05)
    assert r1.status == Response.STATUS_OK and r1.block == 'reasoning' and not r1.truncated
    assert r1.text == 'reasoned: Design a charging schedule for three robots'
    assert r1.complexity == 'complex' and r1.atp_spent == pytest.approx(5.0)  # run + reported
    assert r2.block == 'language' and r2.requested_role == 'large' and r2.truncated
    assert r2.fallback == 'large not loaded' and language.requests[0].complexity == 'simple'
    assert [(c.turn_id, c.observation_id, c.source) for c in chunks] == [
        (r2.turn_id, r2.observation_id, 'text')]            # reasoning progress is not text
    assert all(r.salience > 0 and r.metabolic_state == 'WAKE' for r in responses)
    wait_for(lambda: states[-1].active_dispatches == 0, 10, 'settled')
    trust = {(t.name, t.kind): t for t in states[-1].trust}
    assert trust[('reasoning', 'block')].outcomes == 1
    assert trust[('reasoning', 'block')].trust > 0.5 and trust[('text', 'sensor')].outcomes == 2


def test_typed_observations_keep_their_ids_and_sources_are_scored_apart(
        kernel_harness: Callable[..., Harness]) -> None:
    h = kernel_harness()
    FakeBlock(h, Language, 'language', 'conversation')
    responses = h.collect(Response, names.RESPONSE)
    chunks = h.collect(ResponseChunk, names.RESPONSE_STREAM)
    scores = h.collect(Salience, names.SALIENCE)
    states = h.collect(KernelState, names.STATE, ALL_STATES)
    wait_for(ready(states), 10, 'ready')
    ids = tell(h, 'console', 'hello robot', 'hello robot') + tell(h, 'hri/text', 'hello robot')
    wait_for(lambda: len(responses) == 3 and len(scores) == 3, 20, 'three answers')
    got = by_id(responses)
    assert set(got) == set(ids)
    assert [got[i].source for i in ids] == ['console', 'console', 'hri/text']
    assert all(r.status == Response.STATUS_OK for r in responses)
    assert {c.observation_id for c in chunks} == set(ids)
    sal = {s.observation_id: s for s in scores}
    assert [sal[i].sensor_id for i in ids] == ['console', 'console', 'hri/text']
    # Each source has its own memory: the same words are new to 'hri/text', seen by 'console'.
    assert sal[ids[2]].novelty == pytest.approx(sal[ids[0]].novelty)
    assert sal[ids[1]].novelty < sal[ids[0]].novelty
    trust = {(t.name, t.kind): t.outcomes for t in states[-1].trust}
    assert trust[('console', 'sensor')] == 2 and trust[('hri/text', 'sensor')] == 1


def test_observations_before_the_graph_is_ready_wait_and_are_answered(
        kernel_harness: Callable[..., Harness]) -> None:
    h = kernel_harness()
    responses = h.collect(Response, names.RESPONSE)
    states = h.collect(KernelState, names.STATE, ALL_STATES)
    wait_for(lambda: bool(states), 10, 'a state')
    assert not states[-1].ready
    assert states[-1].ready_reason == 'no block offering conversation has announced itself'
    (early,) = tell(h, 'console', 'hello, anyone there?')
    language = FakeBlock(h, Language, 'language', 'conversation')
    language.ready = False
    wait_for(lambda: 'not ready: model manager inactive' in states[-1].ready_reason, 10,
             'the block beats, not ready')
    assert responses == [] and not states[-1].ready
    language.ready = True
    wait_for(lambda: len(responses) == 1, 10, 'the early observation answered')
    assert responses[0].observation_id == early and responses[0].status == Response.STATUS_OK
    assert states[-1].ready and states[-1].ready_reason == ''
    assert 'waiting for the graph' in ' '.join(s.last_decision for s in states)


def test_a_block_that_goes_silent_fails_its_goal_at_once_and_serves_again_when_back(
        kernel_harness: Callable[..., Harness]) -> None:
    h = kernel_harness()      # liveness_timeout_s 2.0
    language = FakeBlock(h, Language, 'language', 'conversation', hold=True)
    responses = h.collect(Response, names.RESPONSE)
    states = h.collect(KernelState, names.STATE, ALL_STATES)
    wait_for(ready(states), 10, 'ready')
    (first,) = tell(h, 'console', 'tell me a long story')
    wait_for(lambda: len(language.requests) == 1, 10, 'the goal running')
    language.beating = False            # as a kill -9 looks from outside
    wait_for(lambda: len(responses) == 1, 10, 'the turn failed')
    r = responses[0]
    assert r.observation_id == first and r.status == Response.STATUS_FAILED
    assert r.error == ('the language block stopped (no heartbeat for 2.0 s); ask again when it '
                       'is back')
    wait_for(lambda: not states[-1].ready and 'language' not in states[-1].blocks
             and states[-1].ready_reason == 'the language block stopped (no heartbeat for 2.0 s)',
             10, 'not ready, saying why')
    assert states[-1].active_dispatches == 0
    (waiting,) = tell(h, 'console', 'are you back?')   # waits for the graph
    language.hold = False
    language.restart()
    language.beating = True
    wait_for(lambda: len(responses) == 2, 10, 'answered once the block is back')
    assert responses[1].observation_id == waiting and responses[1].status == Response.STATUS_OK


def test_a_restarted_block_fails_the_goals_it_lost(
        kernel_harness: Callable[..., Harness]) -> None:
    h = kernel_harness()
    language = FakeBlock(h, Language, 'language', 'conversation', hold=True)
    responses = h.collect(Response, names.RESPONSE)
    states = h.collect(KernelState, names.STATE, ALL_STATES)
    wait_for(ready(states), 10, 'ready')
    tell(h, 'console', 'hello')
    wait_for(lambda: len(language.requests) == 1, 10, 'the goal running')
    language.restart()                 # respawned faster than the liveness timeout
    wait_for(lambda: len(responses) == 1, 10, 'the turn failed')
    assert responses[0].status == Response.STATUS_FAILED
    assert responses[0].error == 'the language block restarted and lost the goal; ask again'
    language.hold = False
    wait_for(lambda: language.running == 0, 10, 'the fake block idle')


def test_a_block_never_gets_more_goals_than_its_concurrency(
        kernel_harness: Callable[..., Harness]) -> None:
    h = kernel_harness(**{'kernel:states.wake.max_targets': 3})
    language = FakeBlock(h, Language, 'language', 'conversation', hold=True)
    responses = h.collect(Response, names.RESPONSE)
    states = h.collect(KernelState, names.STATE, ALL_STATES)
    wait_for(ready(states), 10, 'ready')
    ids = tell(h, 'a', 'one', 'two') + tell(h, 'b', 'three')
    wait_for(lambda: len(language.requests) == 1, 10, 'one goal running')
    time.sleep(0.5)
    assert len(language.requests) == 1 and states[-1].active_dispatches == 1
    language.hold = False
    wait_for(lambda: len(responses) == 3, 20, 'all answered')
    assert language.most_running == 1
    order = [r.observation_id for r in responses]
    assert order.index(ids[0]) < order.index(ids[1])      # one source: in arrival order


def test_with_sim_time_stamps_and_expiry_follow_the_clock_topic(
        kernel_harness: Callable[..., Harness]) -> None:
    h = kernel_harness(**{'kernel:use_sim_time': True, 'kernel:deferred_ttl_s': 5.0})
    clock = h.probe.create_publisher(Clock, '/clock', RELIABLE)
    responses = h.collect(Response, names.RESPONSE)
    scores = h.collect(Salience, names.SALIENCE)
    states = h.collect(KernelState, names.STATE, ALL_STATES)

    def tick(sec: int) -> None:
        for _ in range(5):             # a few times: the first may precede the match
            clock.publish(Clock(clock=TimeMsg(sec=sec)))
            time.sleep(0.05)
    wait_for(lambda: clock.get_subscription_count() > 0, 10, 'kernel on /clock')
    tick(1000)
    wait_for(lambda: bool(states) and states[-1].stamp.sec == 1000, 10, 'state in sim time')
    (oid,) = tell(h, 'console', 'hello')      # no block: it waits for the graph
    wait_for(lambda: len(scores) == 1, 10, 'scored')
    assert scores[0].stamp.sec == 1000
    tick(1004)
    time.sleep(0.5)                           # wall time passes; sim time does not
    assert responses == []
    tick(1006)
    wait_for(lambda: len(responses) == 1, 10, 'expired in sim time')
    r = responses[0]
    assert r.observation_id == oid and r.status == Response.STATUS_REJECTED
    assert r.error == ('expired after waiting 5 s: waiting for the graph: no block offering '
                       'conversation has announced itself')
    assert (r.stamp.sec, r.stamp.nanosec) == (1006, 0)


def test_a_salient_observation_preempts_a_running_goal_through_cancel(
        kernel_harness: Callable[..., Harness]) -> None:
    h = kernel_harness(**{'kernel:metabolism.focus_enter': 0.5,
                          'kernel:metabolism.focus_exit': 0.3})
    language = FakeBlock(h, Language, 'language', 'conversation', hold=True)
    responses = h.collect(Response, names.RESPONSE)
    states = h.collect(KernelState, names.STATE, ALL_STATES)
    wait_for(ready(states), 10, 'ready')
    (routine,) = tell(h, 'console', 'status report one, all nominal')
    wait_for(lambda: len(language.requests) == 1, 10, 'first goal running')
    first_turn = language.requests[0].turn_id
    (fire,) = tell(h, 'alarm', 'FIRE!!! EVERYONE OUT OF THE BUILDING NOW!!!')
    wait_for(lambda: language.cancelled == [first_turn], 10, 'the first goal cancelled')
    wait_for(lambda: len(responses) == 1, 10, 'the preempted turn answered')
    assert responses[0].observation_id == routine
    assert responses[0].status == Response.STATUS_FAILED
    assert responses[0].error.startswith(f'preempted by turn {first_turn + 1}')
    wait_for(lambda: len(language.requests) == 2, 10, 'the salient turn dispatched')
    assert language.requests[1].turn_id == first_turn + 1
    assert any(s.metabolic_state == 'FOCUS' and s.previous_state == 'WAKE'
               and 'salience' in s.transition_reason for s in states)
    language.hold = False
    wait_for(lambda: len(responses) == 2 and responses[1].status == Response.STATUS_OK, 10,
             'the salient turn answered')
    assert responses[1].observation_id == fire


def test_a_stuck_goal_times_out_is_cancelled_and_fails(
        kernel_harness: Callable[..., Harness]) -> None:
    h = kernel_harness(**{'kernel:routing.language_deadline_s': 0.5})
    language = FakeBlock(h, Language, 'language', 'conversation', hold=True)
    responses = h.collect(Response, names.RESPONSE)
    states = h.collect(KernelState, names.STATE, ALL_STATES)
    wait_for(ready(states), 10, 'ready')
    say(h, 'hello')
    wait_for(lambda: len(responses) == 1, 10, 'a response')
    assert responses[0].status == Response.STATUS_FAILED
    assert "no result from 'language' within 0.5 s" in responses[0].error
    wait_for(lambda: language.cancelled == [responses[0].turn_id], 10, 'the goal cancelled')
    wait_for(lambda: states[-1].active_dispatches == 0, 10, 'settled')
    assert {t.name: t.trust for t in states[-1].trust}['language'] < 0.5


def test_bad_input_is_rejected_with_a_reason(kernel_harness: Callable[..., Harness]) -> None:
    h = kernel_harness()
    responses = h.collect(Response, names.RESPONSE)
    say(h, '\x07')
    (oid,) = tell(h, 'console', '')
    wait_for(lambda: len(responses) == 2, 10, 'two rejections')
    assert all(r.status == Response.STATUS_REJECTED for r in responses)
    assert 'control characters' in responses[0].error and responses[0].source == 'text'
    assert responses[1].observation_id == oid and 'empty text' in responses[1].error


def test_thresholds_change_at_run_time_and_bad_values_are_refused(
        kernel_harness: Callable[..., Harness]) -> None:
    h = kernel_harness()
    node = h.node(KernelNode)
    assert isinstance(node, KernelNode)
    ok = node.set_parameters([Parameter('metabolism.focus_enter', value=0.7),
                              Parameter('states.rest.min_salience', value=0.3)])
    assert all(r.successful for r in ok)
    assert node.core.config.metabolism.focus_enter == 0.7
    assert node.core.config.states[MetabolicState.REST].min_salience == 0.3
    bad = node.set_parameters([Parameter('metabolism.crisis_enter', value=0.5)])[0]
    assert not bad.successful and 'crisis_enter must be below crisis_exit' in bad.reason
    assert node.core.config.metabolism.crisis_enter == 0.1
    assert not node.set_parameters([Parameter('states.rest.recharge_per_s',
                                              value=0.0)])[0].successful
    assert not node.set_parameters([Parameter('atp.capacity', value=5.0)])[0].successful  # r/o
    out_of_range = node.set_parameters([Parameter('metabolism.focus_exit', value=1.5)])[0]
    assert not out_of_range.successful


@pytest.mark.parametrize('profile', sorted(graph.PROFILES))
def test_every_kernel_parameter_is_documented_in_each_profile(
        profile: str, kernel_harness: Callable[..., Harness]) -> None:
    h = kernel_harness()
    node = h.node(KernelNode)
    declared = set(node.list_parameters([], 10).names) - {'use_sim_time',
                                                          'start_type_description_service'}
    section = graph.load_params(graph.PROFILES[profile])   # base + the profile's overlay
    documented: Dict[str, Any] = {}

    def flatten(d: Dict[str, Any], prefix: str = '') -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                flatten(v, f'{prefix}{k}.')
            else:
                documented[prefix + k] = v
    flatten(section['/**/kernel']['ros__parameters'])
    assert set(documented) == declared
    for name, value in documented.items():   # types match what the node declares
        assert type(value) is type(node.get_parameter(name).value), name
    # Comments live in base.yaml, where every parameter is; overlays only change values.
    text = (graph.config_dir() / graph.BASE_PARAMS).read_text()
    kernel_text = text[text.index('/**/kernel:'):text.index('/**/language_block:')]
    assert kernel_text.count('#') >= len(declared)    # every parameter has a comment


def test_trust_and_learned_weights_persist_across_a_restart(
        harness: Callable[..., Harness], tmp_path: Any) -> None:
    db = tmp_path / 'kernel.db'
    overrides = {**FAST, 'kernel:state_file': str(db)}
    h = harness((graph.KERNEL,), **overrides)
    FakeBlock(h, Language, 'language', 'conversation')
    responses = h.collect(Response, names.RESPONSE)
    states = h.collect(KernelState, names.STATE, ALL_STATES)
    wait_for(known_blocks(states, 'language'), 10, 'kernel knows the block')
    say(h, 'hello', 'where is the red cup?')
    wait_for(lambda: len(responses) == 2, 10, 'two responses')
    before = h.node(KernelNode)
    assert isinstance(before, KernelNode)
    weights = before.core.scorer.weights
    defaults = before.core.config.weights.normalised()
    assert max(abs(a - b) for a, b in zip(weights, defaults)) > 1e-4   # something was learned
    sensor = before.core.trust.get('text', KIND_SENSOR)
    h.close()
    again = harness((graph.KERNEL,), **overrides).node(KernelNode)
    assert isinstance(again, KernelNode)
    assert again.core.trust.get('language') > 0.5
    assert again.core.scorer.weights == pytest.approx(weights)
    # Sensor trust is saved lazily, and at the latest when the node is destroyed.
    assert again.core.trust.get('text', KIND_SENSOR) == pytest.approx(sensor)
    assert sensor > 0.5 and db.is_file()


@pytest.mark.parametrize('key, value, message', [
    ('metabolism.focus_enter', 1.5, 'kernel parameter metabolism.focus_enter'),
    ('metabolism.crisis_enter', 0.5, 'crisis_enter must be below crisis_exit'),
    ('atp.capacity', 100, 'kernel parameter atp.capacity'),            # an int, not a float
    ('salience.text_embedder', 'bert', 'salience.text_embedder must be one of'),
])
def test_a_bad_parameters_file_is_one_clear_error(tiny_models: Dict[str, Any], tmp_path: Path,
                                                  key: str, value: Any, message: str) -> None:
    pf = tmp_path / 'bad.yaml'
    pf.write_text(yaml.safe_dump(params_for(tiny_models, **{f'kernel:{key}': value})))
    context = Context()
    rclpy.init(args=context_args(names.DEFAULT_NAMESPACE, pf), context=context)
    try:
        with pytest.raises(GraphError, match=message):
            create_nodes((graph.KERNEL,), context)
    finally:
        rclpy.try_shutdown(context=context)


@pytest.mark.parametrize('unusable', ['a directory', 'not a database', 'under a file'])
def test_an_unusable_state_file_is_one_clear_error(tiny_models: Dict[str, Any], tmp_path: Path,
                                                   unusable: str) -> None:
    target = tmp_path / 'state'
    if unusable == 'a directory':
        target.mkdir()
    elif unusable == 'not a database':
        target.write_text('these are not the bytes of an sqlite file\n' * 100)
    else:
        target.write_text('a file')
        target = target / 'kernel.db'
    pf = tmp_path / 'bad.yaml'
    pf.write_text(yaml.safe_dump(params_for(tiny_models, **{'kernel:state_file': str(target),
                                                            'kernel:salience.text_embedder':
                                                            'ngram'})))
    context = Context()
    rclpy.init(args=context_args(names.DEFAULT_NAMESPACE, pf), context=context)
    try:
        with pytest.raises(GraphError, match=re.escape(f"state_file '{target}' cannot be used")):
            create_nodes((graph.KERNEL,), context)
    finally:
        rclpy.try_shutdown(context=context)


def test_a_turn_its_block_could_not_start_waits_once_and_is_answered(
        kernel_harness: Callable[..., Harness]) -> None:
    """A block that just lost its model manager (its heartbeat did not say so yet) refuses the
    goal before any text: the turn waits for a fresh ready heartbeat instead of failing."""
    h = kernel_harness()
    language = FakeBlock(h, Language, 'language', 'conversation')
    language.unavailable = 1
    responses = h.collect(Response, names.RESPONSE)
    states = h.collect(KernelState, names.STATE, ALL_STATES)
    wait_for(ready(states), 10, 'ready')
    (oid,) = tell(h, 'console', 'hello')
    wait_for(lambda: len(responses) == 1, 10, 'the answer')
    assert responses[0].observation_id == oid and responses[0].status == Response.STATUS_OK
    assert len(language.requests) == 2
    assert any(not s.ready and 'model manager stopped' in s.ready_reason for s in states)


def test_a_second_refusal_is_the_answer(kernel_harness: Callable[..., Harness]) -> None:
    h = kernel_harness()
    language = FakeBlock(h, Language, 'language', 'conversation')
    language.unavailable = 2
    responses = h.collect(Response, names.RESPONSE)
    states = h.collect(KernelState, names.STATE, ALL_STATES)
    wait_for(ready(states), 10, 'ready')
    (oid,) = tell(h, 'console', 'hello')
    wait_for(lambda: len(responses) == 1, 10, 'the answer')
    assert responses[0].observation_id == oid and responses[0].status == Response.STATUS_FAILED
    assert responses[0].error == 'model manager stopped (no heartbeat for 2.0 s)'
    assert len(language.requests) == 2
