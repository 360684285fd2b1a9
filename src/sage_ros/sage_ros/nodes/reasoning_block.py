"""Reasoning block node: the `blocks/reasoning` action over `core.reasoning.ReasoningEngine`.

Sub-steps go to the language block as ephemeral `blocks/language` goals; the final integration
goal is recorded in the conversation, with the partial results as its context.
"""

from __future__ import annotations

import re
import threading
import time
from typing import List, Optional

from action_msgs.msg import GoalStatus
from rclpy.action import ActionClient, ActionServer, CancelResponse, GoalResponse
from rclpy.action.server import ServerGoalHandle
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node
from sage_interfaces.action import Language, Reasoning
from sage_interfaces.msg import BlockDescription

from .. import names
from ..core.embeddings import EmbeddingError, minilm_path
from ..core.params import param_docs
from ..core.reasoning import (HaltReason, InvalidProblem, LanguageCancelled, LanguageFailed,
                              LanguageReply, LanguageRequest, ReasoningBlock, ReasoningEngine,
                              ReasoningParams, StepRecord, StopFn)
from .common import LATCHED, ConfigError, declare, run_node, stamp

ACTION_TYPE = 'sage_interfaces/action/Reasoning'


class LanguageClient:
    """`core.reasoning.LanguageFn` over the language block's action, for one reasoning goal."""

    def __init__(self, node: Node, server_wait_s: float, timeout_s: float,
                 cancel_wait_s: float) -> None:
        self._node = node
        self.client = ActionClient(node, Language, names.BLOCK_LANGUAGE,
                                   callback_group=ReentrantCallbackGroup())
        self._server_wait_s = server_wait_s
        self._timeout_s = timeout_s
        self._cancel_wait_s = cancel_wait_s

    def __call__(self, req: LanguageRequest, should_stop: StopFn) -> LanguageReply:
        if not self.client.wait_for_server(timeout_sec=self._server_wait_s):
            raise LanguageFailed(f'language block not reachable on '
                                 f'{self._node.resolve_topic_name(names.BLOCK_LANGUAGE)}')
        goal = Language.Goal(turn_id=req.turn_id, text=req.text, complexity=req.complexity,
                             atp_budget=float(req.atp_budget), max_new_tokens=req.max_new_tokens,
                             ephemeral=req.ephemeral, context=req.context)
        done = threading.Event()
        sent = self.client.send_goal_async(goal)
        sent.add_done_callback(lambda _: done.set())
        if not done.wait(self._server_wait_s):
            raise LanguageFailed('language block did not answer the goal request')
        handle = sent.result()
        if handle is None or not handle.accepted:
            raise LanguageFailed(f'language block refused the {req.kind.value} step')
        done.clear()
        result_future = handle.get_result_async()
        result_future.add_done_callback(lambda _: done.set())
        deadline = time.monotonic() + self._timeout_s
        while not done.wait(0.05):
            if should_stop() or time.monotonic() > deadline:
                handle.cancel_goal_async()
                done.wait(self._cancel_wait_s)
                if time.monotonic() > deadline:
                    raise LanguageFailed(f'{req.kind.value} step took longer than '
                                         f'{self._timeout_s:.0f} s')
                raise LanguageCancelled()
        wrapped = result_future.result()
        res: Language.Result = wrapped.result
        if wrapped.status == GoalStatus.STATUS_CANCELED or res.error_code == res.CANCELLED:
            raise LanguageCancelled()
        if res.error_code != res.NONE:
            raise LanguageFailed(res.error_msg or f'language step failed (code {res.error_code})')
        return LanguageReply(text=res.text, completion_tokens=res.completion_tokens,
                             model=res.model, role=res.role, swapped=res.swapped)


def declare_params(node: Node) -> ReasoningParams:
    """Every engine constant as a parameter, documented and ranged from the core; errors name
    the parameter."""
    docs = param_docs(ReasoningParams)
    # Read once into the engine at start-up: read-only, so `ros2 param set` cannot pretend.
    values = {d.name: declare(node, d.param, d.default,
                              d.doc + (f' [{d.unit}]' if d.unit else ''), read_only=True,
                              min_value=d.lo, max_value=d.hi)
              for d in docs}
    try:
        return ReasoningParams(**values)
    except ValueError as exc:
        message = str(exc)
        for d in docs:
            message = re.sub(rf'\b{d.name}\b', d.param, message)
        raise ConfigError(f'reasoning block parameters: {message}') from exc


class ReasoningBlockNode(Node):
    """Serves `blocks/reasoning`, and advertises the block while the language block is up."""

    def __init__(self, node_name: str = 'reasoning_block', **kwargs: object) -> None:
        super().__init__(node_name, **kwargs)  # type: ignore[arg-type]
        params = declare_params(self)
        self._cancel_wait_s = declare(self, 'cancel_wait_s', 2.0,
                                      'How long a cancelled step waits for the language block '
                                      'to confirm [s]', read_only=True, min_value=0.0,
                                      max_value=60.0)
        self._language = LanguageClient(
            self,
            server_wait_s=declare(self, 'language_wait_s', 10.0,
                                  'How long to wait for the language block per step [s]',
                                  read_only=True, min_value=0.0, max_value=3600.0),
            timeout_s=declare(self, 'language_timeout_s', 300.0,
                              'Longest one language step may take [s]', read_only=True,
                              min_value=1.0, max_value=86400.0),
            cancel_wait_s=self._cancel_wait_s)
        availability_period_s = declare(self, 'availability_period_s', 2.0,
                                        'How often the language block\'s reachability is checked '
                                        '[s]', read_only=True, min_value=0.05, max_value=3600.0)
        self._max_goals: int = declare(
            self, 'max_goals', 2, 'Goals running at once; more are refused (each holds an '
            'executor thread while its language steps run)', read_only=True, min_value=1,
            max_value=64)
        self.engine = ReasoningEngine(self._language, params)
        self.block = ReasoningBlock(self.engine)
        try:
            minilm_path()     # the energy is measured with MiniLM sentence embeddings
        except EmbeddingError as exc:
            self.block.embedder_error = str(exc)
            self.get_logger().error(f'reasoning unavailable (advertised not loaded): {exc}')
        self._stopping = threading.Event()
        self._running = 0                        # goals accepted and not yet finished
        self._running_changed = threading.Condition()

        self._server = ActionServer(
            self, Reasoning, names.BLOCK_REASONING, execute_callback=self._execute,
            goal_callback=self._on_goal,
            cancel_callback=lambda _: CancelResponse.ACCEPT,
            callback_group=ReentrantCallbackGroup())
        self._description_pub = self.create_publisher(BlockDescription, names.BLOCKS_DESCRIPTION,
                                                      LATCHED)
        self._publish_description()
        self._timer = self.create_timer(availability_period_s, self._check_language)
        self.get_logger().info(
            f'reasoning block ready on {self.resolve_topic_name(names.BLOCK_REASONING)} '
            f'(language block on {self.resolve_topic_name(names.BLOCK_LANGUAGE)}, '
            f'at least {self.engine.min_budget():.2f} ATP per goal)')

    def _publish_description(self) -> None:
        desc = self.block.describe(self.resolve_topic_name(names.BLOCK_REASONING), ACTION_TYPE)
        self._description_pub.publish(BlockDescription(
            stamp=stamp(), name=desc.name, block_type=desc.block_type.value,
            capabilities=list(desc.capabilities), modalities=list(desc.modalities),
            action_name=desc.action_name, action_type=desc.action_type, loaded=desc.loaded,
            memory_estimate_bytes=desc.memory_estimate_bytes))

    def _check_language(self) -> None:
        """Advertise `loaded` = whether the language block's action server is reachable."""
        ready = self._language.client.server_is_ready()
        if ready != self.block.language_available:
            self.block.language_available = ready
            self._publish_description()
            if self.block.embedder_error:
                return    # said once at start: reasoning stays unavailable
            self.get_logger().info('language block reachable: reasoning available' if ready else
                                   'language block unreachable: reasoning unavailable')

    def _on_goal(self, goal: Reasoning.Goal) -> GoalResponse:
        with self._running_changed:
            if self._running >= self._max_goals:
                self.get_logger().warning(f'turn {goal.turn_id}: refused, {self._running} goals '
                                          'already running (max_goals)')
                return GoalResponse.REJECT
            self._running += 1   # counted from acceptance: execution starts a moment later
        return GoalResponse.ACCEPT

    def _execute(self, gh: ServerGoalHandle) -> Reasoning.Result:
        try:
            return self._reason(gh)
        finally:
            with self._running_changed:
                self._running -= 1
                self._running_changed.notify_all()

    def _reason(self, gh: ServerGoalHandle) -> Reasoning.Result:
        goal: Reasoning.Goal = gh.request
        result = Reasoning.Result()
        if self.block.embedder_error:
            self.get_logger().error(f'turn {goal.turn_id}: reasoning unavailable: '
                                    f'{self.block.embedder_error}')
            gh.abort()
            result.error_code = result.FAILED
            result.error_msg = f'reasoning unavailable: {self.block.embedder_error}'
            return result
        try:
            state = self.engine.init_state(goal.problem, goal.atp_budget, goal.max_steps,
                                           goal.turn_id)
        except InvalidProblem as exc:
            self.get_logger().warning(f'turn {goal.turn_id}: refused, {exc}')
            gh.abort()
            result.error_code, result.error_msg = result.INVALID_INPUT, str(exc)
            return result
        self.get_logger().info(f'turn {goal.turn_id}: reasoning with {goal.atp_budget:.1f} ATP, '
                               f'at most {state.step_cap} steps')

        def on_step(rec: StepRecord) -> None:
            self.get_logger().info(f'turn {goal.turn_id} step {rec.step} {rec.kind.value}: '
                                   f'{rec.summary}')
            gh.publish_feedback(Reasoning.Feedback(step=rec.step, energy=rec.energy,
                                                   summary=rec.summary))

        outcome = self.engine.run(
            state, on_step, should_stop=lambda: gh.is_cancel_requested or self._stopping.is_set())
        result.answer, result.steps = outcome.answer, outcome.steps
        result.final_energy, result.converged = outcome.final_energy, outcome.converged
        result.atp_spent = outcome.atp_spent
        result.model, result.role, result.swapped = outcome.model, outcome.role, outcome.swapped
        result.completion_tokens = outcome.completion_tokens
        if outcome.halt is HaltReason.CANCELLED:
            self.get_logger().info(f'turn {goal.turn_id}: cancelled after {outcome.steps} steps')
            result.error_code, result.error_msg = result.CANCELLED, 'cancelled'
            if gh.is_cancel_requested:
                gh.canceled()
            else:
                gh.abort()   # the node is shutting down
            return result
        if outcome.halt is HaltReason.FAILED:
            self.get_logger().error(f'turn {goal.turn_id}: {outcome.error}')
            result.error_code, result.error_msg = result.FAILED, outcome.error
            gh.abort()
            return result
        self.get_logger().info(
            f'turn {goal.turn_id}: answered in {outcome.steps} steps (halt: {outcome.halt.value}, '
            f'energy {outcome.final_energy:.2f}, {outcome.atp_spent:.1f}/{goal.atp_budget:.1f} '
            f'ATP)')
        gh.succeed()
        return result

    def destroy_node(self) -> None:
        """Stop running goals (their language steps are cancelled) before going away."""
        self._stopping.set()
        with self._running_changed:
            self._running_changed.wait_for(lambda: self._running == 0,
                                           timeout=self._cancel_wait_s + 1.0)
        self._server.destroy()
        super().destroy_node()


def main(args: Optional[List[str]] = None) -> int:
    return run_node(ReasoningBlockNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
