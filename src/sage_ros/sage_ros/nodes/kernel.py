"""Kernel node: scores observations, routes them to capability blocks, publishes what happens."""

from __future__ import annotations

import time
from typing import Dict, List, Optional

from action_msgs.msg import GoalStatus
from rclpy.action import ActionClient
from rclpy.action.client import ClientGoalHandle
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.task import Future
from sage_interfaces.action import Language, Memory, Perception, Reasoning
from sage_interfaces.msg import (BlockDescription, KernelState, Response, ResponseChunk, Salience,
                                 TrustLevel)
from std_msgs.msg import String

from .. import names
from ..core.blocks import BlockDescriptor, BlockType
from ..core.kernel import Dispatch, Kernel, KernelConfig, Rejection
from ..core.salience import SalienceScore, SalienceWeights, TextSalience
from .common import LATCHED, LATCHED_MANY, RELIABLE, ConfigError, declare, run_node, stamp

TEXT_SENSOR_ID = 'text'
# Every block action of the contract and its type; the kernel is the client of all of them.
BLOCK_ACTIONS = {names.BLOCK_LANGUAGE: Language, names.BLOCK_PERCEPTION: Perception,
                 names.BLOCK_MEMORY: Memory, names.BLOCK_REASONING: Reasoning}


class KernelNode(Node):
    """Thin adapter over `core.kernel.Kernel`: every decision is made there."""

    def __init__(self, node_name: str = names.KERNEL, **kwargs: object) -> None:
        super().__init__(node_name, **kwargs)  # type: ignore[arg-type]
        p = self._declare_parameters()
        self.core = Kernel(scorer=TextSalience(weights=p['weights']), config=p['config'])
        self.dispatch_timeout_s: float = p['dispatch_timeout_s']

        # One group: observations, results and timers never race on the core's state.
        self._group = MutuallyExclusiveCallbackGroup()
        self._block_clients: Dict[str, ActionClient] = {
            self.resolve_topic_name(name): ActionClient(self, action, name,
                                                        callback_group=self._group)
            for name, action in BLOCK_ACTIONS.items()}
        self._goals: Dict[int, ClientGoalHandle] = {}

        self._response_pub = self.create_publisher(Response, names.RESPONSE, RELIABLE)
        self._stream_pub = self.create_publisher(ResponseChunk, names.RESPONSE_STREAM, RELIABLE)
        self._salience_pub = self.create_publisher(Salience, names.SALIENCE, RELIABLE)
        self._state_pub = self.create_publisher(KernelState, names.STATE, LATCHED)
        self.create_subscription(String, names.TEXT_IN, self._on_text, RELIABLE,
                                 callback_group=self._group)
        self.create_subscription(BlockDescription, names.BLOCKS_DESCRIPTION, self._on_block,
                                 LATCHED_MANY, callback_group=self._group)
        self.create_timer(p['state_period_s'], self._on_timer, callback_group=self._group)
        self._publish_state()
        self.get_logger().info(
            f'kernel ready: listening on {self.resolve_topic_name(names.TEXT_IN)}, '
            f'ATP {self.core.ledger.level:.0f}/{self.core.ledger.capacity:.0f}')

    def _declare_parameters(self) -> dict:
        d = KernelConfig()
        try:
            config = KernelConfig(
                max_input_chars=declare(self, 'max_input_chars', d.max_input_chars,
                                        'Longest accepted observation [characters]; longer is rejected',
                                        min_value=1, max_value=1_000_000),
                atp_capacity=declare(self, 'atp.capacity', d.atp_capacity,
                                     'Maximum ATP [ATP]', read_only=True, min_value=1.0, max_value=1e6),
                atp_recharge_per_s=declare(self, 'atp.recharge_per_s', d.atp_recharge_per_s,
                                           'ATP regained per second [ATP/s]', read_only=True,
                                           min_value=0.0, max_value=1e6),
                atp_grant=declare(self, 'atp.grant', d.atp_grant,
                                  'ATP reserved per dispatch; the unused part returns [ATP]',
                                  read_only=True, min_value=0.0, max_value=1e6),
                atp_min_dispatch=declare(self, 'atp.min_dispatch', d.atp_min_dispatch,
                                         'Below this available ATP nothing is dispatched [ATP]',
                                         read_only=True, min_value=0.0, max_value=1e6),
                atp_per_token=declare(self, 'atp.per_token', d.atp_per_token,
                                      'ATP charged per generated token [ATP/token]', read_only=True,
                                      min_value=0.0, max_value=1e3),
                trust_alpha=declare(self, 'trust.alpha', d.trust_alpha,
                                    'Weight of one outcome in a block\'s trust', read_only=True,
                                    min_value=0.0, max_value=1.0),
                initial_trust=declare(self, 'trust.initial', d.initial_trust,
                                      'Trust of a block or sensor before any outcome',
                                      read_only=True, min_value=0.0, max_value=1.0),
            )
            dw = SalienceWeights()
            weights = SalienceWeights(**{
                dim: declare(self, f'salience.weights.{dim}', getattr(dw, dim),
                             f'Weight of {dim} in the total salience (weights are normalised)',
                             read_only=True, min_value=0.0, max_value=1.0)
                for dim in ('surprise', 'novelty', 'arousal', 'reward', 'conflict')})
        except ValueError as exc:
            raise ConfigError(f'kernel parameters: {exc}') from exc
        return {
            'config': config, 'weights': weights,
            'dispatch_timeout_s': declare(self, 'dispatch_timeout_s', 300.0,
                                          'A goal still running after this is cancelled [s]',
                                          min_value=1.0, max_value=86400.0),
            'state_period_s': declare(self, 'state_period_s', 1.0,
                                      'Period of the `state` heartbeat [s]', read_only=True,
                                      min_value=0.05, max_value=3600.0),
        }

    # ---- inputs ------------------------------------------------------------------------------
    def _on_block(self, msg: BlockDescription) -> None:
        try:
            block_type = BlockType(msg.block_type)
        except ValueError:
            self.get_logger().warning(f'ignoring block {msg.name!r}: unknown type {msg.block_type!r}')
            return
        self.core.blocks.update(BlockDescriptor(
            name=msg.name, block_type=block_type, capabilities=tuple(msg.capabilities),
            modalities=tuple(msg.modalities), action_name=msg.action_name,
            action_type=msg.action_type, loaded=msg.loaded,
            memory_estimate_bytes=msg.memory_estimate_bytes))
        self.get_logger().info(f'block {msg.name!r} ({msg.block_type}) on {msg.action_name}: '
                               f'{", ".join(msg.capabilities)}; loaded={msg.loaded}')
        self._publish_state()

    def _on_text(self, msg: String) -> None:
        score, decision = self.core.observe(TEXT_SENSOR_ID, msg.data, time.time())
        if score is not None:
            self._publish_salience(decision.turn_id, TEXT_SENSOR_ID, score)
        if isinstance(decision, Rejection):
            self.get_logger().warning(f'turn {decision.turn_id} rejected: {decision.reason}')
            self._response_pub.publish(self._response_for(decision, Response.STATUS_REJECTED,
                                                      decision.reason))
        else:
            self._send(decision)
        self._publish_state()

    # ---- dispatch ----------------------------------------------------------------------------
    def _send(self, d: Dispatch) -> None:
        client = self._block_clients.get(d.block.action_name)
        if client is None or d.block.action_type != 'sage_interfaces/action/Language':
            self._fail(d, f'block {d.block.name!r} serves {d.block.action_type} on '
                          f'{d.block.action_name}, which the kernel cannot drive')
            return
        if not client.server_is_ready():
            self._fail(d, f'block {d.block.name!r} is not reachable on {d.block.action_name}')
            return
        goal = Language.Goal(turn_id=d.turn_id, text=d.text, complexity='',
                             atp_budget=float(d.atp_grant))
        self.get_logger().info(f'turn {d.turn_id} -> {d.block.name} ({d.atp_grant:.1f} ATP): '
                               f'{d.text[:60]!r}')
        future = client.send_goal_async(
            goal, feedback_callback=lambda fb: self._on_feedback(d.turn_id, fb))
        future.add_done_callback(lambda f: self._on_goal_response(d, f))

    def _on_goal_response(self, d: Dispatch, future: Future) -> None:
        handle = future.result()
        if handle is None or not handle.accepted:
            self._fail(d, f'block {d.block.name!r} refused the goal')
            return
        self._goals[d.turn_id] = handle
        handle.get_result_async().add_done_callback(lambda f: self._on_result(d, f))

    def _on_feedback(self, turn_id: int, feedback: Language.Impl.FeedbackMessage) -> None:
        fb = feedback.feedback
        if turn_id in self.core.active and fb.text:
            self._stream_pub.publish(ResponseChunk(turn_id=turn_id, text=fb.text, model=fb.model))

    def _on_result(self, d: Dispatch, future: Future) -> None:
        self._goals.pop(d.turn_id, None)
        if d.turn_id not in self.core.active:
            return  # already settled (timed out)
        wrapped = future.result()
        result: Language.Result = wrapped.result
        ok = wrapped.status == GoalStatus.STATUS_SUCCEEDED and result.error_code == result.NONE
        self.core.complete(d.turn_id, ok, result.completion_tokens, time.time())
        if ok:
            msg = self._response_for(d, Response.STATUS_OK, '')
            msg.text = result.text
            msg.model, msg.role, msg.complexity = result.model, result.role, result.complexity
            msg.swapped = result.swapped
            msg.prompt_tokens, msg.completion_tokens = result.prompt_tokens, result.completion_tokens
            self.get_logger().info(
                f'turn {d.turn_id} answered by {result.model} ({result.role}, {result.complexity}'
                f'{", swapped" if result.swapped else ""}) in {msg.latency_s:.2f} s')
        else:
            reason = result.error_msg or f'goal ended with status {wrapped.status}'
            msg = self._response_for(d, Response.STATUS_FAILED, reason)
            self.get_logger().error(f'turn {d.turn_id} failed in {d.block.name}: {reason}')
        self._response_pub.publish(msg)
        self._publish_state()

    def _fail(self, d: Dispatch, reason: str) -> None:
        self.core.complete(d.turn_id, False, 0, time.time())
        self.get_logger().error(f'turn {d.turn_id} failed: {reason}')
        self._response_pub.publish(self._response_for(d, Response.STATUS_FAILED, reason))
        self._publish_state()

    def _on_timer(self) -> None:
        now = time.time()
        for turn, d in list(self.core.active.items()):
            if now - d.received_at > self.dispatch_timeout_s:
                handle = self._goals.pop(turn, None)
                if handle is not None:
                    handle.cancel_goal_async()
                self._fail(d, f'no result from {d.block.name!r} within {self.dispatch_timeout_s:.0f} s')
        self._publish_state()

    # ---- outputs -----------------------------------------------------------------------------
    def _response_for(self, d: Dispatch | Rejection, status: int, error: str) -> Response:
        msg = Response(stamp=stamp(), turn_id=d.turn_id, source=d.sensor_id, input_text=d.text,
                       status=status, error=error)
        if isinstance(d, Dispatch):
            msg.block = d.block.name
            msg.latency_s = float(time.time() - d.received_at)
        return msg

    def _publish_salience(self, turn_id: int, sensor_id: str, s: SalienceScore) -> None:
        self._salience_pub.publish(Salience(
            stamp=stamp(), turn_id=turn_id, sensor_id=sensor_id, surprise=s.surprise,
            novelty=s.novelty, arousal=s.arousal, reward=s.reward, conflict=s.conflict,
            total=s.total))

    def _publish_state(self) -> None:
        snap = self.core.snapshot(time.time())
        blocks: List[str] = sorted(b.name for b in self.core.blocks if b.loaded)
        self._state_pub.publish(KernelState(
            stamp=stamp(), metabolic_state=snap.metabolic_state, atp_level=float(snap.atp_level),
            atp_capacity=float(snap.atp_capacity),
            trust=[TrustLevel(name=k, trust=float(v)) for k, v in sorted(snap.trust.items())],
            blocks=blocks, active_dispatches=snap.active_dispatches,
            observations_total=snap.observations_total, dispatches_total=snap.dispatches_total,
            rejected_total=snap.rejected_total, last_decision=snap.last_decision))


def main(args: Optional[List[str]] = None) -> int:
    return run_node(KernelNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
