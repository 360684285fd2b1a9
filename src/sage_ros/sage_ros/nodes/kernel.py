"""Kernel node: runs the cognition engine (`core.kernel.Kernel`) on the ROS graph.

Thin by design: it declares one parameter per engine constant (documentation, unit and range
come from the core dataclasses), converts messages, turns the engine's decisions into action
goals, cancels and messages, and logs. A cycle runs at `cycle_rate_hz` and after every
observation.

Observations come typed on `observations/text` (the sender's id and source) or bare on
`text_in` (source 'text', id '<source>/<turn>'); every answer carries both. Utterances on
`observations/audio` and frames on `observations/vision` are scored on their features, sent to
the perception block when they deserve it, published as percepts on `percepts`, and turned into
language turns (Response.modality 'speech' or 'vision'); `kernel_perception.PerceptionDesk`
does that part, and recent visual descriptions go to every language goal as its `context`.
The graph is ready (`KernelState.ready`) when a conversation block beats ready on `heartbeat`
and its action server is reachable; until then observations wait. A block whose heartbeat stops
(killed, hung) or whose instance changes (restarted) fails its running goals at once and counts
as not loaded until it beats ready again.

Sessions: the kernel owns the robot's session (`core.memory.store.MemoryStore`, on the same
SQLite file as trust and weights), kept by `kernel_sessions.SessionKeeper`. At start it closes
the sessions a `kill -9` left open (one log line each) and opens the next; every finished turn
(answered, rejected, failed, expired, cancelled) is journalled, durably, before its Response is
published, so a user who saw an answer finds it after any crash. `session/end` closes the
session with a summary and a "remember next time" note by the small model (extractive when no
model answers), opens the next and dreams if asked; `kernel/sleep` enters DREAM now.
SIGINT/SIGTERM close the session extractively (the model manager goes down at the same
moment); the memory block dreams it at the next start.

Time: stamps, the cycle and the engine's `now` follow the node clock, so with `use_sim_time`
decisions follow `/clock`. On the system clock the engine runs on wall time at start advanced by
the monotonic clock, so a wall-clock step (NTP at boot) cannot fire or stall deadlines. Liveness
and readiness are checked on the steady clock: a process is gone after real seconds of silence,
even while a simulation is paused.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from collections import deque
from typing import (Any, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple, TypeVar,
                    cast)

import numpy as np
from action_msgs.msg import GoalStatus
from builtin_interfaces.msg import Time
from rcl_interfaces.msg import SetParametersResult
from rclpy.action import ActionClient
from rclpy.action.client import ClientGoalHandle
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType, ROSClock
from rclpy.exceptions import ParameterException
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.task import Future
from sage_interfaces.action import Language, Memory, Perception, Reasoning
from sage_interfaces.msg import (AudioObservation, BlockDescription, KernelState, MemoryStatus,
                                 Percept, Response, ResponseChunk, Salience, TextObservation,
                                 TrustLevel, VisualObservation)
from sage_interfaces.srv import EndSession, Sleep
from std_msgs.msg import String

from .. import names
from ..core.blocks import BlockDescriptor, BlockType
from ..core.embeddings import EmbeddingError, minilm_path, shared_embedder
from ..core.kernel import (ACTION_LANGUAGE, ACTION_REASONING, KIND_REASONING, CycleResult,
                           Dispatch, Kernel, KernelConfig, Rejection, WorkResult,
                           config_params, config_with)
from ..core.liveness import RESTARTED, Beat
from ..core.metabolism import NONE, MetabolicState
from ..core.routing import Complexity
from ..core.memory.store import MemoryStore, Session
from ..core.salience import SalienceScore, SnarcSalience, ngram_embedder
from ..core.store import resolve_state_file
from .common import (LATCHED, LATCHED_MANY, OBSERVATIONS_IN, RELIABLE, ConfigError, declare,
                     declare_router, run_node)
from .kernel_perception import PerceptionDesk
from .kernel_sessions import (STATUS_CANCELLED, STATUS_EXPIRED, STATUS_FAILED, STATUS_OK,
                              STATUS_REJECTED, SessionKeeper, declare_session_parameters)
from .liveness import HeartbeatPublisher, LivenessWatch, declare_liveness_timeout

TEXT_SENSOR_ID = 'text'    # the source of `text_in`, and of a TextObservation that names none
# Every block action of the contract and its type; the kernel is the client of all of them.
BLOCK_ACTIONS = {names.BLOCK_LANGUAGE: Language, names.BLOCK_PERCEPTION: Perception,
                 names.BLOCK_MEMORY: Memory, names.BLOCK_REASONING: Reasoning}
EMBEDDERS = ('minilm', 'ngram')
CONVERSATION = 'conversation'
READINESS_PERIOD_S = 0.1    # [s] how often block heartbeats and servers are checked (steady)
# Answers out: as deep as observations in, so a burst's 1,000 answers (most saying why they were
# not served) are not overwritten in the writer's history before a slow reader takes them.
ANSWERS_OUT = QoSProfile(depth=1000, history=HistoryPolicy.KEEP_LAST,
                         reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.VOLATILE)
F = TypeVar('F', bound=Callable[..., Any])


def _locked(method: F) -> F:
    """Run a callback under the node's lock: action futures complete on executor tasks outside
    the kernel's callback group, and parameter and liveness callbacks on their own groups."""
    @functools.wraps(method)
    def wrapper(self: 'KernelNode', *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)
    return cast(F, wrapper)


class _FallbackEmbedder:
    """MiniLM, or the hashing embedder if MiniLM cannot be loaded (said once in the log)."""

    def __init__(self, node: Node, prefer_minilm: bool) -> None:
        self._node = node
        self._fallback = ngram_embedder()
        self._minilm = prefer_minilm
        if prefer_minilm:
            try:
                minilm_path()
            except EmbeddingError as exc:
                self._use_fallback(exc)

    def _use_fallback(self, exc: Exception) -> None:
        self._minilm = False
        self._node.get_logger().warning(f'salience: {exc}; novelty uses hashed character '
                                        'n-grams instead of MiniLM')

    def minilm_embedder(self) -> Optional[Callable[[Sequence[str]], np.ndarray]]:
        """MiniLM itself (no fallback: memories must all be in one embedding space), or None
        when it cannot be loaded."""
        if not self._minilm:
            return None
        return lambda texts: shared_embedder().embed(texts)

    def warm_up(self) -> None:
        if self._minilm:
            threading.Thread(target=self, args=(['warm up'],), daemon=True).start()

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if self._minilm:
            try:
                return shared_embedder().embed(texts)
            except EmbeddingError as exc:
                self._use_fallback(exc)
        return self._fallback(texts)


def _ros_value(value: Any) -> Any:
    """A config value as a ROS parameter value (an empty list cannot be declared: 'none')."""
    if isinstance(value, tuple):
        return list(value) or [NONE]
    return value


def first_turn_id() -> int:
    """Turn ids increase across kernel restarts: the counter starts at wall ms * 1000."""
    return int(time.time() * 1000) * 1000


class KernelNode(Node):
    """Thin adapter over `core.kernel.Kernel`: every decision is made there."""

    def __init__(self, node_name: str = names.KERNEL,
                 complexity: Optional[Callable[[str], Complexity]] = None,
                 **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self._lock = threading.RLock()    # parameter callbacks run outside the kernel's group
        self._clock_offset = time.time() - time.monotonic()
        config = self._declare_engine_parameters()
        cycle_rate_hz = declare(self, 'cycle_rate_hz', 10.0,
                                'Kernel cycles per second (one also runs on every observation) '
                                '[Hz]', read_only=True, min_value=0.1, max_value=1000.0)
        state_period_s = declare(self, 'state_period_s', 1.0,
                                 'Period of the `state` heartbeat (also published on every '
                                 'change) [s]', read_only=True, min_value=0.05, max_value=3600.0)
        state_file = declare(self, 'state_file', '',
                             "The robot's database (sessions, turn journal, memories, trust, "
                             'learned weights): "" = $SAGE_STATE_DIR/sage.db, "none" = nothing '
                             'persisted (sessions count from 1)', read_only=True)
        session_params = declare_session_parameters(self)
        embedder_name = declare(self, 'salience.text_embedder', 'minilm',
                                'Text embeddings for novelty and surprise: "minilm" (offline '
                                'MiniLM) or "ngram" (hashed character n-grams, no model)',
                                read_only=True)
        self._liveness_timeout_s = declare_liveness_timeout(self)
        if embedder_name not in EMBEDDERS:
            raise ConfigError(f'salience.text_embedder must be one of {", ".join(EMBEDDERS)}, '
                              f'got {embedder_name!r}')
        self._embedder = _FallbackEmbedder(self, embedder_name == 'minilm')
        path = resolve_state_file(state_file)
        # Opens the state file (trust and weights for the engine, sessions and memories) and
        # this run's session; notes are embedded with MiniLM only (`minilm_embedder` gives
        # None with hashed n-grams).
        self._sessions = SessionKeeper(self, path, session_params, self._embedder.minilm_embedder,
                                       self._lock, self._publish_state)
        scorer = SnarcSalience(self._embedder, config.salience, config.weights)
        self.core = Kernel(scorer, config, store=self._sessions.state_store, now=self._now(),
                           first_turn=first_turn_id())
        if complexity is None:
            complexity = declare_router(self, 'that decides language vs. reasoning')
        self.core.complexity = complexity
        self._embedder.warm_up()
        self.phase = ''   # the memory block's (core.memory.awakening), from memory/status

        # One group: observations, results and timers never race on the core's state, and the
        # action clients are only used from it. rclpy's ActionClient is not thread-safe: a goal
        # (or result) request sent from another thread can be answered before its future is
        # registered, and the answer is dropped ("Ignoring unexpected goal response"), leaving
        # the turn to its deadline. Futures' done callbacks and liveness callbacks run outside
        # the group, so they hand their work to it (`_in_group`).
        self._group = MutuallyExclusiveCallbackGroup()
        self._inbox: Deque[Callable[[], None]] = deque()
        self._wake = self.create_guard_condition(self._drain_inbox, callback_group=self._group)
        self._block_clients: Dict[str, ActionClient] = {
            self.resolve_topic_name(name): ActionClient(self, action, name,
                                                        callback_group=self._group)
            for name, action in BLOCK_ACTIONS.items()}
        self._dispatches: Dict[int, Dispatch] = {}      # sent or being sent, not yet answered
        self._goals: Dict[int, ClientGoalHandle] = {}
        self._sent_to: Dict[int, str] = {}    # turn -> instance id of the block it was sent to
        self._streamed: Set[int] = set()       # turns whose answer has begun to stream
        self._requeued: Set[int] = set()       # turns sent back in line once already
        # block -> (why, when): it refused a goal it could not start, so it serves again only
        # once a heartbeat received a full period after that says ready (one already on its
        # way may predate what the block knows)
        self._held: Dict[str, Tuple[str, float]] = {}
        self._descriptions: Dict[str, BlockDescriptor] = {}   # as announced, by block name
        self._usable: Dict[str, bool] = {}                    # heartbeat ready + server reachable
        self._fresh: set[str] = set()                         # descriptions not registered yet
        self._stopped: Dict[str, str] = {}     # block -> why it counts as stopped, until it beats
        self.ready = False
        self.ready_reason = 'starting'

        self._response_pub = self.create_publisher(Response, names.RESPONSE, ANSWERS_OUT)
        self._stream_pub = self.create_publisher(ResponseChunk, names.RESPONSE_STREAM, RELIABLE)
        self._salience_pub = self.create_publisher(Salience, names.SALIENCE, ANSWERS_OUT)
        self._state_pub = self.create_publisher(KernelState, names.STATE, LATCHED)
        self._percept_pub = self.create_publisher(Percept, names.PERCEPTS, RELIABLE)
        self._perception = PerceptionDesk(self)
        self.create_subscription(String, names.TEXT_IN, self._on_text, OBSERVATIONS_IN,
                                 callback_group=self._group)
        self.create_subscription(TextObservation, names.OBSERVATIONS_TEXT, self._on_observation,
                                 OBSERVATIONS_IN, callback_group=self._group)
        self.create_subscription(AudioObservation, names.OBSERVATIONS_AUDIO, self._on_audio,
                                 RELIABLE, callback_group=self._group)
        self.create_subscription(VisualObservation, names.OBSERVATIONS_VISION, self._on_vision,
                                 RELIABLE, callback_group=self._group)
        self.create_subscription(BlockDescription, names.BLOCKS_DESCRIPTION, self._on_block,
                                 LATCHED_MANY, callback_group=self._group)
        self.create_subscription(MemoryStatus, names.MEMORY_STATUS, self._on_memory_status,
                                 LATCHED, callback_group=self._group)
        self.create_timer(1.0 / cycle_rate_hz, self._on_cycle_timer, callback_group=self._group)
        self.create_timer(state_period_s, self._publish_state, callback_group=self._group)
        self._heartbeat = HeartbeatPublisher(self, '', self._beat_status)
        self._watch = LivenessWatch(
            self, self._liveness_timeout_s,
            on_gone=lambda beat: self._in_group(lambda: self._on_gone(beat)),
            on_event=lambda event, beat: self._in_group(
                lambda: self._on_liveness_event(event, beat)))
        self.create_timer(READINESS_PERIOD_S, self._on_readiness_timer,
                          callback_group=self._group, clock=Clock(clock_type=ClockType.STEADY_TIME))
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)
        self.create_service(Sleep, names.KERNEL_SLEEP, self._on_sleep, callback_group=self._group)
        # session/end waits for the language block's summary: its own group, so the kernel
        # keeps cycling meanwhile, and a client that is safe to call from that thread (the
        # keeper's).
        self._end_group = MutuallyExclusiveCallbackGroup()
        self.create_service(EndSession, names.SESSION_END, self._on_end_session,
                            callback_group=self._end_group)
        self.get_logger().info(
            f'kernel listening on {self.resolve_topic_name(names.OBSERVATIONS_TEXT)}, '
            f'{self.resolve_topic_name(names.TEXT_IN)}, '
            f'{self.resolve_topic_name(names.OBSERVATIONS_AUDIO)} and '
            f'{self.resolve_topic_name(names.OBSERVATIONS_VISION)}, {self.core.state.value}, ATP '
            f'{self.core.ledger.level:.0f}/{self.core.ledger.capacity:.0f}, session '
            f'{self.session.number}, state in '
            f'{path or "memory only (state_file none: sessions are not kept)"}')
        with self._lock:
            self._refresh_readiness(force=True)     # publishes the first state

    def _in_group(self, work: Callable[[], None]) -> None:
        """Run `work` in the kernel's callback group, soon (from any thread)."""
        self._inbox.append(work)
        self._wake.trigger()

    @_locked
    def _drain_inbox(self) -> None:
        while self._inbox:
            self._inbox.popleft()()

    # ---- time --------------------------------------------------------------------------------
    def _sim_time(self) -> bool:
        clock = self.get_clock()
        return isinstance(clock, ROSClock) and clock.ros_time_is_active

    def _now(self) -> float:
        """The engine's clock [s]: simulated time with use_sim_time, else wall time at start
        advanced monotonically."""
        if self._sim_time():
            return self.get_clock().now().nanoseconds * 1e-9
        return time.monotonic() + self._clock_offset

    def _stamp(self) -> Time:
        return self.get_clock().now().to_msg()

    def destroy_node(self) -> None:
        """Write the lazily persisted state (sensor trust) and close the session (extractive
        summary: the model manager is going down at the same moment) before going away."""
        core = getattr(self, 'core', None)     # absent if the constructor failed
        if core is not None:
            with self._lock:
                self._sessions.begin_shutdown()
                core.flush(self._now())
                self._sessions.close_on_shutdown()
        super().destroy_node()

    # ---- sessions ----------------------------------------------------------------------------
    @property
    def session(self) -> Session:
        """The current session (the keeper's)."""
        return self._sessions.session

    @property
    def memory(self) -> Optional[MemoryStore]:
        """The session store, None with state_file none (the keeper's)."""
        return self._sessions.memory

    def _on_memory_status(self, msg: MemoryStatus) -> None:
        """The developmental phase is the memory block's: its phases, its milestones."""
        if msg.phase != self.phase:
            self.phase = msg.phase
            self._publish_state()

    def _publish_answer(self, msg: Response, status: str) -> None:
        """Journal the finished turn (durably), then publish its Response."""
        info = self._perception.turn_info(msg.turn_id)
        if info is not None:      # a turn that began as speech or a visual event
            msg.modality, msg.perception_s = info.modality, float(info.perception_s)
            msg.audio_duration_s = float(info.audio_duration_s)
            self._perception.forget(msg.turn_id)
        elif not msg.modality:
            msg.modality = 'text'
        self._sessions.journal(msg, status)
        self._response_pub.publish(msg)

    @_locked
    def _on_sleep(self, request: Sleep.Request, response: Sleep.Response) -> Sleep.Response:
        response.success, response.message = self._sleep(request.reason or 'asked to sleep')
        return response

    def _sleep(self, reason: str) -> Tuple[bool, str]:
        t, why = self.core.sleep(self._now(), reason)
        if t is None and why:
            self.get_logger().info(f'sleep refused: {why}')
            return False, f'not now: {why}'
        if t is None:
            return True, 'already in DREAM'
        line = f'{t.source.value} -> {t.target.value}: {t.reason}'
        self.get_logger().info(line)
        self._run_cycle(publish=True)
        return True, line

    def _on_end_session(self, request: EndSession.Request,
                        response: EndSession.Response) -> EndSession.Response:
        """Close the session, open the next, and dream if asked (`SessionKeeper.end_session`:
        on its own group, it takes the node's lock itself where needed)."""
        return self._sessions.end_session(request, response, self._sleep)

    # ---- parameters --------------------------------------------------------------------------
    def _declare_engine_parameters(self) -> KernelConfig:
        """One parameter per engine constant, documented and ranged from the core."""
        self._engine_params: Dict[str, bool] = {}
        values: Dict[str, Any] = {}
        for name, doc in config_params(KernelConfig()):
            unit = f' [{doc.unit}]' if doc.unit else ''
            try:
                values[name] = declare(self, name, _ros_value(doc.default), doc.doc + unit,
                                       read_only=not doc.runtime, min_value=doc.lo,
                                       max_value=doc.hi)
            except ParameterException as exc:   # wrong type or out of range in the YAML
                raise ConfigError(f'kernel parameter {name}: {exc}') from None
            self._engine_params[name] = doc.runtime
        try:
            return config_with(KernelConfig(), values)
        except ValueError as exc:
            raise ConfigError(f'kernel parameters: {exc}') from exc

    @_locked
    def _validate_parameters(self, params: List[Parameter]) -> SetParametersResult:
        """Refuse a change that makes the engine inconsistent, with the reason."""
        changes = {p.name: p.value for p in params if p.name in self._engine_params}
        if not changes:
            return SetParametersResult(successful=True)
        try:
            config_with(self.core.config, changes)
        except ValueError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    @_locked
    def _apply_parameters(self, params: List[Parameter]) -> None:
        changes = {p.name: p.value for p in params if p.name in self._engine_params}
        if not changes:
            return
        self.core.reconfigure(config_with(self.core.config, changes))
        self.get_logger().info('parameters changed: ' + ', '.join(
            f'{k}={v}' for k, v in sorted(changes.items())))

    # ---- blocks, liveness, readiness ---------------------------------------------------------
    @_locked
    def _on_block(self, msg: BlockDescription) -> None:
        try:
            block_type = BlockType(msg.block_type)
        except ValueError:
            self.get_logger().warning(f'ignoring block {msg.name!r}: unknown type {msg.block_type!r}')
            return
        # A block that does not say how many goals it takes at once gets one.
        self._descriptions[msg.name] = BlockDescriptor(
            name=msg.name, block_type=block_type, capabilities=tuple(msg.capabilities),
            modalities=tuple(msg.modalities), action_name=msg.action_name,
            action_type=msg.action_type, loaded=msg.loaded,
            memory_estimate_bytes=msg.memory_estimate_bytes,
            concurrency=int(msg.concurrency) or 1)
        self._fresh.add(msg.name)            # registered again with its usability
        self.get_logger().info(f'block {msg.name!r} ({msg.block_type}) on {msg.action_name}: '
                               f'{", ".join(msg.capabilities)}; loaded={msg.loaded}, '
                               f'concurrency {int(msg.concurrency) or 1}')
        self._refresh_readiness(force=True)

    def _block_status(self, desc: BlockDescriptor) -> Tuple[bool, str]:
        """(usable, why not): its heartbeat says ready and its action server is reachable."""
        beat = self._watch.block(desc.name)
        if beat is None:
            return False, self._stopped.get(desc.name, f'the {desc.name} block has not sent a '
                                                       'heartbeat yet')
        held = self._held.get(desc.name)
        if held is not None:
            if beat.ready and self._watch.seen_at(beat.node) > held[1] + beat.period_s:
                del self._held[desc.name]
            else:
                return False, f'the {desc.name} block is not ready: {held[0]}'
        if not beat.ready:
            return False, (f'the {desc.name} block is not ready: '
                           f'{beat.not_ready_reason or "it gives no reason"}')
        client = self._block_clients.get(desc.action_name)
        if client is not None and not client.server_is_ready():
            return False, f'the {desc.name} block is not reachable on {desc.action_name}'
        return True, ''

    def why_not_serving(self, desc: BlockDescriptor) -> str:
        """Why a known block does not serve now ('' = it does)."""
        return self._block_status(desc)[1]

    def _refresh_readiness(self, force: bool = False) -> None:
        """Blocks count as loaded while they beat ready and their server is reachable; the
        graph is ready when such a block offers conversation. Publishes state on a change."""
        changed = force
        reasons: List[str] = []
        for name, desc in self._descriptions.items():
            usable, why = self._block_status(desc)
            was = self._usable.get(name)
            if was != usable or name in self._fresh:
                changed = True
                self._fresh.discard(name)
                self._usable[name] = usable
                self.core.blocks.update(dataclasses.replace(desc, loaded=usable))
                if usable and not was:
                    self.get_logger().info(f'block {name!r} serves')
                elif was and not usable:
                    self.get_logger().warning(f'block {name!r} does not serve: {why}')
                elif was is None:
                    self.get_logger().info(f'block {name!r} does not serve yet: {why}')
            if not usable and desc.serves(CONVERSATION, 'text'):
                reasons.append(why)
        if not self._descriptions or not any(d.serves(CONVERSATION, 'text')
                                             for d in self._descriptions.values()):
            reasons = ['no block offering conversation has announced itself']
        ready = any(self._usable.get(n) and d.serves(CONVERSATION, 'text')
                    for n, d in self._descriptions.items())
        reason = '' if ready else '; '.join(reasons)
        if (ready, reason) != (self.ready, self.ready_reason):
            changed = True
            if ready:
                self.get_logger().info('ready: a conversation block serves')
            elif self.ready:
                self.get_logger().warning(f'not ready: {reason}')
            else:
                self.get_logger().info(f'not ready: {reason}')
            self.ready, self.ready_reason = ready, reason
            self.core.graph_reason = reason
            self._heartbeat.publish()
        if changed:
            self._run_cycle(publish=True)

    @_locked
    def _on_readiness_timer(self) -> None:
        self._refresh_readiness()

    def _beat_status(self) -> Tuple[bool, str, int, int]:
        """The kernel's heartbeat: ready as `state` says, goals running and waiting."""
        return (self.ready, self.ready_reason, len(self.core.active) + self._perception.busy,
                len(self.core.pending) + self._perception.waiting)

    @_locked
    def _on_gone(self, beat: Beat) -> None:
        if not beat.block:
            return
        timeout = self._liveness_timeout_s
        self._stopped[beat.block] = f'the {beat.block} block stopped (no heartbeat for {timeout:.1f} s)'
        self._lose_block(beat.block, f'the {beat.block} block stopped (no heartbeat for '
                                     f'{timeout:.1f} s); ask again when it is back')

    @_locked
    def _on_liveness_event(self, event: str, beat: Beat) -> None:
        if not beat.block:
            return
        self._stopped.pop(beat.block, None)
        if event == RESTARTED:
            self.get_logger().warning(f'block {beat.block!r} restarted ({beat.node}, instance '
                                      f'{beat.instance_id})')
            # Only goals sent to an earlier instance are lost: one dispatched the moment the new
            # instance's first beat made the block usable again is in good hands.
            self._lose_block(beat.block, f'the {beat.block} block restarted and lost the goal; '
                                         'ask again',
                             keep=lambda turn: self._sent_to.get(turn) == beat.instance_id)
        self._refresh_readiness(force=True)

    def _lose_block(self, block: str, reason: str,
                    keep: Callable[[int], bool] = lambda turn: False) -> None:
        """Fail every goal running on `block` now (but those `keep` names): no result will
        come from a dead process."""
        self._perception.lost(block, reason)
        lost = self.core.block_lost(block, reason, self._now(), keep)
        for x in lost:
            self._goals.pop(x.turn_id, None)     # its server is gone: nothing to cancel
            self._finish_failed(x.turn_id, x.reason, x.charged)
        if lost:
            self.get_logger().warning(f'{len(lost)} goal(s) on {block!r} failed: {reason}')
        self._refresh_readiness(force=True)

    # ---- inputs ------------------------------------------------------------------------------
    @_locked
    def _on_text(self, msg: String) -> None:
        self._observe(TEXT_SENSOR_ID, msg.data, '')

    @_locked
    def _on_observation(self, msg: TextObservation) -> None:
        self._observe(msg.source or TEXT_SENSOR_ID, msg.text, msg.observation_id)

    @_locked
    def _on_audio(self, msg: AudioObservation) -> None:
        self._perception.on_audio(msg)

    @_locked
    def _on_vision(self, msg: VisualObservation) -> None:
        self._perception.on_vision(msg)

    def _observe(self, source: str, text: str, observation_id: str, turn_id: int = 0) -> None:
        """Observe text (`turn_id`: the words of a turn that began as speech or a frame)."""
        obs = self.core.observe(source, text, self._now(), observation_id, turn_id)
        if obs.rejection is not None:
            r = obs.rejection
            self.get_logger().warning(f'turn {r.turn_id} ({r.observation_id}) rejected: '
                                      f'{r.reason}')
            self._publish_answer(self._rejected(r), STATUS_REJECTED)
        # Dispatch first: the goal is on its way before salience and state are published.
        out = self.core.cycle(self._now())
        self._act_on(out)
        if obs.score is not None:
            self._publish_salience(obs.turn_id, obs.observation_id, obs.sensor_id, obs.score)
            self._sessions.keep_observation(obs.turn_id, obs.observation_id, obs.sensor_id,
                                            obs.text, obs.score)
        self._publish_state()

    @_locked
    def _on_cycle_timer(self) -> None:
        self._run_cycle()

    # ---- the cycle ---------------------------------------------------------------------------
    def _run_cycle(self, publish: bool = False) -> None:
        """One engine cycle; `state` goes out if anything changed (or `publish`)."""
        out = self.core.cycle(self._now())
        self._act_on(out)
        self._perception.pump(self._now())
        if publish or out.changed:
            self._publish_state()

    def _act_on(self, out: CycleResult) -> None:
        log = self.get_logger()
        if out.transition is not None:
            tr = out.transition
            line = f'{tr.source.value} -> {tr.target.value}: {tr.reason}'
            # rclpy refuses two severities from one call site: one call per severity.
            if tr.target is MetabolicState.CRISIS:
                log.warning(line)
            else:
                log.info(line)
        for t in out.timeouts:
            self._cancel(t.turn_id)
            self._finish_failed(t.turn_id, t.reason, t.charged)
        for p in out.preemptions:
            self._cancel(p.turn_id)
            self._finish_failed(p.turn_id, p.reason, p.charged, STATUS_CANCELLED)
        for r in out.expired:
            self._requeued.discard(r.turn_id)
            log.warning(f'turn {r.turn_id} ({r.observation_id}) dropped: {r.reason}')
            self._publish_answer(self._rejected(r), STATUS_EXPIRED)
        for turn, reason in out.deferred:
            log.info(f'turn {turn} waits: {reason}')
        for d in out.dispatches:
            self._send(d)

    def _cancel(self, turn: int) -> None:
        """Cancel an accepted goal; one still being sent is cancelled when its acceptance
        arrives, since `_finish_failed` has removed it from `_dispatches` by then."""
        handle = self._goals.pop(turn, None)
        if handle is not None:
            handle.cancel_goal_async()

    # ---- dispatch ----------------------------------------------------------------------------
    def _send(self, d: Dispatch) -> None:
        self._dispatches[d.turn_id] = d
        beat = self._watch.block(d.block.name)
        self._sent_to[d.turn_id] = beat.instance_id if beat is not None else ''
        client = self._block_clients.get(d.block.action_name)
        if client is None or d.block.action_type not in (ACTION_LANGUAGE, ACTION_REASONING):
            self._not_started(d, f'block {d.block.name!r} serves {d.block.action_type} on '
                                 f'{d.block.action_name}, which the kernel cannot drive')
            return
        if not client.server_is_ready():
            self._not_started(d, f'block {d.block.name!r} is not reachable on '
                                 f'{d.block.action_name}')
            return
        goal: Any
        if d.kind == KIND_REASONING:
            goal = Reasoning.Goal(turn_id=d.turn_id, problem=d.text,
                                  atp_budget=float(d.atp_budget), max_steps=d.max_steps)
        else:
            goal = Language.Goal(turn_id=d.turn_id, text=d.text, complexity=d.complexity.value,
                                 atp_budget=float(d.atp_budget), max_new_tokens=d.max_new_tokens,
                                 context=self._perception.context(d.turn_id, self._now()))
        self.get_logger().info(f'turn {d.turn_id} ({d.observation_id}) -> {d.block.name} '
                               f'({d.atp_grant:.1f} ATP, salience {d.salience:.2f}, {d.reason}): '
                               f'{d.text[:60]!r}')
        future = client.send_goal_async(
            goal, feedback_callback=lambda fb: self._on_feedback(d, fb))
        future.add_done_callback(lambda f: self._in_group(lambda: self._on_goal_response(d, f)))

    @_locked
    def _on_goal_response(self, d: Dispatch, future: Future) -> None:
        handle = future.result()
        if d.turn_id not in self._dispatches:
            if handle is not None and handle.accepted:
                handle.cancel_goal_async()   # preempted, timed out or its block lost meanwhile
            return
        if handle is None or not handle.accepted:
            self._not_started(d, f'block {d.block.name!r} refused the goal')
            return
        self._goals[d.turn_id] = handle
        handle.get_result_async().add_done_callback(
            lambda f: self._in_group(lambda: self._on_result(d, f)))

    @_locked
    def _on_feedback(self, d: Dispatch, feedback: Any) -> None:
        fb = feedback.feedback
        if d.turn_id not in self._dispatches:
            return
        if d.kind == KIND_REASONING:   # progress, not text: it does not go to response/stream
            self.get_logger().debug(f'turn {d.turn_id}: reasoning step {fb.step}, energy '
                                    f'{fb.energy:.2f}: {fb.summary}')
        elif fb.text:
            self._streamed.add(d.turn_id)
            self._stream_pub.publish(ResponseChunk(
                turn_id=d.turn_id, observation_id=d.observation_id, source=d.sensor_id,
                text=fb.text, model=fb.model))

    @_locked
    def _on_result(self, d: Dispatch, future: Future) -> None:
        self._goals.pop(d.turn_id, None)
        self._sent_to.pop(d.turn_id, None)
        began = d.turn_id in self._streamed
        self._streamed.discard(d.turn_id)
        if self._dispatches.pop(d.turn_id, None) is None:
            return   # already answered (preempted, timed out, its block lost)
        wrapped = future.result()
        result = wrapped.result
        ok = wrapped.status == GoalStatus.STATUS_SUCCEEDED and result.error_code == result.NONE
        if (not ok and d.kind != KIND_REASONING and not began and d.turn_id not in self._requeued
                and result.error_code == Language.Result.MODEL_UNAVAILABLE):
            # The block could not start it (its model manager had just stopped, which its
            # heartbeat had not told yet): the turn waits for the graph instead of failing,
            # once; a second refusal is an answer.
            self._requeued.add(d.turn_id)
            why = result.error_msg or 'its model is unavailable'
            self._held[d.block.name] = (why, time.monotonic())
            self.core.requeue(d.turn_id, f'waiting for the graph: the {d.block.name} block '
                              f'could not start it ({why})', self._now())
            self.get_logger().warning(f'turn {d.turn_id} ({d.observation_id}) waits again: '
                                      f'{d.block.name} could not start it ({why})')
            self._refresh_readiness(force=True)
            return
        self._requeued.discard(d.turn_id)
        if d.kind == KIND_REASONING:
            work = WorkResult(ok, atp_reported=float(result.atp_spent),
                              converged=bool(result.converged))
        else:
            work = WorkResult(ok, completion_tokens=int(result.completion_tokens))
        settled = self.core.complete(d.turn_id, work, self._now())
        charged = settled.charged if settled is not None else 0.0
        if ok:
            msg = self._response(d, Response.STATUS_OK, '', charged)
            msg.truncated = bool(getattr(result, 'truncated', False))
            if d.kind == KIND_REASONING:
                msg.text = result.answer
                msg.model, msg.role, msg.swapped = result.model, result.role, result.swapped
                msg.requested_role = result.role   # the reasoning block asks for roles itself
                msg.complexity = d.complexity.value
                msg.completion_tokens = result.completion_tokens
                self.get_logger().info(
                    f'turn {d.turn_id} answered by reasoning in {result.steps} steps '
                    f'(energy {result.final_energy:.2f}, converged={result.converged}, '
                    f'{charged:.1f} ATP) in {msg.latency_s:.2f} s')
            else:
                msg.text = result.text
                msg.model, msg.role = result.model, result.role
                msg.complexity = result.complexity or d.complexity.value
                msg.swapped = result.swapped
                msg.prompt_tokens, msg.completion_tokens = (result.prompt_tokens,
                                                            result.completion_tokens)
                msg.requested_role, msg.fallback = result.requested_role, result.fallback
                msg.memory_used = int(getattr(result, 'memory_used', 0))
                self.get_logger().info(
                    f'turn {d.turn_id} answered by {result.model} ({result.role}, '
                    f'{msg.complexity}{", swapped" if result.swapped else ""}'
                    f'{", shortened" if msg.truncated else ""}, {charged:.1f} ATP) in '
                    f'{msg.latency_s:.2f} s')
        else:
            reason = result.error_msg or f'goal ended with status {wrapped.status}'
            msg = self._response(d, Response.STATUS_FAILED, reason, charged)
            self.get_logger().error(f'turn {d.turn_id} failed in {d.block.name}: {reason}')
        self._publish_answer(msg, STATUS_OK if ok else STATUS_FAILED)
        self._run_cycle(publish=True)    # a slot and ATP came free

    def _not_started(self, d: Dispatch, reason: str) -> None:
        self.core.complete(d.turn_id, WorkResult(False, started=False), self._now())
        self._finish_failed(d.turn_id, reason, 0.0)
        self._publish_state()

    def _finish_failed(self, turn: int, reason: str, charged: float,
                       status: str = STATUS_FAILED) -> None:
        d = self._dispatches.pop(turn, None)
        self._goals.pop(turn, None)
        self._sent_to.pop(turn, None)
        self._streamed.discard(turn)
        self._requeued.discard(turn)
        if d is None:
            return
        self.get_logger().error(f'turn {turn} ({d.observation_id}) failed: {reason}')
        self._publish_answer(self._response(d, Response.STATUS_FAILED, reason, charged), status)

    # ---- outputs -----------------------------------------------------------------------------
    def _response(self, d: Dispatch, status: int, error: str, charged: float) -> Response:
        return Response(
            stamp=self._stamp(), turn_id=d.turn_id, observation_id=d.observation_id,
            source=d.sensor_id, input_text=d.text, status=status, error=error,
            block=d.block.name, complexity=d.complexity.value,
            latency_s=float(self._now() - d.received_at), salience=float(d.salience),
            atp_spent=float(charged), metabolic_state=d.metabolic_state)

    def _rejected(self, r: Rejection) -> Response:
        return Response(stamp=self._stamp(), turn_id=r.turn_id, observation_id=r.observation_id,
                        source=r.sensor_id, input_text=r.text, status=Response.STATUS_REJECTED,
                        error=r.reason, salience=float(r.salience),
                        metabolic_state=r.metabolic_state)

    def _publish_salience(self, turn_id: int, observation_id: str, sensor_id: str,
                          s: SalienceScore) -> None:
        self._salience_pub.publish(Salience(
            stamp=self._stamp(), turn_id=turn_id, observation_id=observation_id,
            sensor_id=sensor_id, surprise=s.surprise, novelty=s.novelty, arousal=s.arousal,
            reward=s.reward, conflict=s.conflict, total=s.total, confidence=s.confidence,
            stance=s.stance, weights=[float(w) for w in s.weights]))

    @_locked
    def _publish_state(self) -> None:
        snap = self.core.snapshot(self._now())
        blocks = sorted(b.name for b in self.core.blocks if b.loaded)
        self._state_pub.publish(KernelState(
            stamp=self._stamp(), ready=self.ready, ready_reason=self.ready_reason,
            metabolic_state=snap.metabolic_state,
            previous_state=snap.previous_state, transition_reason=snap.transition_reason,
            atp_level=float(snap.atp_level), atp_capacity=float(snap.atp_capacity),
            atp_reserved=float(snap.atp_reserved), max_targets=snap.max_targets,
            consolidation_allowed=snap.consolidation_allowed,
            deferred_total=snap.deferred_total, last_salience=float(snap.last_salience),
            trust=[TrustLevel(name=t.name, trust=float(t.trust), kind=t.kind,
                              outcomes=t.outcomes) for t in snap.trust],
            blocks=blocks, active_dispatches=snap.active_dispatches,
            observations_total=snap.observations_total, dispatches_total=snap.dispatches_total,
            rejected_total=snap.rejected_total, last_decision=snap.last_decision,
            session=self.session.number, phase=self.phase))


def main(args: Optional[List[str]] = None) -> int:
    return run_node(KernelNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
