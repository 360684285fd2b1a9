"""Reasoning block node: the `blocks/reasoning` action over `core.reasoning.ReasoningEngine`.

Sub-steps go to the language block as ephemeral `blocks/language` goals; the final integration
goal is recorded in the conversation, with the partial results as its context. Goals run one at
a time from a bounded FIFO (`max_goals`, `concurrency` 1 in the description). The block follows
the language block by heartbeat: `loaded` and its own heartbeat's `ready` say whether the
language block is alive and ready and the sentence embeddings are available; a step whose
language block stops or restarts fails at once with the reason.
"""

from __future__ import annotations

import re
import threading
from typing import List, Optional, Tuple

from rclpy.action import ActionServer, GoalResponse
from rclpy.action.server import ServerGoalHandle
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from sage_interfaces.action import Language, Reasoning
from sage_interfaces.msg import BlockDescription

from .. import names
from ..core.embeddings import EmbeddingError, minilm_path
from ..core.params import param_docs
from ..core.reasoning import (HaltReason, InvalidProblem, LanguageCancelled, LanguageFailed,
                              LanguageReply, LanguageRequest, ReasoningBlock, ReasoningEngine,
                              ReasoningParams, StepRecord, StopFn)
from .action_call import (CallCancelled, CallError, Dependency, ThreadSafeActionClient,
                          call_action)
from .common import LATCHED, RESULT_KEEP_S, ConfigError, declare, run_node, stamp
from .goal_queue import GoalQueue, answer_dropped
from .liveness import HeartbeatPublisher, declare_liveness_timeout

ACTION_TYPE = 'sage_interfaces/action/Reasoning'
STOP_WAIT_S = 2.5     # [s] destroy_node waits this long for the running goal to stop


class LanguageClient:
    """`core.reasoning.LanguageFn` over the language block's action; a step whose language
    block stops or restarts fails at once (`Dependency`)."""

    def __init__(self, node: Node, language: Dependency, server_wait_s: float,
                 timeout_s: float, cancel_wait_s: float, stopping: threading.Event) -> None:
        self._node = node
        self.client = ThreadSafeActionClient(node, Language, names.BLOCK_LANGUAGE,
                                             callback_group=ReentrantCallbackGroup())
        self.language = language
        self._server_wait_s = server_wait_s
        self._timeout_s = timeout_s
        self._cancel_wait_s = cancel_wait_s
        self._stopping = stopping

    def __call__(self, req: LanguageRequest, should_stop: StopFn) -> LanguageReply:
        goal = Language.Goal(turn_id=req.turn_id, text=req.text, complexity=req.complexity,
                             atp_budget=float(req.atp_budget), max_new_tokens=req.max_new_tokens,
                             ephemeral=req.ephemeral, context=req.context)
        try:
            wrapped = call_action(
                self.client, goal, what='language block', server_wait_s=self._server_wait_s,
                timeout_s=self._timeout_s,
                should_stop=lambda: should_stop() or self._stopping.is_set(),
                gone=self.language.guard(), abandon=self._stopping.is_set,
                cancel_wait_s=self._cancel_wait_s)
        except CallCancelled:
            raise LanguageCancelled() from None
        except CallError as exc:
            raise LanguageFailed(f'{req.kind.value} step: {exc}') from None
        res: Language.Result = wrapped.result
        if res.error_code == res.CANCELLED:
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
    """Serves `blocks/reasoning`, and advertises the block while the language block is ready."""

    def __init__(self, node_name: str = names.REASONING_BLOCK, **kwargs: object) -> None:
        super().__init__(node_name, **kwargs)  # type: ignore[arg-type]
        params = declare_params(self)
        self._cancel_wait_s = declare(self, 'cancel_wait_s', 2.0,
                                      'How long a cancelled step waits for the language block '
                                      'to confirm [s]', read_only=True, min_value=0.0,
                                      max_value=60.0)
        self._stopping = threading.Event()
        language_name = names.qualify(names.LANGUAGE_BLOCK, self.get_namespace())
        self.language = Dependency(self, language_name, 'language block',
                                   declare_liveness_timeout(self), on_change=self._check_language)
        self._language = LanguageClient(
            self, self.language,
            server_wait_s=declare(self, 'language_wait_s', 10.0,
                                  'How long to wait for the language block per step [s]',
                                  read_only=True, min_value=0.0, max_value=3600.0),
            timeout_s=declare(self, 'language_timeout_s', 300.0,
                              'Longest one language step may take [s]', read_only=True,
                              min_value=1.0, max_value=86400.0),
            cancel_wait_s=self._cancel_wait_s, stopping=self._stopping)
        availability_period_s = declare(self, 'availability_period_s', 0.25,
                                        'How often the language block\'s readiness is checked '
                                        '(heartbeats also trigger a check) [s]', read_only=True,
                                        min_value=0.05, max_value=3600.0)
        declare(self, 'max_goals', 2,
                'Goals running or waiting at once (one runs, the others wait in FIFO order); '
                'more are refused', min_value=1, max_value=64)
        self.engine = ReasoningEngine(self._language, params)
        self.block = ReasoningBlock(self.engine)
        try:
            minilm_path()     # the energy is measured with MiniLM sentence embeddings
        except EmbeddingError as exc:
            self.block.embedder_error = str(exc)
            self.get_logger().error(f'reasoning unavailable (advertised not loaded): {exc}')
        self._ready_lock = threading.Lock()
        self._check_lock = threading.Lock()
        self._language_state: Tuple[bool, str] = (False, 'starting')

        self._heartbeat = HeartbeatPublisher(self, 'reasoning', self._liveness)
        self.queue = GoalQueue('reasoning block',
                               lambda: int(self.get_parameter('max_goals').value), self._dropped,
                               concurrency=1, on_change=self._heartbeat.publish)
        self._server = ActionServer(
            self, Reasoning, names.BLOCK_REASONING, execute_callback=self.queue.wrap(self._reason),
            goal_callback=self._on_goal, handle_accepted_callback=self.queue.handle_accepted,
            cancel_callback=self.queue.cancel_callback,
            callback_group=MutuallyExclusiveCallbackGroup(), result_timeout=RESULT_KEEP_S)
        self._description_pub = self.create_publisher(BlockDescription, names.BLOCKS_DESCRIPTION,
                                                      LATCHED)
        self._publish_description()
        self._timer = self.create_timer(availability_period_s, self._check_language,
                                        callback_group=MutuallyExclusiveCallbackGroup())
        self.get_logger().info(
            f'reasoning block on {self.resolve_topic_name(names.BLOCK_REASONING)} '
            f'(language block {language_name}, at least {self.engine.min_budget():.2f} ATP per '
            'goal)')

    def _publish_description(self) -> None:
        desc = self.block.describe(self.resolve_topic_name(names.BLOCK_REASONING), ACTION_TYPE)
        self._description_pub.publish(BlockDescription(
            stamp=stamp(), name=desc.name, block_type=desc.block_type.value,
            capabilities=list(desc.capabilities), modalities=list(desc.modalities),
            action_name=desc.action_name, action_type=desc.action_type, loaded=desc.loaded,
            memory_estimate_bytes=desc.memory_estimate_bytes,
            concurrency=self.queue.concurrency))

    def language_readiness(self) -> Tuple[bool, str]:
        """The language block alive and ready (its heartbeat) and its action server reachable."""
        ok, why = self.language.state()
        if ok and not self._language.client.server_is_ready():
            return False, (f'language block action not reachable on '
                           f'{self.resolve_topic_name(names.BLOCK_LANGUAGE)}')
        return ok, why

    def _check_language(self) -> None:
        """Advertise `loaded` = whether the language block is ready; log each change once."""
        with self._check_lock:     # one check at a time: the last one out is never stale
            if self._stopping.is_set():
                return
            state = self.language_readiness()
            with self._ready_lock:
                changed, self._language_state = state != self._language_state, state
                if changed:
                    self.block.language_available = state[0]
            if not changed:
                return
            self._publish_description()
            self._heartbeat.publish()
            if self.block.embedder_error:
                return    # said once at start: reasoning stays unavailable
            if state[0]:
                self.get_logger().info('language block ready: reasoning available')
            else:
                self.get_logger().warning(f'reasoning unavailable: {state[1]}')

    def _liveness(self) -> Tuple[bool, str, int, int]:
        active, queued = self.queue.counts()
        with self._ready_lock:
            ok, why = self._language_state
        if self.block.embedder_error:
            ok, why = False, f'sentence embeddings unavailable: {self.block.embedder_error}'
        if self._stopping.is_set():
            ok, why = False, 'shutting down'
        return ok, why, active, queued

    def _on_goal(self, goal: Reasoning.Goal) -> GoalResponse:
        refusal = 'shutting down' if self._stopping.is_set() else self.queue.refusal()
        if refusal:
            self.get_logger().warning(f'turn {goal.turn_id}: refused, {refusal}')
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def _dropped(self, gh: ServerGoalHandle, reason: Optional[str]) -> Reasoning.Result:
        return answer_dropped(gh, Reasoning.Result(), reason, Reasoning.Result.FAILED)

    def _reason(self, gh: ServerGoalHandle) -> Reasoning.Result:
        goal: Reasoning.Goal = gh.request
        result = Reasoning.Result()
        if gh.is_cancel_requested:     # cancelled just as its turn came
            gh.canceled()
            result.error_code, result.error_msg = result.CANCELLED, 'cancelled'
            return result
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
        """Bounded (~3 s): the running goal's language step is cancelled, not waited out;
        waiting goals are answered."""
        self._stopping.set()
        self._heartbeat.publish_last()
        self.queue.close('the reasoning block is shutting down')
        self.queue.drop_queued('the reasoning block is shutting down')
        if not self.queue.wait_idle(STOP_WAIT_S):
            self.get_logger().warning('a goal was still running at shutdown')
        self._server.destroy()
        super().destroy_node()


def main(args: Optional[List[str]] = None) -> int:
    return run_node(ReasoningBlockNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
