"""Language block node: the `blocks/language` action over `core.language.LanguageBlock`."""

from __future__ import annotations

import threading
import time
from typing import List, Optional, Sequence

from action_msgs.msg import GoalStatus
from rclpy.action import ActionClient, ActionServer, CancelResponse, GoalResponse
from rclpy.action.server import ServerGoalHandle
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node
from sage_interfaces.action import Generate, Language
from sage_interfaces.msg import BlockDescription, ChatMessage
from sage_interfaces.srv import ResetConversation

from .. import names
from ..core.conversation import DEFAULT_SYSTEM_PROMPT, ChatTurn, Conversation
from ..core.language import LanguageBlock
from ..core.models import Cancelled, GenerationResult, ModelError, StopFn, TextFn
from ..core.routing import Complexity, RoleMap
from .common import LATCHED, ConfigError, declare, declare_router, run_node, stamp


class ModelManagerClient:
    """`core.models.Generator` over the model manager's `generate` action."""

    def __init__(self, node: Node, server_wait_s: float, timeout_s: float) -> None:
        self._node = node
        self._client = ActionClient(node, Generate, names.MODEL_GENERATE,
                                    callback_group=ReentrantCallbackGroup())
        self._server_wait_s = server_wait_s
        self._timeout_s = timeout_s

    def generate(self, role: str, messages: Sequence[ChatTurn], max_new_tokens: int = 0,
                 temperature: float = 0.0, on_text: Optional[TextFn] = None,
                 should_stop: Optional[StopFn] = None,
                 complexity: Optional[str] = None) -> GenerationResult:
        if not self._client.wait_for_server(timeout_sec=self._server_wait_s):
            raise ModelError(f'model manager not reachable on '
                             f'{self._node.resolve_topic_name(names.MODEL_GENERATE)}')
        goal = Generate.Goal(role=role, max_new_tokens=max_new_tokens, temperature=temperature,
                             complexity=complexity or '',
                             messages=[ChatMessage(role=m.role, content=m.content) for m in messages])
        done = threading.Event()
        sent = self._client.send_goal_async(
            goal, feedback_callback=(lambda fb: on_text(fb.feedback.text)) if on_text else None)
        sent.add_done_callback(lambda _: done.set())
        if not done.wait(self._server_wait_s):
            raise ModelError('model manager did not answer the goal request')
        handle = sent.result()
        if handle is None or not handle.accepted:
            raise ModelError('model manager refused the goal (is it active?)')
        done.clear()
        result_future = handle.get_result_async()
        result_future.add_done_callback(lambda _: done.set())
        deadline = time.monotonic() + self._timeout_s
        while not done.wait(0.05):
            if (should_stop and should_stop()) or time.monotonic() > deadline:
                handle.cancel_goal_async()
                done.wait(5.0)
                if time.monotonic() > deadline:
                    raise ModelError(f'generation took longer than {self._timeout_s:.0f} s')
                raise Cancelled('generation cancelled')
        wrapped = result_future.result()
        res: Generate.Result = wrapped.result
        if wrapped.status == GoalStatus.STATUS_CANCELED or res.error_code == res.CANCELLED:
            raise Cancelled('generation cancelled')
        if res.error_code != res.NONE:
            raise ModelError(res.error_msg or f'generation failed (code {res.error_code})')
        return GenerationResult(text=res.text, model_id=res.model, role=res.role,
                                swapped=res.swapped, prompt_tokens=res.prompt_tokens,
                                completion_tokens=res.completion_tokens,
                                time_to_first_token_s=res.time_to_first_token_s,
                                duration_s=res.duration_s, requested_role=res.requested_role,
                                fallback=res.fallback)


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
        generator = ModelManagerClient(
            self,
            server_wait_s=declare(self, 'model_manager_wait_s', 10.0,
                                  'How long to wait for the model manager per request [s]',
                                  min_value=0.0, max_value=3600.0),
            timeout_s=declare(self, 'generate_timeout_s', 300.0,
                              'Longest a generation may take [s]', min_value=1.0,
                              max_value=86400.0))
        classify = declare_router(self, 'for turns that arrive without one')
        self.block = LanguageBlock(generator, conversation, roles, max_new_tokens, temperature,
                                   classify)
        self._turn_lock = threading.Lock()  # one conversation: turns are answered in order

        group = ReentrantCallbackGroup()
        self._server = ActionServer(
            self, Language, names.BLOCK_LANGUAGE, execute_callback=self._execute,
            goal_callback=self._on_goal, cancel_callback=lambda _: CancelResponse.ACCEPT,
            callback_group=group)
        self.create_service(ResetConversation, names.LANGUAGE_RESET, self._on_reset,
                            callback_group=group)
        self._description_pub = self.create_publisher(BlockDescription, names.BLOCKS_DESCRIPTION,
                                                      LATCHED)
        desc = self.block.describe(self.resolve_topic_name(names.BLOCK_LANGUAGE),
                                   'sage_interfaces/action/Language')
        self._description_pub.publish(BlockDescription(
            stamp=stamp(), name=desc.name, block_type=desc.block_type.value,
            capabilities=list(desc.capabilities), modalities=list(desc.modalities),
            action_name=desc.action_name, action_type=desc.action_type, loaded=desc.loaded,
            memory_estimate_bytes=desc.memory_estimate_bytes))
        self.get_logger().info(f'language block ready on {desc.action_name} (roles: {roles})')

    def _on_goal(self, goal: Language.Goal) -> GoalResponse:
        if not goal.text.strip():
            self.get_logger().warning(f'turn {goal.turn_id}: refused, empty text')
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def _execute(self, gh: ServerGoalHandle) -> Language.Result:
        goal: Language.Goal = gh.request
        result = Language.Result()
        try:
            complexity = Complexity.parse(goal.complexity) if goal.complexity else None
        except ValueError as exc:
            gh.abort()
            result.error_code, result.error_msg = result.INVALID_INPUT, str(exc)
            return result
        produced = [0]

        def on_text(piece: str) -> None:
            produced[0] += 1
            gh.publish_feedback(Language.Feedback(text=piece, completion_tokens=produced[0]))

        with self._turn_lock:
            try:
                answer = self.block.respond(goal.text, complexity, goal.max_new_tokens,
                                            on_text=on_text,
                                            should_stop=lambda: gh.is_cancel_requested,
                                            ephemeral=goal.ephemeral, context=goal.context)
            except Cancelled:
                gh.canceled()
                result.error_code, result.error_msg = result.CANCELLED, 'cancelled'
                return result
            except ModelError as exc:
                self.get_logger().error(f'turn {goal.turn_id}: {exc}')
                gh.abort()
                result.error_code, result.error_msg = result.MODEL_UNAVAILABLE, str(exc)
                return result
        g = answer.generation
        result.text, result.model, result.role = g.text, g.model_id, g.role
        result.complexity, result.swapped = answer.complexity.value, g.swapped
        result.prompt_tokens, result.completion_tokens = g.prompt_tokens, g.completion_tokens
        result.requested_role, result.fallback = g.requested_role, g.fallback
        if g.fallback:
            self.get_logger().warning(f'turn {goal.turn_id}: {g.role} answered instead of '
                                      f'{g.requested_role}: {g.fallback}')
        gh.succeed()
        return result

    def _on_reset(self, request: ResetConversation.Request,
                  response: ResetConversation.Response) -> ResetConversation.Response:
        with self._turn_lock:
            response.turns_forgotten = self.block.conversation.clear()
        response.success = True
        self.get_logger().info(f'conversation reset ({response.turns_forgotten} exchanges forgotten)')
        return response


def main(args: Optional[List[str]] = None) -> int:
    return run_node(LanguageBlockNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
