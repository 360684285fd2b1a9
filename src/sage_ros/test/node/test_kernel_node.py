"""The kernel node over real rclpy with block servers played by the probe node: routing to the
reasoning action, preemption and time-out through action cancels, run-time parameters with
validation, and the documented parameter set. Text is embedded with hashed n-grams here (fast);
the scenario tests use MiniLM."""

from __future__ import annotations

import re
import time
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
from sage_interfaces.msg import BlockDescription, KernelState, Response, ResponseChunk
from std_msgs.msg import String

from conftest import params_for
from sage_ros import graph, names
from sage_ros.cli.graph_runner import GraphError, context_args, create_nodes
from sage_ros.core.metabolism import MetabolicState
from sage_ros.core.trust import KIND_SENSOR
from sage_ros.nodes.common import LATCHED, RELIABLE
from sage_ros.nodes.kernel import KernelNode
from node_harness import Harness, wait_for

ALL_STATES = QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE,
                        durability=DurabilityPolicy.TRANSIENT_LOCAL)
FAST = {'kernel:salience.text_embedder': 'ngram', 'kernel:state_file': 'none',
        'kernel:metabolism.circadian_period_s': 0.0, 'kernel:metabolism.min_dwell_s': 0.0}


class FakeBlock:
    """A block server in the probe node: answers at once, or holds goals until cancelled."""

    def __init__(self, h: Harness, action: Any, name: str, capability: str,
                 hold: bool = False) -> None:
        self.action, self.hold = action, hold
        self.requests: List[Any] = []
        self.cancelled: List[int] = []
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
            action_type=f'sage_interfaces/action/{type_name}', loaded=True))

    def _execute(self, gh: ServerGoalHandle) -> Any:
        goal = gh.request
        self.requests.append(goal)
        while self.hold and not gh.is_cancel_requested:
            time.sleep(0.01)
        if gh.is_cancel_requested:
            self.cancelled.append(goal.turn_id)
            gh.canceled()
            return self.action.Result(error_code=self.action.Result.CANCELLED)
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
                               fallback='large not loaded')


@pytest.fixture
def kernel_harness(harness: Callable[..., Harness]) -> Callable[..., Harness]:
    def make(**overrides: Any) -> Harness:
        return harness((graph.KERNEL,), **{**FAST, **overrides})
    return make


def say(h: Harness, *lines: str) -> None:
    pub = h.probe.create_publisher(String, names.TEXT_IN, RELIABLE)
    wait_for(lambda: pub.get_subscription_count() > 0, 10, 'kernel subscribed')
    for line in lines:
        pub.publish(String(data=line))


def known_blocks(states: List[KernelState], *blocks: str) -> Callable[[], bool]:
    return lambda: bool(states) and set(blocks) <= set(states[-1].blocks)


def test_complex_salient_requests_go_to_the_reasoning_action(
        kernel_harness: Callable[..., Harness]) -> None:
    h = kernel_harness(**{'kernel:routing.reasoning_min_salience': 0.2})
    language = FakeBlock(h, Language, 'language', 'conversation')
    reasoning = FakeBlock(h, Reasoning, 'reasoning', 'reasoning')
    responses = h.collect(Response, names.RESPONSE)
    chunks = h.collect(ResponseChunk, names.RESPONSE_STREAM)
    states = h.collect(KernelState, names.STATE, ALL_STATES)
    wait_for(known_blocks(states, 'language', 'reasoning'), 10, 'kernel knows both blocks')
    say(h, 'Design a charging schedule for three robots', 'hi')
    wait_for(lambda: len(responses) == 2, 20, 'two responses')
    by_turn = {r.turn_id: r for r in responses}
    r1, r2 = by_turn[1], by_turn[2]
    assert len(reasoning.requests) == 1 and len(language.requests) == 1
    goal = reasoning.requests[0]
    assert goal.turn_id == 1 and goal.problem == 'Design a charging schedule for three robots'
    # The 30 ATP grant less the run the kernel charges itself: reported + run <= grant.
    assert goal.atp_budget == pytest.approx(29.0) and goal.max_steps == 0
    # A language goal's answer is always capped by what its grant pays for.
    assert language.requests[0].max_new_tokens == 128
    assert language.requests[0].atp_budget == pytest.approx(128 * 0.05)
    assert r1.status == Response.STATUS_OK and r1.block == 'reasoning'
    assert r1.text == 'reasoned: Design a charging schedule for three robots'
    assert r1.complexity == 'complex' and r1.atp_spent == pytest.approx(5.0)  # run + reported
    assert r2.block == 'language' and r2.requested_role == 'large'
    assert r2.fallback == 'large not loaded' and language.requests[0].complexity == 'simple'
    assert [c.turn_id for c in chunks] == [2]             # reasoning progress is not text
    assert all(r.salience > 0 and r.metabolic_state == 'WAKE' for r in responses)
    wait_for(lambda: states[-1].active_dispatches == 0, 10, 'settled')
    trust = {(t.name, t.kind): t for t in states[-1].trust}
    assert trust[('reasoning', 'block')].outcomes == 1
    assert trust[('reasoning', 'block')].trust > 0.5 and trust[('text', 'sensor')].outcomes == 2


def test_a_salient_observation_preempts_a_running_goal_through_cancel(
        kernel_harness: Callable[..., Harness]) -> None:
    h = kernel_harness(**{'kernel:metabolism.focus_enter': 0.5,
                          'kernel:metabolism.focus_exit': 0.3})
    language = FakeBlock(h, Language, 'language', 'conversation', hold=True)
    responses = h.collect(Response, names.RESPONSE)
    states = h.collect(KernelState, names.STATE, ALL_STATES)
    wait_for(known_blocks(states, 'language'), 10, 'kernel knows the block')
    say(h, 'status report one, all nominal')
    wait_for(lambda: len(language.requests) == 1, 10, 'first goal running')
    say(h, 'FIRE!!! EVERYONE OUT OF THE BUILDING NOW!!!')
    wait_for(lambda: language.cancelled == [1], 10, 'the first goal cancelled')
    wait_for(lambda: len(responses) == 1, 10, 'the preempted turn answered')
    assert responses[0].turn_id == 1 and responses[0].status == Response.STATUS_FAILED
    assert responses[0].error.startswith('preempted by turn 2')
    wait_for(lambda: len(language.requests) == 2, 10, 'the salient turn dispatched')
    assert language.requests[1].turn_id == 2
    assert any(s.metabolic_state == 'FOCUS' and s.previous_state == 'WAKE'
               and 'salience' in s.transition_reason for s in states)
    language.hold = False
    wait_for(lambda: len(responses) == 2 and responses[1].status == Response.STATUS_OK, 10,
             'the salient turn answered')


def test_a_stuck_goal_times_out_is_cancelled_and_fails(
        kernel_harness: Callable[..., Harness]) -> None:
    h = kernel_harness(**{'kernel:routing.language_deadline_s': 0.5})
    language = FakeBlock(h, Language, 'language', 'conversation', hold=True)
    responses = h.collect(Response, names.RESPONSE)
    states = h.collect(KernelState, names.STATE, ALL_STATES)
    wait_for(known_blocks(states, 'language'), 10, 'kernel knows the block')
    say(h, 'hello')
    wait_for(lambda: len(responses) == 1, 10, 'a response')
    assert responses[0].status == Response.STATUS_FAILED
    assert "no result from 'language' within 0.5 s" in responses[0].error
    wait_for(lambda: language.cancelled == [1], 10, 'the goal cancelled')
    wait_for(lambda: states[-1].active_dispatches == 0, 10, 'settled')
    assert {t.name: t.trust for t in states[-1].trust}['language'] < 0.5


def test_no_block_and_bad_input_are_rejected_with_reasons(
        kernel_harness: Callable[..., Harness]) -> None:
    h = kernel_harness()
    responses = h.collect(Response, names.RESPONSE)
    say(h, 'hello', '\x07')
    wait_for(lambda: len(responses) == 2, 10, 'two rejections')
    by_turn = {r.turn_id: r for r in responses}
    assert by_turn[1].status == Response.STATUS_REJECTED and 'no loaded block' in by_turn[1].error
    assert by_turn[1].salience > 0 and by_turn[1].metabolic_state == 'WAKE'
    assert 'control characters' in by_turn[2].error


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
    section = yaml.safe_load(graph.params_path(graph.PROFILES[profile]).read_text())
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
    text = graph.params_path(graph.PROFILES[profile]).read_text()
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
