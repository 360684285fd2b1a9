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
it is active with a model loaded (or loading for a goal). Generate and infer goals name their
`requester`; one whose requester's heartbeat stopped, or which restarted, is stopped (or not
started) and answered `abandoned: ...`: nobody waits for it, and it must not hold the model.

A model entry configured for CUDA loads on the CPU when CUDA is absent (`cpu_fallback`, said
once per role); `device: auto` means CUDA when available, else the CPU.

Every entry has a kind (`models.<role>.kind`: chat, speech, vision, omni, embedding). Chat
entries answer `generate`; the others answer `model_manager/infer` (speech to text, face
detection, an omni pass, embeddings), loaded on first use, or right after the default role at
configure when listed in `preload` (a preload that fails is a warning, not a failed configure).
Infer goals have a FIFO of their own (`max_infer_goals`, `infer_concurrency` running at once),
so a transcription or an embedding never waits behind a long generation: the pool runs
different models side by side and the same model one call at a time. They share the memory
budget, eviction and fallback; each is logged in one line with its role, task, load and run
seconds and what it evicted. A generate goal naming a non-chat role, or an infer goal naming a chat role or a task
its kind does not serve, is refused with INVALID_INPUT and the reason.

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
from sage_interfaces.action import Generate, Infer, SwapModel
from sage_interfaces.msg import Detection as DetectionMsg
from sage_interfaces.msg import LoadedModel, ModelStatus, SwapRecord

from .. import names
from ..core.conversation import ChatTurn
from ..core.inference import (KIND_CHAT, KINDS, TASK_KINDS, InferRequest, MediaError)
from ..core.models import (Cancelled, LoadError, LoadProgress,
                           ModelError, ModelPool, ModelSpec, ProgressFn, SwapEvent, UnknownRole,
                           available_memory, locate_model_dir, resolve_device)
from ..core.store import StateStore, resolve_state_file
from ..core.swap_policy import GIB, PolicyConfig, SwapPolicy
from .common import LATCHED, RESULT_KEEP_S, ConfigError, declare, run_node, stamp
from .goal_queue import GoalQueue, answer_dropped
from .liveness import HeartbeatPublisher, LivenessWatch, declare_liveness_timeout

ENTRY_FIELDS = ('kind', 'model_id', 'path', 'dtype', 'device', 'max_new_tokens',
                'context_window', 'keep_resident', 'priority', 'fallback', 'adapter', 'language')
# The dtype an entry of each kind loads with unless configured (speech: a CTranslate2 compute
# type; vision: ignored).
DEFAULT_DTYPE = {'chat': 'bfloat16', 'omni': 'bfloat16', 'embedding': 'float32',
                 'speech': 'int8', 'vision': 'float32'}
SPEECH_RATE = 16000   # [Hz] what the speech runners take
# CTranslate2 compute types a CPU runs; a speech entry for CUDA that loads on the CPU
# (cpu_fallback) with another one uses int8.
SPEECH_CPU_TYPES = frozenset({'int8', 'int8_float32', 'float32', 'default'})
NO_FALLBACK = 'none'
STOP_WAIT_S = 2.5     # [s] destroy_node waits this long for the running goal to stop


def default_fallback(roles: List[str], role: str) -> List[str]:
    """The roles below `role` (nearest first), then the ones above: a smaller model is the
    likelier to fit when a bigger one cannot be used. `roles` are those of `role`'s kind."""
    i = roles.index(role)
    return list(reversed(roles[:i])) + roles[i + 1:] or [NO_FALLBACK]


def infer_request(goal: Infer.Goal) -> InferRequest:
    """An Infer goal's media decoded into an InferRequest; MediaError says what is wrong."""
    from ..core.perception.audio import from_pcm16, resample
    from ..core.perception.image import decode_image
    audio = None
    rate = int(goal.sample_rate)
    if len(goal.audio):
        if rate <= 0:
            raise MediaError('audio given with sample_rate 0')
        audio = from_pcm16(bytes(goal.audio))
        if goal.task in ('transcribe', 'omni') and rate != SPEECH_RATE:
            audio, rate = resample(audio, rate, SPEECH_RATE), SPEECH_RATE
    image = None
    if goal.image_format or len(goal.image_data):
        image = decode_image(goal.image_format, int(goal.width), int(goal.height),
                             bytes(goal.image_data))
    return InferRequest(task=goal.task, audio=audio, sample_rate=rate or SPEECH_RATE,
                        image=image, prompt=goal.prompt, texts=tuple(goal.texts),
                        respond=bool(goal.respond), max_new_tokens=int(goal.max_new_tokens))


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
        if self._kinds[self._default_role] != KIND_CHAT:
            raise ConfigError(f'default_role {self._default_role!r} is a '
                              f'{self._kinds[self._default_role]} entry; it must be a chat one')
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
        # The nodes that send goals: a goal whose requester stopped or restarted is stopped
        # (a killed language block must not hold the model for the rest of its answer).
        self._requesters = LivenessWatch(self, declare_liveness_timeout(self))
        # Generate and swap share one FIFO, one goal at a time; infer has its own (a short
        # transcription or embedding must not wait behind a long generation). Goal requests
        # are handled in one mutually exclusive group, which keeps the counts exact.
        self.queue = GoalQueue('model manager', lambda: int(self._p('max_goals')), self._dropped,
                               concurrency=1, on_change=self._heartbeat.publish)
        self.infer_queue = GoalQueue('model manager infer', lambda: int(self._p('max_infer_goals')),
                                     self._dropped, concurrency=int(self._p('infer_concurrency')),
                                     on_change=self._heartbeat.publish)
        for queue in (self.queue, self.infer_queue):
            queue.close('model manager is not active')
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
        self._infer = ActionServer(
            self, Infer, names.MODEL_INFER,
            execute_callback=self.infer_queue.wrap(self._execute_infer),
            goal_callback=self._on_goal, handle_accepted_callback=self.infer_queue.handle_accepted,
            cancel_callback=self.infer_queue.cancel_callback, callback_group=group,
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
        self._kinds: Dict[str, str] = {}
        for role in self._roles:
            kind = declare(self, f'models.{role}.kind', KIND_CHAT,
                           f'What the {role} model is: {", ".join(KINDS)} (chat entries answer '
                           'generate, the others infer)', read_only=True)
            if kind not in KINDS:
                raise ConfigError(f'models.{role}.kind: {kind!r} is not one of '
                                  f'{", ".join(KINDS)}')
            self._kinds[role] = kind
        for i, role in enumerate(self._roles):
            m = f'models.{role}.'
            kind = self._kinds[role]
            same_kind = [r for r in self._roles if self._kinds[r] == kind]
            declare(self, m + 'model_id', role, f'Name of the {role} model')
            declare(self, m + 'path', '', f'Directory (or `offline:NAME`, `package:PKG/dir`, '
                    f'`opencv:FILE`, or a hub id in the local cache) of the {role} model')
            declare(self, m + 'dtype', DEFAULT_DTYPE[kind],
                    'Precision to load with: torch dtype (float32, float16, bfloat16) for chat, '
                    'omni and embedding entries; CTranslate2 compute type (int8, int8_float32, '
                    'int8_float16, float16, float32, default) for speech; ignored for vision')
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
            declare(self, m + 'fallback', default_fallback(same_kind, role),
                    f'Roles tried in order when the {role} model cannot be used '
                    f'([{NO_FALLBACK}] = none; by default the other entries of its kind)')
            declare(self, m + 'adapter', '',
                    'LoRA adapter merged into the weights after each load: "" = none, '
                    '"latest" = the current sleep-trained adapter of this model (the base '
                    'model until one exists), or a directory; a missing or broken adapter '
                    'loads the base model with a warning')
            declare(self, m + 'language', '',
                    'Speech entries: the spoken language (a Whisper code such as en, de, fr); '
                    '"" = detected per utterance; ignored by other kinds')
        self._default_role: str = declare(self, 'default_role', 'small',
                                          'Role loaded on configure (a chat entry)',
                                          read_only=True)
        self._preload: List[str] = [r for r in declare(
            self, 'preload', [NO_FALLBACK],
            'Roles loaded right after the default role at configure (e.g. [speech, vision]); '
            f'the others load on first use ([{NO_FALLBACK}] = none); a failed preload is a '
            'warning', read_only=True) if r != NO_FALLBACK]
        unknown = [r for r in self._preload if r not in self._roles]
        if unknown:
            raise ConfigError(f'preload: {unknown} are not configured roles '
                              f'({", ".join(self._roles)})')
        declare(self, 'autostart', True,
                'Configure and activate on start-up, without a lifecycle manager', read_only=True)
        declare(self, 'max_resident', 1, 'Chat models kept resident at once (other kinds '
                'count only against the memory budget)', min_value=1,
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
        declare(self, 'max_infer_goals', 8,
                'Infer goals running or waiting at once, in a FIFO of their own (they never wait '
                'behind a generation); more are refused', min_value=1, max_value=64)
        declare(self, 'infer_concurrency', 2,
                'Infer goals run at once (different models side by side; one model serves one '
                'call at a time)', read_only=True, min_value=1, max_value=8)
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
            if device == 'cpu' and values['kind'] == 'speech' and \
                    values['dtype'] not in SPEECH_CPU_TYPES:
                gpu_only = f'compute type {values["dtype"]} is GPU-only: int8 on the CPU'
                note = f'{note}; {gpu_only}' if note else gpu_only
                values['dtype'] = 'int8'
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
        chat = values['kind'] == KIND_CHAT
        mixed = [r for r in fallback if (self._kinds[r] == KIND_CHAT) != chat]
        if mixed:
            raise ValueError(f'models.{role}.fallback: {mixed} cannot stand in for a '
                             f'{values["kind"]} entry (chat and non-chat entries do not mix)')
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
                if field_name == 'path' and self._kinds[role] == KIND_CHAT:
                    locate_model_dir(spec)   # other kinds' files are checked by their load
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
        for problem in pool.import_libraries():
            self.get_logger().warning(f'{problem}; its roles cannot load')
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
        if self._preload:
            self._submit(lambda: self._load_preload(pool, cancel))
        return TransitionCallbackReturn.SUCCESS

    def _load_preload(self, pool: ModelPool, cancel: threading.Event) -> None:
        """The `preload` roles, after the default one: each that fails is a warning (its infer
        goals then fall back or fail with the reason), never a failed configure."""
        for role in self._preload:
            if cancel.is_set():
                return
            if pool.is_loaded(role):
                continue
            spec = pool.spec(role)
            try:
                entry = pool.load(role, reason='preload', should_stop=cancel.is_set,
                                  retry_failed=True)
            except LoadError as exc:
                self.get_logger().warning(f'preload of {role!r} ({spec.model_id}) failed: {exc}')
                continue
            self.get_logger().info(f'preloaded {role!r} ({spec.kind}: {spec.model_id}) in '
                                   f'{entry.load_duration_s:.1f} s '
                                   f'({entry.memory_bytes / 1e6:.0f} MB)')

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
                pool.inspect(role)
                return
            except LoadError as exc:
                errors.append(str(exc))
        raise LoadError('; '.join(errors))

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._goal_stop.clear()
        self._stop_reason = ''
        self._active = True
        self._state_label = 'active'
        for queue in (self.queue, self.infer_queue):
            queue.close('')
        self.get_logger().info('active: generate, swap and infer open')
        self._publish_status()
        return super().on_activate(state)

    def _close_goals(self, reason: str, wait_s: float) -> bool:
        """Refuse new goals, answer waiting ones and stop the running one, with `reason`."""
        self._active = False
        self._stop_reason = reason
        queues = (self.queue, self.infer_queue)
        for queue in queues:
            queue.close(reason)
        self._goal_stop.set()
        dropped = sum(queue.drop_queued(reason) for queue in queues)
        deadline = time.monotonic() + wait_s
        if not all(q.wait_idle(max(0.0, deadline - time.monotonic())) for q in queues):
            self.get_logger().warning(f'a goal was still running {wait_s:.0f} s after: {reason}')
            return False
        if dropped:
            self.get_logger().info(f'{dropped} waiting goal(s) answered: {reason}')
        return True

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._close_goals('model manager deactivated', 10.0)
        self._state_label = 'inactive'
        self.get_logger().info('inactive: generate, swap and infer closed')
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
        what = 'swap' if isinstance(goal, SwapModel.Goal) else \
            'infer' if isinstance(goal, Infer.Goal) else 'generate'
        if not self._active or self.pool is None:
            self.get_logger().warning(f'{what} goal refused: model manager is not active '
                                      f'({self._state_label})')
            return GoalResponse.REJECT
        refusal = (self.infer_queue if what == 'infer' else self.queue).refusal()
        if refusal:
            self.get_logger().warning(f'{what} goal refused: {refusal}')
            return GoalResponse.REJECT
        return GoalResponse.ACCEPT

    def _dropped(self, gh: ServerGoalHandle, reason: Optional[str]) -> Any:
        """Answer a goal taken out of the queue: cancelled, or closed with `reason`."""
        result: Any = SwapModel.Result() if isinstance(gh.request, SwapModel.Goal) \
            else Infer.Result() if isinstance(gh.request, Infer.Goal) else Generate.Result()
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
        abandoned = self._abandoned(gh.request)

        def should_stop() -> bool:
            return (gh.is_cancel_requested or cancel.is_set() or goal_stop.is_set()
                    or bool(abandoned()))
        try:
            early = abandoned()
            if early:             # its requester stopped while the goal waited in the queue
                raise Cancelled(early)
            work(pool, should_stop)
        except Exception as exc:
            result.error_code, result.error_msg = self._error_code(exc, result), str(exc)
            if result.error_code == result.CANCELLED and gh.is_cancel_requested:
                gh.canceled()
                return result
            why = abandoned() if result.error_code == result.CANCELLED else ''
            if why:
                result.error_msg = f'abandoned: {why}'
                self.get_logger().warning(f'{what} goal stopped: {why}, nobody waits for it')
                gh.abort()
                return result
            if result.error_code == result.CANCELLED:   # deactivate or shutdown, not the client
                result.error_code = result.INACTIVE
                result.error_msg = self._stop_reason or 'model manager is shutting down'
            elif result.error_code == getattr(result, 'INVALID_INPUT', -1):
                self.get_logger().warning(f'{what} goal refused: {exc}')   # the sender's mistake
            else:
                self.get_logger().error(f'{what} failed: {exc}')
            gh.abort()
            return result
        gh.succeed()
        return result

    def _abandoned(self, goal: Any) -> Callable[[], str]:
        """Why nobody waits for this goal any more, asked as it runs ('' = its requester
        runs, or the goal names none, as SwapModel goals and `ros2 action send_goal` do)."""
        node = str(getattr(goal, 'requester', ''))
        instance = str(getattr(goal, 'requester_instance', ''))
        if not node:
            return lambda: ''

        def why() -> str:
            stopped = self._requesters.stopped(node, instance)
            return f'its requester {node} {stopped}' if stopped else ''
        return why

    def _execute_generate(self, gh: ServerGoalHandle) -> Generate.Result:
        goal: Generate.Goal = gh.request
        result = Generate.Result()
        produced = [0]

        def on_text(piece: str) -> None:
            produced[0] += 1
            gh.publish_feedback(Generate.Feedback(text=piece, completion_tokens=produced[0]))

        def work(pool: ModelPool, should_stop: Callable[[], bool]) -> None:
            spec = pool.spec(goal.role)
            if spec.kind != KIND_CHAT:
                raise ValueError(self._not_chat(spec.role, spec.kind))
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

    def _not_chat(self, role: str, kind: str) -> str:
        chat = [r for r in self._roles if self._kinds[r] == KIND_CHAT]
        return (f'role {role!r} is a {kind} entry: generate serves the chat roles '
                f'({", ".join(chat)}); send its goals to {names.MODEL_INFER}')

    def _infer_role(self, pool: ModelPool, role: str, task: str) -> str:
        """The role an infer goal runs on: `role`, or the first entry whose kind serves
        `task` when it is ''; ValueError (INVALID_INPUT) when the pair does not fit."""
        kinds = TASK_KINDS.get(task)
        if kinds is None:
            raise ValueError(f'unknown infer task {task!r}; expected one of '
                             f'{", ".join(TASK_KINDS)}')
        if not role:
            serving = [r for r in self._roles if self._kinds[r] in kinds]
            if not serving:
                raise UnknownRole(f'no configured role serves task {task!r} (kinds '
                                  f'{", ".join(kinds)})')
            return serving[0]
        kind = pool.spec(role).kind            # UnknownRole for a role not configured
        if kind == KIND_CHAT:
            raise ValueError(f'role {role!r} is a chat entry: infer serves speech, vision, omni '
                             f'and embedding entries; send its goals to {names.MODEL_GENERATE}')
        if kind not in kinds:
            raise ValueError(f'role {role!r} is a {kind} entry; task {task!r} needs a '
                             f'{" or ".join(kinds)} entry')
        return role

    def _execute_infer(self, gh: ServerGoalHandle) -> Infer.Result:
        goal: Infer.Goal = gh.request
        result = Infer.Result()
        stage = ['']

        def feedback(name: str, fraction: float) -> None:
            if name != stage[0] or fraction >= 1.0:
                stage[0] = name
                gh.publish_feedback(Infer.Feedback(stage=name, progress=float(fraction)))

        def work(pool: ModelPool, should_stop: Callable[[], bool]) -> None:
            role = self._infer_role(pool, goal.role, goal.task)
            request = infer_request(goal)
            roles = {role, *pool.spec(role).fallback}

            def on_load(p: LoadProgress) -> None:
                if p.role in roles:
                    feedback('running' if p.stage == 'done' else 'loading', p.fraction)
            feedback('running' if pool.is_loaded(role) else 'loading', 0.0)
            self.load_listeners.append(on_load)
            try:
                r = pool.infer(role, request, should_stop=should_stop)
            finally:
                self.load_listeners.remove(on_load)
            out = r.output
            result.role, result.model, result.kind = r.role, r.model_id, r.kind
            result.requested_role, result.fallback = r.requested_role, r.fallback
            result.swapped, result.evicted = r.swapped, list(r.evicted)
            result.text, result.language = out.text, out.language
            result.detections = [DetectionMsg(label=d.label, score=float(d.score), x=int(d.x),
                                              y=int(d.y), width=int(d.width),
                                              height=int(d.height)) for d in out.detections]
            if out.vectors is not None and len(out.vectors):
                result.dim = int(out.vectors.shape[1])
                result.vectors = out.vectors.astype('float32').reshape(-1).tolist()
            result.load_s, result.run_s = float(r.load_s), float(r.run_s)
            feedback('running', 1.0)
            if r.fallback and r.fallback not in self._fallbacks_said:
                self._fallbacks_said.add(r.fallback)    # said once per reason
                self.get_logger().warning(r.fallback)
            evicted = (f'; evicted {", ".join(repr(e) for e in r.evicted)} to load {r.role!r}'
                       if r.evicted else '')
            self.get_logger().info(
                f'infer {goal.task} on {r.role!r} ({r.model_id}): load {r.load_s:.2f} s, run '
                f'{r.run_s:.2f} s{evicted}')
        return self._run_goal(gh, result, 'infer', work)

    @staticmethod
    def _error_code(exc: Exception, result: Any) -> int:
        """The result code of `exc` in a Generate, SwapModel or Infer result."""
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
        self._infer.destroy()
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
        counts = [q.counts() for q in (self.queue, self.infer_queue)]
        active, queued = sum(c[0] for c in counts), sum(c[1] for c in counts)
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
            role=e.spec.role, kind=e.spec.kind, model_id=e.spec.model_id, path=e.spec.path,
            device=e.spec.device, dtype=e.spec.dtype, memory_bytes=e.memory_bytes,
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
