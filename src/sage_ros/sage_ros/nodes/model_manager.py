"""Model manager lifecycle node: loads models by role and serves `generate` and `swap`.

configure loads the default role, activate opens the actions to goals, deactivate closes them,
cleanup unloads everything. With `autostart` the node configures and activates itself.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional

from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.action.server import ServerGoalHandle
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from sage_interfaces.action import Generate, SwapModel
from sage_interfaces.msg import LoadedModel, ModelStatus, SwapRecord

from .. import names
from ..core.conversation import ChatTurn
from ..core.models import Cancelled, LoadError, ModelError, ModelPool, ModelSpec, UnknownRole
from .common import LATCHED, declare, run_node, stamp


class ModelManagerNode(LifecycleNode):
    """Thin lifecycle adapter over `core.models.ModelPool`."""

    def __init__(self, node_name: str = names.MODEL_MANAGER, **kwargs: object) -> None:
        super().__init__(node_name, **kwargs)  # type: ignore[arg-type]
        self.pool: Optional[ModelPool] = None
        self._active = False
        self._state_label = 'unconfigured'
        self._error = ''
        self._roles: List[str] = declare(self, 'roles', ['small', 'large'],
                                         'Model roles this manager serves', read_only=True)
        for role in self._roles:
            declare(self, f'models.{role}.model_id', role, f'Name of the {role} model',
                    read_only=True)
            declare(self, f'models.{role}.path', '',
                    f'Directory (or `offline:NAME`, or a hub id in the local cache) of the {role} '
                    'model', read_only=True)
            declare(self, f'models.{role}.dtype', 'bfloat16', 'torch dtype to load with',
                    read_only=True)
            declare(self, f'models.{role}.device', 'cpu', 'torch device (cpu, cuda, cuda:1...)',
                    read_only=True)
            declare(self, f'models.{role}.max_new_tokens', 128,
                    'Default cap on answer length [tokens]', read_only=True, min_value=1,
                    max_value=100_000)
            declare(self, f'models.{role}.context_window', 2048,
                    'Context window [tokens]', read_only=True, min_value=16, max_value=10_000_000)
        self._default_role: str = declare(self, 'default_role', 'small',
                                          'Role loaded on configure', read_only=True)
        self._max_resident: int = declare(self, 'max_resident', 1,
                                          'Models kept resident at once', read_only=True,
                                          min_value=1, max_value=16)
        autostart = declare(self, 'autostart', True,
                            'Configure and activate on start-up, without a lifecycle manager',
                            read_only=True)

        self._status_pub = self.create_publisher(ModelStatus, names.MODELS_STATUS, LATCHED)
        group = ReentrantCallbackGroup()
        self._generate = ActionServer(
            self, Generate, names.MODEL_GENERATE, execute_callback=self._execute_generate,
            goal_callback=self._on_goal, cancel_callback=lambda _: CancelResponse.ACCEPT,
            callback_group=group)
        self._swap = ActionServer(
            self, SwapModel, names.MODEL_SWAP, execute_callback=self._execute_swap,
            goal_callback=self._on_goal, cancel_callback=lambda _: CancelResponse.ACCEPT,
            callback_group=group)
        self._publish_status()
        if autostart:
            self._autostart_timer = self.create_timer(
                0.1, self._autostart, callback_group=MutuallyExclusiveCallbackGroup())

    # ---- lifecycle ---------------------------------------------------------------------------
    def _autostart(self) -> None:
        self.destroy_timer(self._autostart_timer)
        if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            self.trigger_activate()

    def _specs(self) -> Dict[str, ModelSpec]:
        specs = {}
        for role in self._roles:
            p = {k: self.get_parameter(f'models.{role}.{k}').value
                 for k in ('model_id', 'path', 'dtype', 'device', 'max_new_tokens', 'context_window')}
            if not p['path']:
                raise ValueError(f'parameter models.{role}.path is empty')
            specs[role] = ModelSpec(role=role, **p)
        return specs

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.pool = ModelPool(self._specs(), self._default_role, self._max_resident)
            self.pool.listeners.append(self._publish_status)
            spec = self.pool.spec(self._default_role)
            self.get_logger().info(f'loading default role {spec.role!r}: {spec.model_id} from '
                                   f'{spec.path} ({spec.dtype} on {spec.device})')
            entry = self.pool.load(self._default_role, reason='configure',
                                   progress=self._log_progress)
        except (ModelError, ValueError) as exc:
            self._error = str(exc)
            self.get_logger().error(f'configure failed: {exc}')
            self.pool = None
            self._publish_status()
            return TransitionCallbackReturn.FAILURE
        self._error = ''
        self._state_label = 'inactive'
        self.get_logger().info(f'{entry.spec.model_id} loaded in {entry.load_duration_s:.1f} s '
                               f'({entry.memory_bytes / 1e6:.0f} MB)')
        self._publish_status()
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = True
        self._state_label = 'active'
        self.get_logger().info('active: generate and swap open')
        self._publish_status()
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = False
        self._state_label = 'inactive'
        self.get_logger().info('inactive: generate and swap closed')
        self._publish_status()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self._state_label = 'unconfigured'
        self._publish_status()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._active = False
        self._release()
        self._state_label = 'finalized'
        self._publish_status()
        return TransitionCallbackReturn.SUCCESS

    def _release(self) -> None:
        if self.pool is not None:
            self.pool.unload_all()
            self.pool = None
            self.get_logger().info('all models unloaded')

    def _log_progress(self, stage: str, fraction: float) -> None:
        self.get_logger().info(f'  {stage} ({fraction:.0%})')

    # ---- actions -----------------------------------------------------------------------------
    def _on_goal(self, goal: object) -> GoalResponse:
        if not self._active or self.pool is None:
            self.get_logger().warning('goal refused: model manager is not active')
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def _execute_generate(self, gh: ServerGoalHandle) -> Generate.Result:
        goal: Generate.Goal = gh.request
        result = Generate.Result()
        pool = self.pool
        if pool is None:
            gh.abort()
            result.error_code, result.error_msg = result.INACTIVE, 'model manager is not configured'
            return result
        produced = [0]

        def on_text(piece: str) -> None:
            produced[0] += 1
            gh.publish_feedback(Generate.Feedback(text=piece, completion_tokens=produced[0]))

        try:
            g = pool.generate(goal.role, [ChatTurn(m.role, m.content) for m in goal.messages],
                              max_new_tokens=goal.max_new_tokens, temperature=goal.temperature,
                              on_text=on_text, should_stop=lambda: gh.is_cancel_requested)
        except Exception as exc:  # every failure becomes a result code, never a dead node
            code = {UnknownRole: result.UNKNOWN_ROLE, LoadError: result.LOAD_FAILED,
                    Cancelled: result.CANCELLED, ValueError: result.INVALID_INPUT
                    }.get(type(exc), result.FAILED)
            result.error_code, result.error_msg = code, str(exc)
            if code == result.CANCELLED:
                gh.canceled()
            else:
                self.get_logger().error(f'generate failed: {exc}')
                gh.abort()
            return result
        result.text, result.model, result.role, result.swapped = g.text, g.model_id, g.role, g.swapped
        result.prompt_tokens, result.completion_tokens = g.prompt_tokens, g.completion_tokens
        result.time_to_first_token_s, result.duration_s = g.time_to_first_token_s, g.duration_s
        if g.swapped:
            self.get_logger().info(f'swapped to {g.role!r} ({g.model_id}) for a generate request')
        gh.succeed()
        return result

    def _execute_swap(self, gh: ServerGoalHandle) -> SwapModel.Result:
        goal: SwapModel.Goal = gh.request
        result = SwapModel.Result()
        pool = self.pool
        if pool is None:
            gh.abort()
            result.error_code, result.error_msg = result.INACTIVE, 'model manager is not configured'
            return result
        t0 = time.monotonic()

        def progress(stage: str, fraction: float) -> None:
            gh.publish_feedback(SwapModel.Feedback(stage=stage, progress=fraction))

        try:
            entry = pool.load(goal.role, reason=goal.reason or 'swap request', progress=progress,
                              should_stop=lambda: gh.is_cancel_requested)
        except Cancelled as exc:
            gh.canceled()
            result.error_code, result.error_msg = result.CANCELLED, str(exc)
            return result
        except UnknownRole as exc:
            gh.abort()
            result.error_code, result.error_msg = result.UNKNOWN_ROLE, str(exc)
            return result
        except ModelError as exc:
            self.get_logger().error(f'swap failed: {exc}')
            gh.abort()
            result.error_code, result.error_msg = result.LOAD_FAILED, str(exc)
            return result
        result.model, result.memory_bytes = entry.spec.model_id, entry.memory_bytes
        result.duration_s = time.monotonic() - t0
        self.get_logger().info(f'swap to {goal.role!r} done in {result.duration_s:.1f} s')
        gh.succeed()
        return result

    def destroy_node(self) -> None:
        if self.pool is not None:
            self.pool.listeners.clear()  # a generation still running must not publish any more
        super().destroy_node()

    # ---- status ------------------------------------------------------------------------------
    def _publish_status(self) -> None:
        pool = self.pool
        msg = ModelStatus(stamp=stamp(), lifecycle_state=self._state_label,
                          available_roles=list(self._roles), default_role=self._default_role,
                          error=self._error)
        if pool is not None:
            msg.busy = pool.busy
            msg.loaded = [LoadedModel(
                role=e.spec.role, model_id=e.spec.model_id, path=e.spec.path, device=e.spec.device,
                dtype=e.spec.dtype, memory_bytes=e.memory_bytes,
                load_duration_s=float(e.load_duration_s), loaded_at=stamp(e.loaded_at))
                for e in pool.loaded()]
            msg.swap_count = len(pool.swaps)
            if pool.swaps:
                s = pool.swaps[-1]
                msg.last_swap = SwapRecord(stamp=stamp(s.finished_at), from_role=s.from_role,
                                           to_role=s.to_role, reason=s.reason,
                                           duration_s=float(s.duration_s), succeeded=s.succeeded)
        self._status_pub.publish(msg)


def main(args: Optional[List[str]] = None) -> int:
    return run_node(ModelManagerNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
