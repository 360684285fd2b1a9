"""Language block node: the `blocks/language` action over `core.language.LanguageBlock`.

One conversation, so one goal at a time: goals wait in a bounded FIFO (`max_goals`) holding no
executor thread, and answers come out in the order the turns came in (`concurrency` 1 in the
block description). The block follows its model manager by heartbeat and `models/status`:
`loaded` in the description and `ready` in its own heartbeat say whether the model manager is
alive, active, has a model loaded and its `generate` server is reachable. A generation whose
model manager stops (killed, hung) or restarts fails at once with the reason; a restarted model
manager is used again as soon as it is ready.

MODEL_UNAVAILABLE means only that the model manager could not take the turn: it is unreachable,
gone (stopped, restarted), inactive or not ready (the kernel puts such a turn back in line
once). Every other failure (a generation past `generate_timeout_s`, a model that failed to load
or to generate, an unknown role, input the model manager refused) is FAILED with its message.
A turn refused for not being ready, or lost with its model manager, makes the block check its
readiness at once, so its next heartbeat says not ready.

Before each turn that is not ephemeral the block asks the memory block (`blocks/memory`
RECALL, `memory.recall_k` memories within `memory.recall_timeout_s`) for the awakening preamble
and what is relevant, and passes them in the Generate goal; the model manager fits what fits.
A memory block that is absent, unreachable or slow costs that turn its memory, never the turn:
the outage is logged once, and its end once. A user's "remember that ..." is stored by the
memory block from the kernel's journal, not here.

`temperature`, `roles.*`, `system_prompt`, `max_new_tokens`, `max_exchanges`, `length_hint`,
`max_goals`, `memory.*` and the two waits take effect when set at run time (`ros2 param set`);
`router` is read-only.
"""

from __future__ import annotations

import threading
from typing import Any, List, Optional, Sequence, Tuple

from rcl_interfaces.msg import SetParametersResult
from rclpy.action import ActionServer, GoalResponse
from rclpy.action.server import ServerGoalHandle
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.node import Node
from rclpy.parameter import Parameter
from sage_interfaces.action import Generate, Language, Memory
from sage_interfaces.msg import BlockDescription, ChatMessage, ModelStatus
from sage_interfaces.srv import ResetConversation

from .. import names
from ..core.conversation import DEFAULT_SYSTEM_PROMPT, ChatTurn, Conversation
from ..core.language import LanguageBlock, Recalled, memory_line
from ..core.models import Cancelled, GenerationResult, ModelError, StopFn, TextFn
from ..core.routing import Complexity, RoleMap
from .action_call import (CallCancelled, CallError, Dependency, ServerGone, ServerUnavailable,
                          ThreadSafeActionClient, call_action)
from .common import LATCHED, RESULT_KEEP_S, ConfigError, declare, declare_router, run_node, stamp
from .goal_queue import GoalQueue, answer_dropped
from .liveness import HeartbeatPublisher, declare_liveness_timeout, requester
from .manager_readiness import ManagerReadiness

STOP_WAIT_S = 2.5     # [s] destroy_node waits this long for the running goal to stop
ROLE_PARAMS = tuple(f'roles.{c.value}' for c in Complexity)
# Applied at run time by the post-set callback (the others are read-only or read per use).
RUNTIME_PARAMS = frozenset((*ROLE_PARAMS, 'system_prompt', 'max_exchanges', 'max_new_tokens',
                            'temperature', 'length_hint', 'model_manager_wait_s',
                            'generate_timeout_s'))


class ModelUnavailable(ModelError):
    """The model manager could not take the generation: unreachable, gone (stopped,
    restarted) or inactive."""


class ModelManagerClient:
    """`core.models.Generator` over the model manager's `generate` action; a generation whose
    model manager stops or restarts fails at once (`Dependency`)."""

    def __init__(self, node: Node, manager: Dependency, server_wait_s: float, timeout_s: float,
                 stopping: threading.Event) -> None:
        self._node = node
        self.client = ThreadSafeActionClient(node, Generate, names.MODEL_GENERATE,
                                             callback_group=ReentrantCallbackGroup())
        self.manager = manager
        self.server_wait_s = server_wait_s
        self.timeout_s = timeout_s
        self._stopping = stopping

    def generate(self, role: str, messages: Sequence[ChatTurn], max_new_tokens: int = 0,
                 temperature: float = 0.0, on_text: Optional[TextFn] = None,
                 should_stop: Optional[StopFn] = None,
                 complexity: Optional[str] = None, preamble: str = '',
                 memory: Sequence[str] = ()) -> GenerationResult:
        goal = Generate.Goal(role=role, max_new_tokens=max_new_tokens, temperature=temperature,
                             complexity=complexity or '', messages=[
                                 ChatMessage(role=m.role, content=m.content) for m in messages],
                             preamble=preamble, memory=list(memory))
        goal.requester, goal.requester_instance = requester(self._node)
        stop = should_stop or (lambda: False)
        try:
            wrapped = call_action(
                self.client, goal, what='model manager', server_wait_s=self.server_wait_s,
                timeout_s=self.timeout_s, should_stop=lambda: stop() or self._stopping.is_set(),
                on_feedback=(lambda fb: on_text(fb.feedback.text)) if on_text else None,
                gone=self.manager.guard(), abandon=self._stopping.is_set)
        except CallCancelled as exc:
            raise Cancelled(str(exc)) from None
        except (ServerUnavailable, ServerGone) as exc:
            raise ModelUnavailable(str(exc)) from None
        except CallError as exc:      # a timeout: the model manager took it but did not finish
            raise ModelError(str(exc)) from None
        res: Generate.Result = wrapped.result
        if res.error_code == res.CANCELLED and not stop():
            # The model manager took this node for gone (its heartbeats late): a failure with
            # its reason, not a cancel of ours.
            raise ModelError(f'the model manager stopped the generation: {res.error_msg}')
        if res.error_code == res.CANCELLED:
            raise Cancelled('generation cancelled')
        if res.error_code == res.INACTIVE:
            raise ModelUnavailable(res.error_msg or 'model manager not active')
        if res.error_code != res.NONE:
            raise ModelError(res.error_msg or f'generation failed (code {res.error_code})')
        return GenerationResult(text=res.text, model_id=res.model, role=res.role,
                                swapped=res.swapped, prompt_tokens=res.prompt_tokens,
                                completion_tokens=res.completion_tokens,
                                time_to_first_token_s=res.time_to_first_token_s,
                                duration_s=res.duration_s, requested_role=res.requested_role,
                                fallback=res.fallback, truncated=res.truncated,
                                memory_used=res.memory_used)


class MemoryRecallClient:
    """`core.language.RecallFn` over the memory block's RECALL: bounded by a short timeout,
    and never an error: without an answer the turn goes on without memory. An outage (absent,
    unreachable, failing, slow) is logged once when it starts and once when it ends."""

    def __init__(self, node: Node, stopping: threading.Event) -> None:
        self._node = node
        self.client = ThreadSafeActionClient(node, Memory, names.BLOCK_MEMORY,
                                             callback_group=ReentrantCallbackGroup())
        self._stopping = stopping
        self._lock = threading.Lock()
        self.outage = 'not asked yet'     # why memory is not answering ('' = answering)
        self._said = False

    def __call__(self, text: str) -> Recalled:
        p = self._node.get_parameter
        if not p('memory.enabled').value:
            return Recalled()
        goal = Memory.Goal(operation=Memory.Goal.OP_RECALL, text=text,
                           max_results=int(p('memory.recall_k').value))
        timeout_s = float(p('memory.recall_timeout_s').value)
        try:
            # No wait for an absent server: a turn never waits for memory to come up.
            wrapped = call_action(self.client, goal, what='memory block', server_wait_s=0.0,
                                  timeout_s=timeout_s, should_stop=self._stopping.is_set,
                                  abandon=lambda: True, cancel_wait_s=0.0)
        except CallError as exc:
            self._down(str(exc))
            return Recalled()
        res: Memory.Result = wrapped.result
        if res.error_code != res.NONE:
            self._down(res.error_msg or f'recall failed (code {res.error_code})')
            return Recalled()
        self._up()
        return Recalled(res.preamble, tuple(memory_line(i.kind, i.text, int(i.session))
                                            for i in res.items))

    def _down(self, why: str) -> None:
        with self._lock:
            said, self._said, self.outage = self._said, True, why
        if not said:
            self._node.get_logger().warning(f'memory unavailable ({why}): answering without '
                                            'memory until it is back')

    def _up(self) -> None:
        with self._lock:
            said, self._said, self.outage = self._said, False, ''
        if said:
            self._node.get_logger().info('memory block answering again: turns recall memory')


class LanguageBlockNode(Node):
    """Serves `blocks/language`, advertises the block, and resets the conversation on request."""

    def __init__(self, node_name: str = names.LANGUAGE_BLOCK, **kwargs: object) -> None:
        super().__init__(node_name, **kwargs)  # type: ignore[arg-type]
        d = RoleMap()
        try:
            roles = RoleMap(**{c.value: declare(
                self, f'roles.{c.value}', getattr(d, c.value),
                f'Model role that answers {c.value} requests') for c in Complexity})
            conversation = Conversation(
                system_prompt=declare(self, 'system_prompt', DEFAULT_SYSTEM_PROMPT,
                                      'System prompt that opens every conversation'),
                max_exchanges=declare(self, 'max_exchanges', 64,
                                      'User/assistant exchanges kept in memory; what a model sees '
                                      'is fitted to its context window, older turns summarised',
                                      min_value=1, max_value=1000))
        except ValueError as exc:
            raise ConfigError(f'language block parameters: {exc}') from exc
        max_new_tokens = declare(self, 'max_new_tokens', 0,
                                 'Cap on answer length [tokens]; 0 = the model role\'s default',
                                 min_value=0, max_value=100_000)
        temperature = declare(self, 'temperature', 0.0, 'Sampling temperature; 0 = greedy',
                              min_value=0.0, max_value=5.0)
        length_hint = declare(self, 'length_hint', True,
                              'Tell the model its length budget in the system prompt when a turn '
                              'comes with a token cap (an ATP grant), so it ends on a sentence')
        declare(self, 'max_goals', 8,
                'Goals running or waiting at once (one runs, the others wait in FIFO order); '
                'more are refused', min_value=1, max_value=1000)
        self._stopping = threading.Event()
        timeout_s = declare_liveness_timeout(self)
        self._manager_name = names.qualify(names.MODEL_MANAGER, self.get_namespace())
        self.manager = Dependency(self, self._manager_name, 'model manager', timeout_s,
                                  on_change=self._check_ready)
        # Ephemeral goals are the reasoning block's steps: when it stops, nobody waits for them.
        self._requester = Dependency(
            self, names.qualify(names.REASONING_BLOCK, self.get_namespace()), 'reasoning block',
            timeout_s, on_change=self._drop_orphans)
        self.generator = ModelManagerClient(
            self, self.manager,
            server_wait_s=declare(self, 'model_manager_wait_s', 10.0,
                                  'How long to wait for the model manager per request [s]',
                                  min_value=0.0, max_value=3600.0),
            timeout_s=declare(self, 'generate_timeout_s', 300.0,
                              'Longest a generation may take [s]', min_value=1.0,
                              max_value=86400.0),
            stopping=self._stopping)
        classify = declare_router(self, 'for turns that arrive without one')
        declare(self, 'memory.enabled', True,
                'Ask the memory block (blocks/memory) for what is relevant before each turn of '
                'the conversation')
        declare(self, 'memory.recall_k', 5,
                'Memories recalled per turn (pinned ones come on top) [memories]',
                min_value=1, max_value=100)
        declare(self, 'memory.recall_timeout_s', 0.5,
                'Longest a turn waits for the recall; after it the turn goes on without memory '
                '[s]', min_value=0.05, max_value=30.0)
        self.recall = MemoryRecallClient(self, self._stopping)
        self.block = LanguageBlock(self.generator, conversation, roles, max_new_tokens,
                                   temperature, classify, length_hint=length_hint,
                                   recall=self.recall)
        self._turn_lock = threading.Lock()  # the conversation: the running turn, or a reset
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)

        self._requester_lock = threading.Lock()
        self.readiness = ManagerReadiness(
            self, 'language', self.manager, self.generator.client.server_is_ready,
            names.MODEL_GENERATE, self._readiness_changed, self._stopping, needs_loaded=True)
        self.create_subscription(ModelStatus, names.MODELS_STATUS, self.readiness.on_models,
                                 LATCHED, callback_group=MutuallyExclusiveCallbackGroup())
        self._requester_restarts = 0
        self._heartbeat = HeartbeatPublisher(self, 'language', self._liveness)
        self.queue = GoalQueue('language block', lambda: int(self._p('max_goals')), self._dropped,
                               concurrency=1, on_change=self._heartbeat.publish)
        self._server = ActionServer(
            self, Language, names.BLOCK_LANGUAGE, execute_callback=self.queue.wrap(self._execute),
            goal_callback=self._on_goal, handle_accepted_callback=self.queue.handle_accepted,
            cancel_callback=self.queue.cancel_callback,
            callback_group=MutuallyExclusiveCallbackGroup(), result_timeout=RESULT_KEEP_S)
        self.create_service(ResetConversation, names.LANGUAGE_RESET, self._on_reset,
                            callback_group=ReentrantCallbackGroup())
        self._description_pub = self.create_publisher(BlockDescription, names.BLOCKS_DESCRIPTION,
                                                      LATCHED)
        self._publish_description()
        self.create_timer(self._heartbeat.period_s / 2, self._check_ready,
                          callback_group=MutuallyExclusiveCallbackGroup())
        self.get_logger().info(f'language block on {self.resolve_topic_name(names.BLOCK_LANGUAGE)}'
                               f' (roles: {roles}); waiting for the model manager '
                               f'{self._manager_name}')

    def _p(self, name: str) -> Any:
        return self.get_parameter(name).value

    # ---- readiness -----------------------------------------------------------------------
    def _check_ready(self) -> None:
        self.readiness.check()

    def _readiness_changed(self) -> None:
        self._publish_description()
        self._heartbeat.publish()

    def _liveness(self) -> Tuple[bool, str, int, int]:
        active, queued = self.queue.counts()
        ready, why = self.readiness.state
        return ready, why, active, queued

    def _publish_description(self) -> None:
        desc = self.block.describe(self.resolve_topic_name(names.BLOCK_LANGUAGE),
                                   'sage_interfaces/action/Language')
        loaded = self.readiness.state[0]
        self._description_pub.publish(BlockDescription(
            stamp=stamp(), name=desc.name, block_type=desc.block_type.value,
            capabilities=list(desc.capabilities), modalities=list(desc.modalities),
            action_name=desc.action_name, action_type=desc.action_type, loaded=loaded,
            memory_estimate_bytes=desc.memory_estimate_bytes,
            concurrency=self.queue.concurrency))

    # ---- parameters ----------------------------------------------------------------------
    def _validate_parameters(self, params: List[Parameter]) -> SetParametersResult:
        """Refuse, with the reason, a value that cannot work (`ros2 param set`)."""
        for p in params:
            if p.name in ROLE_PARAMS or p.name == 'system_prompt':
                if not isinstance(p.value, str):
                    return SetParametersResult(successful=False,
                                               reason=f'{p.name} must be a string')
            if p.name in ROLE_PARAMS and not p.value.strip():
                return SetParametersResult(successful=False,
                                           reason=f'{p.name}: a role name must not be empty')
            models = self.readiness.models
            if p.name in ROLE_PARAMS and models is not None and models.available_roles \
                    and p.value not in models.available_roles:
                return SetParametersResult(successful=False, reason=(
                    f'{p.name}: {p.value!r} is not a model manager role '
                    f'({", ".join(models.available_roles)})'))
        return SetParametersResult(successful=True)

    def _apply_parameters(self, params: List[Parameter]) -> None:
        block = getattr(self, 'block', None)
        changed = {p.name for p in params} & RUNTIME_PARAMS
        if block is None or not changed:
            return    # a declaration (this callback also sees those), or nothing of ours
        conversation = block.conversation
        if changed & set(ROLE_PARAMS):
            block.roles = RoleMap(**{c.value: self._p(f'roles.{c.value}') for c in Complexity})
        if 'system_prompt' in changed:
            conversation.system_prompt = self._p('system_prompt')
        if 'max_exchanges' in changed:
            conversation.set_max_exchanges(self._p('max_exchanges'))
        if 'max_new_tokens' in changed:
            block.max_new_tokens = self._p('max_new_tokens')
        if 'temperature' in changed:
            block.temperature = self._p('temperature')
        if 'length_hint' in changed:
            block.length_hint = self._p('length_hint')
        if 'model_manager_wait_s' in changed:
            self.generator.server_wait_s = self._p('model_manager_wait_s')
        if 'generate_timeout_s' in changed:
            self.generator.timeout_s = self._p('generate_timeout_s')
        self.get_logger().info(f'parameters changed: {", ".join(sorted(changed))}')

    # ---- the action ----------------------------------------------------------------------
    def _on_goal(self, goal: Language.Goal) -> GoalResponse:
        if not goal.text.strip():
            self.get_logger().warning(f'turn {goal.turn_id}: refused, empty text')
            return GoalResponse.REJECT
        refusal = 'shutting down' if self._stopping.is_set() else self.queue.refusal()
        if refusal:
            self.get_logger().warning(f'turn {goal.turn_id}: refused, {refusal}')
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def _dropped(self, gh: ServerGoalHandle, reason: Optional[str]) -> Language.Result:
        return answer_dropped(gh, Language.Result(), reason, Language.Result.FAILED)

    def _execute(self, gh: ServerGoalHandle) -> Language.Result:
        goal: Language.Goal = gh.request
        result = Language.Result()
        if gh.is_cancel_requested:     # cancelled just as its turn came
            gh.canceled()
            result.error_code, result.error_msg = result.CANCELLED, 'cancelled'
            return result
        try:
            complexity = Complexity.parse(goal.complexity) if goal.complexity else None
        except ValueError as exc:
            gh.abort()
            result.error_code, result.error_msg = result.INVALID_INPUT, str(exc)
            return result
        ready, why = self.readiness.evaluate()
        if not ready:      # say why now rather than wait for a model manager that cannot serve
            self.get_logger().error(f'turn {goal.turn_id}: {why}')
            gh.abort()
            result.error_code, result.error_msg = result.MODEL_UNAVAILABLE, why
            self._check_ready()    # the next heartbeat says not ready (the kernel waits for it)
            return result
        produced = [0]

        def on_text(piece: str) -> None:
            produced[0] += 1
            gh.publish_feedback(Language.Feedback(text=piece, completion_tokens=produced[0]))

        # An ephemeral goal that starts while the reasoning block is gone is not one of its
        # steps (a stopped node sends nothing; its waiting steps were dropped): the kernel's
        # session summary, say. Only the steps of a live reasoning block are guarded.
        steps = goal.ephemeral and not self._requester.gone_reason
        orphaned = self._requester.guard() if steps else (lambda: None)
        with self._turn_lock:
            try:
                answer = self.block.respond(
                    goal.text, complexity, goal.max_new_tokens, on_text=on_text,
                    should_stop=lambda: gh.is_cancel_requested or orphaned() is not None,
                    ephemeral=goal.ephemeral, context=goal.context)
            except Cancelled:
                result.error_code, result.error_msg = result.CANCELLED, 'cancelled'
                if gh.is_cancel_requested:
                    gh.canceled()
                    return result
                result.error_code = result.FAILED
                abandoned = orphaned()
                if abandoned:
                    result.error_msg = f'step abandoned: {abandoned}'
                    self.get_logger().warning(f'turn {goal.turn_id}: {result.error_msg}')
                else:
                    result.error_msg = 'the language block is shutting down'
                gh.abort()
                return result
            except ModelError as exc:
                self.get_logger().error(f'turn {goal.turn_id}: {exc}')
                gh.abort()
                unavailable = isinstance(exc, ModelUnavailable)
                result.error_code = result.MODEL_UNAVAILABLE if unavailable else result.FAILED
                result.error_msg = str(exc)
                if unavailable:      # its model manager is gone: the next heartbeat says so
                    self._check_ready()
                return result
        g = answer.generation
        result.text, result.model, result.role = g.text, g.model_id, g.role
        result.complexity, result.swapped = answer.complexity.value, g.swapped
        result.prompt_tokens, result.completion_tokens = g.prompt_tokens, g.completion_tokens
        result.requested_role, result.fallback = g.requested_role, g.fallback
        result.truncated = g.truncated
        result.memory_used = answer.memory_used
        if g.fallback:
            self.get_logger().warning(f'turn {goal.turn_id}: {g.role} answered instead of '
                                      f'{g.requested_role}: {g.fallback}')
        gh.succeed()
        return result

    def _drop_orphans(self) -> None:
        """The reasoning block stopped or restarted: its waiting steps are answered now (the
        running one sees it through its guard)."""
        reason, restarts = self._requester.gone_reason, self._requester.restarts
        with self._requester_lock:
            restarted, self._requester_restarts = restarts != self._requester_restarts, restarts
        if not reason and not restarted:
            return        # first seen, or back: nothing was lost
        reason = reason or 'the reasoning block restarted'
        dropped = self.queue.drop_waiting(lambda gh: bool(gh.request.ephemeral),
                                          f'step abandoned: {reason}')
        if dropped:
            self.get_logger().warning(f'{dropped} waiting reasoning step(s) abandoned: {reason}')

    def _on_reset(self, request: ResetConversation.Request,
                  response: ResetConversation.Response) -> ResetConversation.Response:
        with self._turn_lock:
            response.turns_forgotten = self.block.conversation.clear()
        response.success = True
        self.get_logger().info(f'conversation reset ({response.turns_forgotten} exchanges '
                               'forgotten)')
        return response


    def destroy_node(self) -> None:
        """Bounded (~3 s) even during a generation: the running call is cancelled and not
        waited out; waiting goals are answered."""
        self._stopping.set()
        self._heartbeat.publish_last()
        self.queue.close('the language block is shutting down')
        self.queue.drop_queued('the language block is shutting down')
        if not self.queue.wait_idle(STOP_WAIT_S):
            self.get_logger().warning('a turn was still running at shutdown')
        self._server.destroy()   # a late goal's succeed/abort become no-ops, not errors
        super().destroy_node()


def main(args: Optional[List[str]] = None) -> int:
    return run_node(LanguageBlockNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
