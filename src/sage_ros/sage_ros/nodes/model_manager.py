"""Model manager lifecycle node: loads models by role and serves `generate` and `swap`.

The lifecycle states are truthful: configure returns once the default role (or one of its
fallbacks) has loaded, FAILURE with the reason when nothing can load; lifecycle services run
on a reentrant group and parameter services on the default one, so both answer during a long
load. `active` = a model is loaded and `generate` serves. deactivate closes both actions,
answers waiting goals with INACTIVE and stops the running one; cleanup returns after every
model is unloaded and its memory given back; shutdown does the same. With `autostart` the node
configures and activates itself.

Generate and swap goals wait in ONE bounded FIFO (`max_goals`, running + waiting) and run one
at a time: a waiting goal holds no executor thread. The node's heartbeat says `ready` while
it is active with a model loaded (or loading for a goal).

A model entry configured for CUDA loads on the CPU when CUDA is absent (`cpu_fallback`, said
once per role); `device: auto` means CUDA when available, else the CPU.

Model entries (`models.<role>.*`), the memory budget and the swap policy may be changed at run
time (`ros2 param set`): values are validated, and a resident model whose path, dtype or device
changed is unloaded, then loaded again at once if it serves the default role, else at its next
use.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from lifecycle_msgs.srv import ChangeState
from rcl_interfaces.msg import SetParametersResult
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.action import ActionServer, GoalResponse
from rclpy.action.server import ServerGoalHandle
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.lifecycle.node import LifecycleNodeMixin
from rclpy.node import Node
from rclpy.parameter import Parameter
from sage_interfaces.action import Generate, SwapModel
from sage_interfaces.msg import LoadedModel, ModelStatus, SwapRecord

from .. import names
from ..core.conversation import ChatTurn
from ..core.models import (DTYPE_BYTES, Cancelled, LoadError, LoadProgress,
                           ModelError, ModelPool, ModelSpec, ProgressFn, SwapEvent, UnknownRole,
                           available_memory, inspect_weights, locate_model_dir, resolve_device)
from ..core.store import StateStore, resolve_state_file
from ..core.swap_policy import GIB, PolicyConfig, SwapPolicy
from .common import LATCHED, RESULT_KEEP_S, ConfigError, declare, run_node, stamp
from .goal_queue import GoalQueue, answer_dropped
from .liveness import HeartbeatPublisher

ENTRY_FIELDS = ('model_id', 'path', 'dtype', 'device', 'max_new_tokens', 'context_window',
                'keep_resident', 'priority', 'fallback', 'adapter')
NO_FALLBACK = 'none'
STOP_WAIT_S = 2.5     # [s] destroy_node waits this long for the running goal to stop


def default_fallback(roles: List[str], role: str) -> List[str]:
    """The roles below `role` (nearest first), then the ones above: a smaller model is the
    likelier to fit when a bigger one cannot be used."""
    i = roles.index(role)
    return list(reversed(roles[:i])) + roles[i + 1:] or [NO_FALLBACK]


def record_msg(e: SwapEvent) -> SwapRecord:
    return SwapRecord(stamp=stamp(e.finished_at), from_role=e.from_role, to_role=e.to_role,
                      reason=e.reason, duration_s=float(e.duration_s), succeeded=e.succeeded,
                      error=e.error, evicted=list(e.evicted), memory_bytes=int(e.memory_bytes),
                      bytes_read=int(e.bytes_read))


class ModelManagerNode(LifecycleNode):
    """Lifecycle adapter over `core.models.ModelPool`; model loads run in a loader thread."""

    def __init__(self, node_name: str = names.MODEL_MANAGER, **kwargs: object) -> None:
        # LifecycleNode.__init__ cannot pass a callback group for the lifecycle services: run
        # its two parts here, with a reentrant group, so that get_state (and a refused second
        # transition) answer while configure loads; parameter services stay on the default one.
        Node.__init__(self, node_name, **kwargs)  # type: ignore[arg-type]
        LifecycleNodeMixin.__init__(self, enable_communication_interface=True,
                                    callback_group=ReentrantCallbackGroup())
        self._guard_change_state()
        self.pool: Optional[ModelPool] = None
        self._fallbacks_said: Set[str] = set()
        self._retiring: List[ModelPool] = []   # pools being unloaded after cleanup
        self._active = False
        self._state_label = 'unconfigured'
        self._error = ''                       # configuration error ('' if none)
        self._cancel = threading.Event()       # set to cancel the loader thread's current job
        self._goal_stop = threading.Event()    # set to stop running goals (deactivate, destroy)
        self._stop_reason = ''                 # why they stop ('' = the client cancelled)
        self._status_lock = threading.RLock()
        self._device_notes: Set[str] = set()   # device fallbacks already said
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix='model-loader')
        self._jobs: List['Future[str]'] = []   # loader jobs not yet known to be done
        # Called at every step of every load (the loader thread's or a goal's); tests use it to
        # hold a load open.
        self.load_listeners: List[ProgressFn] = []
        self._declare_parameters()
        if self._default_role not in self._roles:
            raise ConfigError(f'default_role {self._default_role!r} is not one of the roles '
                              f'{self._roles}')
        state_file = resolve_state_file(self._p('state_file'))
        try:
            self._store = StateStore(state_file) if state_file is not None else None
        except Exception as exc:  # sqlite3 or OS error: the path is unusable
            raise ConfigError(f'state_file: cannot open {state_file}: {exc}') from None
        for message in self._store.migration_messages if self._store else []:
            self.get_logger().info(message)
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)

        self._status_pub = self.create_publisher(ModelStatus, names.MODELS_STATUS, LATCHED)
        self._last_ready: Optional[Tuple[bool, str]] = None
        self._heartbeat = HeartbeatPublisher(self, '', self._liveness)
        # Generate and swap share one FIFO, one goal at a time; their goal requests are handled
        # in one mutually exclusive group, which keeps the max_goals count exact.
        self.queue = GoalQueue('model manager', lambda: int(self._p('max_goals')), self._dropped,
                               concurrency=1, on_change=self._heartbeat.publish)
        self.queue.close('model manager is not active')
        group = MutuallyExclusiveCallbackGroup()
        self._generate = ActionServer(
            self, Generate, names.MODEL_GENERATE,
            execute_callback=self.queue.wrap(self._execute_generate), goal_callback=self._on_goal,
            handle_accepted_callback=self.queue.handle_accepted,
            cancel_callback=self.queue.cancel_callback, callback_group=group,
            result_timeout=RESULT_KEEP_S)
        self._swap = ActionServer(
            self, SwapModel, names.MODEL_SWAP, execute_callback=self.queue.wrap(self._execute_swap),
            goal_callback=self._on_goal, handle_accepted_callback=self.queue.handle_accepted,
            cancel_callback=self.queue.cancel_callback, callback_group=group,
            result_timeout=RESULT_KEEP_S)
        self._publish_status()
        if self._p('autostart'):
            self._autostart_timer = self.create_timer(
                0.1, self._autostart, callback_group=MutuallyExclusiveCallbackGroup())

    def _guard_change_state(self) -> None:
        """rclpy raises from the change_state service on a transition the current state does
        not have (activate while configuring): that would end the executor's spin. Answer
        success=false with the reason in the log instead, as rclcpp does."""
        service = self._service_change_state
        inner = service.callback

        def change_state(request: ChangeState.Request, response: ChangeState.Response
                         ) -> ChangeState.Response:
            try:
                return inner(request, response)
            except _rclpy.RCLError as exc:
                state = self._state_machine.current_state[1]
                what = request.transition.label or f'id {request.transition.id}'
                self.get_logger().warning(f'transition {what} refused in state {state!r}: '
                                          f'{str(exc).splitlines()[0]}')
                response.success = False
                return response
        service.callback = change_state

    # ---- parameters --------------------------------------------------------------------------
    def _declare_parameters(self) -> None:
        self._roles: List[str] = declare(
            self, 'roles', ['small', 'large'],
            'Model roles, least capable first (the order gives the default priority and '
            'fallback)', read_only=True)
        for i, role in enumerate(self._roles):
            m = f'models.{role}.'
            declare(self, m + 'model_id', role, f'Name of the {role} model')
            declare(self, m + 'path', '', f'Directory (or `offline:NAME`, or a hub id in the '
                    f'local cache) of the {role} model')
            declare(self, m + 'dtype', 'bfloat16',
                    f'torch dtype to load with ({", ".join(DTYPE_BYTES)})')
            declare(self, m + 'device', 'cpu', 'torch device (cpu, cuda, cuda:N, mps, or auto = '
                    'cuda when available, else cpu)')
            declare(self, m + 'max_new_tokens', 128,
                    'Cap on answer length; a request may ask for fewer [tokens]',
                    min_value=1, max_value=100_000)
            declare(self, m + 'context_window', 2048, 'Context window [tokens]',
                    min_value=16, max_value=10_000_000)
            declare(self, m + 'keep_resident', False,
                    'May stay resident next to other keep_resident models (memory allowing)')
            declare(self, m + 'priority', i,
                    'Capability rank, higher = more capable; a resident model of higher '
                    'priority may answer for this role instead of a swap', min_value=0,
                    max_value=1000)
            declare(self, m + 'fallback', default_fallback(self._roles, role),
                    f'Roles tried in order when the {role} model cannot be used '
                    f'([{NO_FALLBACK}] = none)')
            declare(self, m + 'adapter', '',
                    'LoRA adapter merged into the weights after each load: "" = none, '
                    '"latest" = the current sleep-trained adapter of this model (the base '
                    'model until one exists), or a directory; a missing or broken adapter '
                    'loads the base model with a warning')
        self._default_role: str = declare(self, 'default_role', 'small',
                                          'Role loaded on configure', read_only=True)
        declare(self, 'autostart', True,
                'Configure and activate on start-up, without a lifecycle manager', read_only=True)
        declare(self, 'max_resident', 1, 'Models kept resident at once', min_value=1,
                max_value=16)
        declare(self, 'memory_budget_gib', 0.0,
                'Memory for resident models [GiB]; 0 = no budget', min_value=0.0,
                max_value=1_000_000.0)
        declare(self, 'memory_reserve_gib', 0.5,
                'Memory kept free out of what the system or CUDA device reports [GiB]',
                min_value=0.0, max_value=1_000_000.0)
        declare(self, 'preread_weights', True,
                'Read weight files through the page cache in chunks before loading (progress in '
                'bytes, cancellable)')
        declare(self, 'preread_chunk_mib', 16, 'Read chunk [MiB]', min_value=1, max_value=4096)
        declare(self, 'retry_failed_s', 60.0,
                'A role whose load failed is not tried again for generate requests within this '
                'time [s] (its fallback answers); swap goals always retry', min_value=0.0,
                max_value=86_400.0)
        declare(self, 'malloc_mmap_threshold_kib', 128,
                'Pin glibc\'s mmap threshold so that unloaded weights go back to the system '
                '[KiB]; 0 = leave glibc\'s dynamic threshold', read_only=True, min_value=0,
                max_value=1 << 20)
        declare(self, 'history_size', 20, 'Swaps listed in models/status', read_only=True,
                min_value=1, max_value=1000)
        declare(self, 'max_goals', 4,
                'Generate and swap goals running or waiting at once (one runs, the others wait '
                'in FIFO order holding no thread); more are refused', min_value=1, max_value=64)
        declare(self, 'cpu_fallback', True,
                'A model entry configured for CUDA loads on the CPU when CUDA is not available '
                '(said once per role); false = such a role fails to load', read_only=True)
        declare(self, 'state_file', '',
                "Swap history database; '' = <state dir>/model_manager.db, 'none' = not kept",
                read_only=True)
        declare(self, 'context.summary_tokens', 96,
                'When a conversation exceeds a model\'s context window, older turns are '
                'summarised by the least capable resident model in up to this many tokens '
                '(names and numbers are always kept verbatim) [tokens]; 0 = extractive summary',
                min_value=0, max_value=4096)
        declare(self, 'context.memory_share', 0.25,
                'Largest share of a model\'s context window (after the answer\'s reserve) that '
                'the awakening preamble and recalled memories may take; the lowest-ranked '
                'memories are dropped first, then the preamble [fraction]',
                min_value=0.0, max_value=0.9)
        declare(self, 'policy.substitute', True,
                'A more capable resident model may answer instead of swapping down')
        declare(self, 'policy.hysteresis_requests', 3.0,
                'Requests in a row for a less capable role before the bigger model is swapped '
                'out (simple counts 1, moderate 0.5)', min_value=0.0, max_value=1000.0)
        declare(self, 'policy.min_dwell_s', 30.0,
                'A model is not swapped down sooner than this after its load [s]',
                min_value=0.0, max_value=86_400.0)
        declare(self, 'policy.swap_cost_weight', 1.0,
                'Weight of a second of swapping against a second of generation saved',
                min_value=0.0, max_value=1000.0)

    def _p(self, name: str) -> Any:
        return self.get_parameter(name).value

    def _spec(self, role: str, override: Optional[Dict[str, Any]] = None) -> ModelSpec:
        values = {k: self._p(f'models.{role}.{k}') for k in ENTRY_FIELDS}
        values.update(override or {})
        if values['device'] == 'auto' or str(values['device']).startswith('cuda'):
            device, note = resolve_device(values['device'], self._p('cpu_fallback'))
            if note and override is None and role not in self._device_notes:
                self._device_notes.add(role)
                self.get_logger().warning(f'role {role!r}: {note}')
            values['device'] = device
        if not values['path']:
            raise ValueError(f'parameter models.{role}.path is empty')
        fallback = tuple(r for r in values.pop('fallback') if r != NO_FALLBACK)
        unknown = [r for r in fallback if r not in self._roles or r == role]
        if unknown:
            raise ValueError(f'models.{role}.fallback: {unknown} are not other configured roles '
                             f'({", ".join(self._roles)})')
        return ModelSpec(role=role, fallback=fallback, **values)

    def _specs(self) -> Dict[str, ModelSpec]:
        return {role: self._spec(role) for role in self._roles}

    def _policy_config(self) -> PolicyConfig:
        return PolicyConfig(substitute=self._p('policy.substitute'),
                            hysteresis_requests=self._p('policy.hysteresis_requests'),
                            min_dwell_s=self._p('policy.min_dwell_s'),
                            swap_cost_weight=self._p('policy.swap_cost_weight'))

    def _apply_settings(self, pool: ModelPool) -> None:
        pool.max_resident = self._p('max_resident')
        pool.memory_budget_bytes = int(self._p('memory_budget_gib') * GIB)
        pool.memory_reserve_bytes = int(self._p('memory_reserve_gib') * GIB)
        pool.preread_weights = self._p('preread_weights')
        pool.summary_tokens = self._p('context.summary_tokens')
        pool.memory_share = self._p('context.memory_share')
        pool.preread_chunk_bytes = self._p('preread_chunk_mib') << 20
        pool.retry_failed_s = self._p('retry_failed_s')
        pool.policy.config = self._policy_config()

    def _validate_parameters(self, params: List[Parameter]) -> SetParametersResult:
        """Reject a run-time change that cannot work, with the reason (`ros2 param set`)."""
        for p in params:
            parts = p.name.split('.')
            if len(parts) != 3 or parts[0] != 'models' or parts[1] not in self._roles:
                continue
            role, field_name = parts[1], parts[2]
            try:
                spec = self._spec(role, {field_name: p.value})
                if field_name == 'path':
                    locate_model_dir(spec)
            except (ValueError, ModelError) as exc:
                return SetParametersResult(successful=False, reason=f'{p.name}: {exc}')
        return SetParametersResult(successful=True)

    def _apply_parameters(self, params: List[Parameter]) -> None:
        pool = self.pool
        if pool is None:
            return  # applies at the next configure
        self._apply_settings(pool)
        roles = sorted({p.name.split('.')[1] for p in params if p.name.startswith('models.')})
        if roles:
            stale = pool.update_specs({r: self._spec(r) for r in roles})
            if stale:
                self.get_logger().info(f'model entry of {", ".join(stale)} changed: reloading')
                cancel = self._cancel
                self._submit(lambda: pool.reload(stale, should_stop=cancel.is_set))
        self._publish_status()

    # ---- loader thread ---------------------------------------------------------------------
    def _submit(self, job: Callable[[], None]) -> 'Future[str]':
        """Run `job` in the loader thread; the future holds its error in words ('' = done)."""
        def run() -> str:
            error = ''
            try:
                job()
            except Cancelled as exc:
                error = str(exc)
                self.get_logger().info(error)
            except ModelError as exc:
                error = str(exc)
                self.get_logger().error(error)
            except Exception as exc:  # a bug must not kill the loader thread silently
                error = f'loader thread: {type(exc).__name__}: {exc}'
                self.get_logger().error(error)
            self._publish_status()
            return error
        self._jobs = [j for j in self._jobs if not j.done()]
        try:
            job_future = self._loader.submit(run)
        except RuntimeError:   # the node is being destroyed: its loader takes no more jobs
            stopped: 'Future[str]' = Future()
            stopped.set_result('the model manager is stopping')
            return stopped
        self._jobs.append(job_future)
        return job_future

    @staticmethod
    def _wait_job(job: 'Future[str]') -> str:
        """A loader job's error in words; a job dropped by a shutdown says so."""
        try:
            return job.result()
        except CancelledError:     # destroyed while the job still waited for the thread
            return 'the model manager is stopping'

    def _on_load_progress(self, p: LoadProgress) -> None:
        for fn in list(self.load_listeners):
            fn(p)

    def _on_load_note(self, level: str, text: str) -> None:
        """What a load did that the log should say (an adapter merged, or why not)."""
        if level == 'warning':
            self.get_logger().warning(text)
        else:
            self.get_logger().info(text)

    def _load_default(self, pool: ModelPool, cancel: threading.Event) -> None:
        spec = pool.spec(self._default_role)
        self.get_logger().info(f'loading default role {spec.role!r}: {spec.model_id} from '
                               f'{spec.path} ({spec.dtype} on {spec.device})')
        entry, fallback = pool.load_or_fall_back(spec.role, reason='configure',
                                                 should_stop=cancel.is_set)
        if fallback:
            self.get_logger().warning(fallback)
        self.get_logger().info(f'{entry.spec.model_id} loaded in {entry.load_duration_s:.1f} s '
                               f'({entry.memory_bytes / 1e6:.0f} MB)')

    # ---- lifecycle ---------------------------------------------------------------------------
    def _autostart(self) -> None:
        self.destroy_timer(self._autostart_timer)
        if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            self.trigger_activate()

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Returns once the default role (or a fallback) is loaded; FAILURE if none can be."""
        try:
            pool = ModelPool(self._specs(), self._default_role, self._p('max_resident'),
                             policy=SwapPolicy(self._policy_config()), store=self._store,
                             history_limit=self._p('history_size'),
                             malloc_mmap_threshold=self._p('malloc_mmap_threshold_kib') << 10)
            self._apply_settings(pool)
            self._check_loadable(pool)
        except (ModelError, ValueError) as exc:
            return self._configure_failed(str(exc))
        self._error = ''
        pool.listeners.append(self._publish_status)
        pool.progress_listeners.append(self._on_load_progress)
        pool.note_listeners.append(self._on_load_note)
        self.pool = pool
        self._cancel = cancel = threading.Event()
        self._state_label = 'configuring'
        self._publish_status()
        error = self._wait_job(self._submit(lambda: self._load_default(pool, cancel)))
        if error or not pool.loaded():
            self.pool = None
            self._wait_job(self._submit(pool.unload_all))
            return self._configure_failed(error or 'no model loaded')
        self._state_label = 'inactive'
        self._publish_status()
        return TransitionCallbackReturn.SUCCESS

    def _configure_failed(self, error: str) -> TransitionCallbackReturn:
        self._error = error
        self._state_label = 'unconfigured'
        self.get_logger().error(f'configure failed: {error}')
        self._publish_status()
        return TransitionCallbackReturn.FAILURE

    def _check_loadable(self, pool: ModelPool) -> None:
        """Fail configure at once when neither the default role nor any of its fallbacks has
        model files; everything else (corrupt, too big) is found by the load and falls back."""
        errors = []
        spec = pool.spec(self._default_role)
        for role in (spec.role, *spec.fallback):
            try:
                inspect_weights(pool.spec(role))
                return
            except LoadError as exc:
                errors.append(str(exc))
        raise LoadError('; '.join(errors))

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._goal_stop.clear()
        self._stop_reason = ''
        self._active = True
        self._state_label = 'active'
        self.queue.close('')
        self.get_logger().info('active: generate and swap open')
        self._publish_status()
        return super().on_activate(state)

    def _close_goals(self, reason: str, wait_s: float) -> bool:
        """Refuse new goals, answer waiting ones and stop the running one, with `reason`."""
        self._active = False
        self._stop_reason = reason
        self.queue.close(reason)
        self._goal_stop.set()
        dropped = self.queue.drop_queued(reason)
        if not self.queue.wait_idle(wait_s):
            self.get_logger().warning(f'a goal was still running {wait_s:.0f} s after: {reason}')
            return False
        if dropped:
            self.get_logger().info(f'{dropped} waiting goal(s) answered: {reason}')
        return True

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._close_goals('model manager deactivated', 10.0)
        self._state_label = 'inactive'
        self.get_logger().info('inactive: generate and swap closed')
        self._publish_status()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Returns after every model is unloaded and its memory given back."""
        done = self._release()
        if done is not None:
            done.result()
        self._state_label = 'unconfigured'
        self._publish_status()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._close_goals('model manager shutting down', STOP_WAIT_S)
        done = self._release()
        self._state_label = 'finalized'
        if done is not None:
            done.result()  # bounded: the cancelled load stops at its next step
        self._publish_status()
        return TransitionCallbackReturn.SUCCESS

    def _release(self) -> Optional['Future[str]']:
        """Cancel the running load and unload everything in the loader thread."""
        pool = self.pool
        if pool is None:
            return None
        self._cancel.set()
        self.pool = None
        self._retiring.append(pool)

        def unload() -> None:
            try:
                pool.unload_all()
                self.get_logger().info('all models unloaded')
            finally:
                self._retiring.remove(pool)
        return self._submit(unload)

    # ---- actions -----------------------------------------------------------------------------
    def _on_goal(self, goal: object) -> GoalResponse:
        what = 'swap' if isinstance(goal, SwapModel.Goal) else 'generate'
        if not self._active or self.pool is None:
            self.get_logger().warning(f'{what} goal refused: model manager is not active '
                                      f'({self._state_label})')
            return GoalResponse.REJECT
        refusal = self.queue.refusal()
        if refusal:
            self.get_logger().warning(f'{what} goal refused: {refusal}')
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def _dropped(self, gh: ServerGoalHandle, reason: Optional[str]) -> Any:
        """Answer a goal taken out of the queue: cancelled, or closed with `reason`."""
        result: Any = SwapModel.Result() if isinstance(gh.request, SwapModel.Goal) \
            else Generate.Result()
        if reason == '':
            reason = 'model manager is not active'
        return answer_dropped(gh, result, reason, result.INACTIVE)

    def _run_goal(self, gh: ServerGoalHandle, result: Any, what: str,
                  work: Callable[[ModelPool, Callable[[], bool]], None]) -> Any:
        """The part every goal shares: refuse when not serving, stop on cancel, deactivate or
        shutdown, and turn every failure into a result code (never a dead node)."""
        pool = self.pool
        if pool is None or not self._active or self._goal_stop.is_set():
            gh.abort()
            result.error_code = result.INACTIVE
            result.error_msg = self._stop_reason or 'model manager is not active'
            return result
        cancel, goal_stop = self._cancel, self._goal_stop

        def should_stop() -> bool:
            return gh.is_cancel_requested or cancel.is_set() or goal_stop.is_set()
        try:
            work(pool, should_stop)
        except Exception as exc:
            result.error_code, result.error_msg = self._error_code(exc, result), str(exc)
            if result.error_code == result.CANCELLED and gh.is_cancel_requested:
                gh.canceled()
                return result
            if result.error_code == result.CANCELLED:   # deactivate or shutdown, not the client
                result.error_code = result.INACTIVE
                result.error_msg = self._stop_reason or 'model manager is shutting down'
            else:
                self.get_logger().error(f'{what} failed: {exc}')
            gh.abort()
            return result
        gh.succeed()
        return result

    def _execute_generate(self, gh: ServerGoalHandle) -> Generate.Result:
        goal: Generate.Goal = gh.request
        result = Generate.Result()
        produced = [0]

        def on_text(piece: str) -> None:
            produced[0] += 1
            gh.publish_feedback(Generate.Feedback(text=piece, completion_tokens=produced[0]))

        def work(pool: ModelPool, should_stop: Callable[[], bool]) -> None:
            g = pool.generate(goal.role, [ChatTurn(m.role, m.content) for m in goal.messages],
                              max_new_tokens=goal.max_new_tokens, temperature=goal.temperature,
                              on_text=on_text, should_stop=should_stop,
                              complexity=goal.complexity or None, preamble=goal.preamble,
                              memory=list(goal.memory))
            result.text, result.model, result.role = g.text, g.model_id, g.role
            result.memory_used = g.memory_used
            result.swapped, result.truncated = g.swapped, g.truncated
            result.prompt_tokens, result.completion_tokens = g.prompt_tokens, g.completion_tokens
            result.time_to_first_token_s, result.duration_s = g.time_to_first_token_s, g.duration_s
            result.requested_role, result.fallback = g.requested_role, g.fallback
            if g.decision == 'fallback':
                # Said once per reason: a missing model is news once, not on every turn
                # (models/status and each Response keep saying it).
                if g.fallback not in self._fallbacks_said:
                    self._fallbacks_said.add(g.fallback)
                    self.get_logger().warning(g.fallback)
            elif g.fallback:
                self.get_logger().info(g.fallback)
            if g.swapped:
                self.get_logger().info(f'loaded {g.role!r} ({g.model_id}) for a generate request')
        return self._run_goal(gh, result, 'generate', work)

    @staticmethod
    def _error_code(exc: Exception, result: Any) -> int:
        """The result code of `exc` in a Generate or SwapModel result."""
        for kind, name in ((UnknownRole, 'UNKNOWN_ROLE'), (Cancelled, 'CANCELLED'),
                           (LoadError, 'LOAD_FAILED'), (ValueError, 'INVALID_INPUT')):
            if isinstance(exc, kind) and hasattr(result, name):
                return int(getattr(result, name))
        return int(getattr(result, 'FAILED', result.LOAD_FAILED))

    def _execute_swap(self, gh: ServerGoalHandle) -> SwapModel.Result:
        goal: SwapModel.Goal = gh.request
        result = SwapModel.Result()
        t0 = time.monotonic()
        last: Dict[str, Any] = {'stage': '', 'fraction': -1.0}

        def progress(p: LoadProgress) -> None:
            # every stage change, each 1 % of the bytes, and the end
            if p.stage != last['stage'] or p.fraction - last['fraction'] >= 0.01 \
                    or p.fraction >= 1.0:
                last.update(stage=p.stage, fraction=p.fraction)
                gh.publish_feedback(SwapModel.Feedback(
                    stage=p.stage, progress=float(p.fraction), bytes_done=p.bytes_done,
                    bytes_total=p.bytes_total, shards_done=p.shards_done,
                    shards_total=p.shards_total))

        def work(pool: ModelPool, should_stop: Callable[[], bool]) -> None:
            entry = pool.load(goal.role, reason=goal.reason or 'swap request', progress=progress,
                              should_stop=should_stop, retry_failed=True)
            result.model, result.memory_bytes = entry.spec.model_id, entry.memory_bytes
            result.duration_s = time.monotonic() - t0
            self.get_logger().info(f'swap to {goal.role!r} done in {result.duration_s:.1f} s')
        return self._run_goal(gh, result, 'swap', work)


    def destroy_node(self) -> None:
        """Bounded (~3 s) even during a generation or a load: running work is cancelled, never
        waited out."""
        deadline = time.monotonic() + STOP_WAIT_S   # goals and loads stop side by side
        self._cancel.set()
        self._loader.shutdown(wait=False, cancel_futures=True)
        self._active = False
        self._state_label = 'shutting down'
        self._heartbeat.publish_last()
        goals_done = self._close_goals('model manager shutting down', STOP_WAIT_S)
        for pool in [self.pool, *self._retiring]:
            if pool is not None:
                pool.listeners.clear()  # a generation still running must not publish any more
        loader_done = self._submit_done(max(0.0, deadline - time.monotonic()))
        if self._store is not None and loader_done and goals_done:
            self._store.close()   # else left to the process exit: a load still writes to it
        # Destroyed servers turn a late goal's succeed/abort/feedback into no-ops (a goal still
        # stuck in an uninterruptible load ends after this), not errors on a destroyed node.
        self._generate.destroy()
        self._swap.destroy()
        super().destroy_node()

    def _submit_done(self, timeout_s: float) -> bool:
        """Whether the loader thread's jobs ended within `timeout_s` (a cancelled load stops at
        its next step; a `from_pretrained` in progress cannot be interrupted)."""
        deadline = time.monotonic() + timeout_s
        for job in list(self._jobs):
            try:
                job.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - timed out or cancelled: checked below
                pass
        return all(j.done() for j in self._jobs)

    # ---- liveness ----------------------------------------------------------------------------
    def _liveness(self) -> Tuple[bool, str, int, int]:
        """Heartbeat: ready = active with a model loaded (or loading for a goal)."""
        active, queued = self.queue.counts()
        pool = self.pool
        if not self._active or pool is None:
            return False, f'model manager {self._state_label}', active, queued
        if not pool.loaded() and not pool.loading_role:
            return False, f'no model loaded ({pool.last_error or self._error or "unknown"})', \
                active, queued
        return True, '', active, queued

    # ---- status ------------------------------------------------------------------------------
    def _publish_status(self) -> None:
        # Lifecycle callbacks, goals and the loader thread all publish: one at a time, so the
        # last message out is built from the latest state, never a stale snapshot.
        with self._status_lock:
            self._publish_status_locked()
            ready = self._liveness()[:2]
            changed, self._last_ready = ready != self._last_ready, ready
        if changed:
            self._heartbeat.publish()

    def _publish_status_locked(self) -> None:
        pool = self.pool
        msg = ModelStatus(stamp=stamp(), lifecycle_state=self._state_label,
                          available_roles=list(self._roles), default_role=self._default_role,
                          error=self._error or (pool.last_error if pool is not None else ''),
                          memory_budget_bytes=int(self._p('memory_budget_gib') * GIB))
        pools = [p for p in [*self._retiring, pool] if p is not None]
        loaded = [e for p in pools for e in p.loaded()]
        msg.loaded = [LoadedModel(
            role=e.spec.role, model_id=e.spec.model_id, path=e.spec.path, device=e.spec.device,
            dtype=e.spec.dtype, memory_bytes=e.memory_bytes,
            load_duration_s=float(e.load_duration_s), loaded_at=stamp(e.loaded_at),
            keep_resident=e.spec.keep_resident, uses=e.uses, adapter=e.adapter) for e in loaded]
        msg.busy = any(p.busy for p in pools)
        msg.memory_used_bytes = sum(e.memory_bytes for e in loaded)
        msg.memory_available_bytes = available_memory(
            self._p(f'models.{self._default_role}.device'))
        if pool is not None:
            msg.loading_role = pool.loading_role
            msg.swap_count = pool.swap_count
            history = list(reversed(pool.history))[:self._p('history_size')]
            msg.history = [record_msg(e) for e in history]
            if history:
                msg.last_swap = msg.history[0]
        self._status_pub.publish(msg)


def main(args: Optional[List[str]] = None) -> int:
    return run_node(ModelManagerNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
