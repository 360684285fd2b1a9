"""The kernel's cycle: what deserves attention and energy, decided without ROS.

    observe(source, text | Observation, now, observation_id, turn_id)
                                              sanitise, score (SNARC, per source), queue
                                              (features alone: scored only; turn_id: the
                                              words of a turn already observed, e.g. the
                                              transcript of an utterance)
    cycle(now)                                recharge ATP, expire what waited too long, time
                                              out stuck goals, update the metabolic state,
                                              select targets by salience under the state's
                                              policy, preempt lower-salience goals (FOCUS,
                                              CRISIS), share the spend pool, dispatch
    complete(turn, WorkResult, now)           settle ATP with the actual cost (refund the
                                              rest), update trust, reward and salience weights
    block_lost(block, reason, now)            a block's process stopped or restarted: its
                                              running goals fail at once
    snapshot(now)                             what `state` publishes
    reserve_perception(now), settle_perception(grant, started, now)
                                              one run of ATP for a perception goal

Targets are chosen by salience across sources, and in arrival order within one source (a
later observation of a source is never dispatched before an earlier one the state serves);
no block gets more goals at once than its `concurrency`. While no block can take a
conversation (the graph is starting, or its block stopped), observations wait with the reason
"waiting for the graph: ..." and are served when a block is back, or expire with that reason.

The node turns the returned decisions (`Dispatch`, `Preemption`, `Timeout`, `Rejection`) into
goals, cancels and messages. An observation that cannot be served now (ATP short, the state
defers low salience, the sensor is polled slower, no free slot) waits with its reason, and is
dispatched later or expires with that reason.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field
from typing import (Any, Callable, Collection, Deque, Dict, List, Mapping, Optional, Set, Tuple,
                    Union)

from .blocks import BlockDescriptor, BlockRegistry
from .energy import AllocationRequest, AtpLedger, allocate
from .params import ParamDoc, check_ranges, param_docs, tunable
from .metabolism import (ALL_SENSORS, DEFAULT_POLICIES, NONE, MetabolicController,
                         MetabolicInputs, MetabolicParams, MetabolicState, StatePolicy,
                         Transition, check_policies)
from .routing import Complexity, estimate_complexity
from .salience import Observation, SalienceParams, SalienceScore, SalienceScorer, SalienceWeights
from .store import StateStore
from .text import InvalidText, sanitize
from .trust import KIND_BLOCK, KIND_SENSOR, Result, TrustBook, TrustEntry, TrustParams, quality

ACTION_LANGUAGE = 'sage_interfaces/action/Language'
ACTION_REASONING = 'sage_interfaces/action/Reasoning'
ACTION_PERCEPTION = 'sage_interfaces/action/Perception'
KIND_LANGUAGE = 'language'
KIND_REASONING = 'reasoning'
_SALIENCE_KEY = 'salience/state'
NO_CONVERSATION = 'no loaded block offers conversation on text'
WAITING_FOR_GRAPH = 'waiting for the graph: '
# Who talks to the robot by default: bare `text_in` ('text'), the console and the text sensor
# (a person typing or a script read for one). Anything else (a bridged topic, a perception
# stream) is a sensor stream, which DREAM lets wait.
PEOPLE = ('text', 'console', 'text_sensor')


# ---- parameters --------------------------------------------------------------------------------
@dataclass(frozen=True)
class KernelParams:
    max_input_chars: int = tunable(4000, 'Longest accepted text observation; longer is rejected',
                                   1, 1_000_000, unit='characters')
    deferred_ttl_s: float = tunable(
        120.0, 'Longest an observation waits to be served before it expires with its reason',
        0.0, 86400.0, unit='s')
    max_pending: int = tunable(
        64, 'Observations that may wait at once; beyond it the least salient expires', 1,
        100_000, unit='observations')
    people: Tuple[str, ...] = tunable(
        PEOPLE, 'Sources whose text is a person talking ("*": every source, "none": nobody); a '
        "state's person_targets answer them even in DREAM (other sources are sensor streams)")

    def __post_init__(self) -> None:
        check_ranges(self)
        object.__setattr__(self, 'people', tuple(str(s) for s in self.people if s != NONE))

    def is_person(self, source: str) -> bool:
        return ALL_SENSORS in self.people or source in self.people


@dataclass(frozen=True)
class HearingParams:
    """What the kernel does with utterances (`observations/audio`)."""

    people: Tuple[str, ...] = tunable(
        (ALL_SENSORS,), 'Audio sources whose utterances are a person talking: each is '
        'transcribed by the perception block and answered like text, and counts among the people '
        'a state\'s person_targets answer ("*": every audio source, "none": nobody; the '
        'utterances of other sources are only scored)')
    wake_words: Tuple[str, ...] = tunable(
        (), 'Words (or phrases) one of which a transcript must contain to be answered, matched '
        'whole-word and case-insensitively ("none": every utterance is answered); a transcript '
        'without one is rejected with "no wake word" (its percept is still published)')

    def __post_init__(self) -> None:
        object.__setattr__(self, 'people', tuple(str(s) for s in self.people if s != NONE))
        object.__setattr__(self, 'wake_words', tuple(
            str(w).strip() for w in self.wake_words if str(w).strip() and w != NONE))

    def is_person(self, source: str) -> bool:
        return ALL_SENSORS in self.people or source in self.people


@dataclass(frozen=True)
class VisionParams:
    """What the kernel does with camera frames (`observations/vision`)."""

    perceive_salience: float = tunable(
        0.3, 'Salience a keyframe needs to be sent to the perception block (a frame played '
        'through camera/play always is)', 0.0, 1.0)
    turn_salience: float = tunable(
        0.5, 'Salience a perceived keyframe that found something (a detection, or motion onset) '
        'needs to start a turn of its own (Response.modality "vision")', 0.0, 1.0)
    min_turn_period_s: float = tunable(
        30.0, 'Shortest interval between two vision turns of one camera; events in between are '
        'only kept as context', 0.0, 86400.0, unit='s')
    context_s: float = tunable(
        60.0, 'How long what a camera reported is given to language goals as recent context '
        '(0: never)', 0.0, 86400.0, unit='s')

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass(frozen=True)
class AtpParams:
    capacity: float = tunable(100.0, 'Most ATP the kernel can hold (it starts full)', 1.0, 1e9,
                              unit='ATP', runtime=False)
    per_token: float = tunable(0.05, 'ATP charged per generated token', 0.0, 1e6,
                               unit='ATP/token')
    per_run: float = tunable(1.0, 'ATP charged for every goal a block runs (its fixed cost)',
                             0.0, 1e6, unit='ATP')
    answer_tokens: int = tunable(
        128, 'Tokens a language goal is granted ATP for; a smaller grant caps max_new_tokens',
        1, 1_000_000, unit='tokens')
    min_grant: float = tunable(
        2.0, 'Smallest grant worth a goal; a target whose share is smaller waits (ATP short)',
        0.0, 1e6, unit='ATP')
    trust_floor: float = tunable(
        0.05, 'Least trust counted in allocation, so an untrusted block can still earn trust',
        0.0, 1.0)

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.min_grant < self.per_run + self.per_token:
            raise ValueError('min_grant must pay for one run and one token '
                             f'(>= per_run + per_token = {self.per_run + self.per_token:g})')


@dataclass(frozen=True)
class RoutingParams:
    reasoning_min_salience: float = tunable(
        0.4, 'Salience a complex request needs to go to the reasoning block', 0.0, 1.0)
    reasoning_min_atp: float = tunable(
        0.3, 'Available ATP (fraction of capacity) needed to consider reasoning', 0.0, 1.0)
    reasoning_grant: float = tunable(30.0, 'ATP a reasoning goal asks for', 0.0, 1e6,
                                     unit='ATP')
    reasoning_min_grant: float = tunable(
        10.0, 'Smallest share worth reasoning; with less the request goes to language', 0.0,
        1e6, unit='ATP')
    reasoning_max_steps: int = tunable(
        0, 'Step cap sent with reasoning goals (0: the block derives it from the budget)', 0,
        10_000, unit='steps')
    language_deadline_s: float = tunable(
        300.0, 'A language goal running longer is cancelled and fails', 0.1, 86400.0, unit='s')
    reasoning_deadline_s: float = tunable(
        600.0, 'A reasoning goal running longer is cancelled and fails', 0.1, 86400.0, unit='s')

    def __post_init__(self) -> None:
        check_ranges(self)


def _default_policies() -> Dict[MetabolicState, StatePolicy]:
    return dict(DEFAULT_POLICIES)


@dataclass(frozen=True)
class KernelConfig:
    """Every constant of the cognition engine, grouped as the node's parameters are."""

    kernel: KernelParams = field(default_factory=KernelParams)
    atp: AtpParams = field(default_factory=AtpParams)
    routing: RoutingParams = field(default_factory=RoutingParams)
    metabolism: MetabolicParams = field(default_factory=MetabolicParams)
    states: Mapping[MetabolicState, StatePolicy] = field(default_factory=_default_policies)
    salience: SalienceParams = field(default_factory=SalienceParams)
    weights: SalienceWeights = field(default_factory=SalienceWeights)
    trust: TrustParams = field(default_factory=TrustParams)
    hearing: HearingParams = field(default_factory=HearingParams)
    vision: VisionParams = field(default_factory=VisionParams)

    def __post_init__(self) -> None:
        check_policies(self.states)


# Parameter name prefix -> KernelConfig attribute. States are 'states.<wake|focus|...>.'.
CONFIG_GROUPS: Tuple[Tuple[str, str], ...] = (
    ('', 'kernel'), ('atp.', 'atp'), ('routing.', 'routing'), ('metabolism.', 'metabolism'),
    ('salience.weights.', 'weights'), ('salience.', 'salience'), ('trust.', 'trust'),
    ('hearing.', 'hearing'), ('vision.', 'vision'))


STATES_PREFIX = 'states.'


def _state_prefix(state: MetabolicState) -> str:
    return f'{STATES_PREFIX}{state.value.lower()}.'


def config_params(config: KernelConfig) -> List[Tuple[str, ParamDoc]]:
    """(dotted parameter name, documentation with the current value) of every constant."""
    out = []
    for prefix, attr in CONFIG_GROUPS:
        out += [(prefix + d.name, d) for d in param_docs(getattr(config, attr))]
    for state in MetabolicState:
        out += [(_state_prefix(state) + d.name, d) for d in param_docs(config.states[state])]
    return out


def config_with(config: KernelConfig, changes: Mapping[str, Any]) -> KernelConfig:
    """A new, validated config with `changes` (dotted names) applied; ValueError says why not."""
    groups: Dict[str, Dict[str, Any]] = {}
    states: Dict[MetabolicState, Dict[str, Any]] = {}
    for name, value in changes.items():
        if isinstance(value, list):
            value = tuple(value)
        if name.startswith(STATES_PREFIX):
            # 'states.<state>.<field>': the state is parsed, so 'Focus' and 'FOCUS' name the
            # same state and an unknown one says which names exist.
            state_name, _, field_name = name[len(STATES_PREFIX):].partition('.')
            states.setdefault(MetabolicState.parse(state_name), {})[field_name] = value
            continue
        for prefix, attr in CONFIG_GROUPS:
            known = {f.name for f in dataclasses.fields(getattr(config, attr))}
            if name.startswith(prefix) and name[len(prefix):] in known:
                groups.setdefault(attr, {})[name[len(prefix):]] = value
                break
        else:
            raise ValueError(f'unknown kernel parameter {name!r}')
    try:
        replaced = {attr: dataclasses.replace(getattr(config, attr), **fields)
                    for attr, fields in groups.items()}
        policies = dict(config.states)
        for state, fields in states.items():
            policies[state] = dataclasses.replace(policies[state], **fields)
        return dataclasses.replace(config, states=policies, **replaced)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


# ---- decisions ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Observed:
    """What `observe` did: scored and queued, or rejected (with or without a score)."""

    turn_id: int
    sensor_id: str
    text: str
    score: Optional[SalienceScore]
    rejection: Optional['Rejection']
    metabolic_state: str
    observation_id: str = ''


@dataclass(frozen=True)
class Rejection:
    turn_id: int
    sensor_id: str
    text: str              # sanitised text, or '' when the text itself was invalid
    reason: str
    salience: float = 0.0
    metabolic_state: str = ''
    observation_id: str = ''


@dataclass(frozen=True)
class Dispatch:
    turn_id: int
    sensor_id: str
    text: str
    block: BlockDescriptor
    kind: str                   # KIND_LANGUAGE or KIND_REASONING (from the block's action type)
    atp_grant: float            # [ATP] reserved; the unused part returns on completion
    atp_budget: float           # [ATP] sent to the block: the grant less the per-run charge
    deadline: float             # [s] absolute: still running then -> timed out
    received_at: float
    dispatched_at: float
    salience: float
    complexity: Complexity
    max_new_tokens: int         # tokens the grant pays for (0 only when tokens cost nothing)
    max_steps: int
    metabolic_state: str        # state when the observation was scored
    reason: str                 # why this block
    score: Optional[SalienceScore] = field(default=None, compare=False, repr=False)
    observation_id: str = ''


@dataclass(frozen=True)
class Preemption:
    turn_id: int                # the goal to cancel
    by_turn: int                # the more salient target that needs its place (0: none)
    block_name: str
    reason: str
    charged: float


@dataclass(frozen=True)
class Timeout:
    turn_id: int
    block_name: str
    reason: str
    charged: float


@dataclass(frozen=True)
class Lost:
    """A running goal that failed because its block's process stopped or restarted."""

    turn_id: int
    block_name: str
    reason: str
    charged: float


@dataclass(frozen=True)
class CycleResult:
    dispatches: Tuple[Dispatch, ...] = ()
    preemptions: Tuple[Preemption, ...] = ()
    expired: Tuple[Rejection, ...] = ()
    timeouts: Tuple[Timeout, ...] = ()
    transition: Optional[Transition] = None
    deferred: Tuple[Tuple[int, str], ...] = ()   # (turn, reason) newly waiting this cycle

    @property
    def changed(self) -> bool:
        return bool(self.dispatches or self.preemptions or self.expired or self.timeouts
                    or self.transition or self.deferred)


@dataclass(frozen=True)
class WorkResult:
    """What a block reported for one goal."""

    success: bool
    completion_tokens: int = 0      # language: tokens generated (charged per token)
    atp_reported: float = 0.0       # reasoning: ATP the block says it used
    converged: Optional[bool] = None
    started: bool = True            # False: the goal never reached the block (nothing charged,
                                    # no trust or crisis count)


@dataclass(frozen=True)
class Settlement:
    dispatch: Dispatch
    charged: float
    refunded: float
    value: float                    # [0, 1] outcome quality that salience and trust learned
    trust: float


@dataclass(frozen=True)
class KernelSnapshot:
    metabolic_state: str
    previous_state: str
    transition_reason: str
    atp_level: float                # [ATP] held, running goals' grants included
    atp_capacity: float
    atp_reserved: float
    max_targets: int
    consolidation_allowed: bool
    deferred_total: int
    last_salience: float
    trust: Tuple[TrustEntry, ...]
    active_dispatches: int
    pending: int
    observations_total: int
    dispatches_total: int
    rejected_total: int
    last_decision: str


@dataclass
class _Pending:
    turn_id: int
    sensor_id: str
    text: str
    score: SalienceScore
    complexity: Complexity
    received_at: float
    state: str
    reason: str = ''
    deferred: bool = False
    observation_id: str = ''


@dataclass
class _Choice:
    """A target selected this cycle: where it goes, why, and the goals it would cancel."""

    pending: _Pending
    block: BlockDescriptor
    why: str
    claims: List[int]


def _sort_key(p: Union[_Pending, Dispatch]) -> Tuple[float, int]:
    s = p.score.total if isinstance(p, _Pending) else p.salience
    return (-s, p.turn_id)


# ---- the kernel --------------------------------------------------------------------------------
class Kernel:
    """Decides what each observation deserves; holds ATP, metabolic state and trust."""

    def __init__(self, scorer: SalienceScorer, config: Optional[KernelConfig] = None,
                 blocks: Optional[BlockRegistry] = None,
                 complexity: Callable[[str], Complexity] = estimate_complexity,
                 store: Optional[StateStore] = None, now: float = 0.0,
                 first_turn: int = 1) -> None:
        self.config = config or KernelConfig()
        self.scorer = scorer
        self.blocks = blocks or BlockRegistry()
        self.complexity = complexity
        self.store = store
        self.ledger = AtpLedger(self.config.atp.capacity)
        self.metabolism = MetabolicController(self.config.metabolism, self.config.states, now)
        self.trust = TrustBook(self.config.trust, store, now)
        if store is not None:
            saved = store.get(_SALIENCE_KEY)
            if isinstance(saved, dict):
                scorer.restore_state(saved)
        self.pending: Dict[int, _Pending] = {}
        self.active: Dict[int, Dispatch] = {}
        self._expired: List[Rejection] = []
        self._next_turn = first_turn
        # Why no block can take a conversation, as the node sees the graph ('' = it can, or
        # the node says nothing more than the registry): the reason observations wait with.
        self.graph_reason = ''
        self._last_tick = now
        self._attention = (0.0, now)       # (peak salience, when)
        self._failures = 0
        self._last_failure_at = -math.inf
        self._last_served: Dict[str, float] = {}
        self._heard: Set[str] = set()      # sources that sent utterances (audio)
        self.observations_total = 0
        self.dispatches_total = 0
        self.rejected_total = 0
        self.deferred_total = 0
        self.last_salience = 0.0
        self.last_decision = 'no observation yet'

    # ---- configuration -------------------------------------------------------------------------
    def reconfigure(self, config: KernelConfig) -> None:
        """Apply a validated config at run time (capacity and memory sizes stay as started)."""
        old = self.config
        self.config = config
        self.metabolism.set_params(config.metabolism)
        self.metabolism.set_policies(config.states)
        self.trust.set_params(config.trust)
        set_params = getattr(self.scorer, 'set_params', None)
        if set_params is not None and config.salience != old.salience:
            set_params(config.salience)
        set_weights = getattr(self.scorer, 'set_weights', None)
        if set_weights is not None and config.weights != old.weights:
            set_weights(config.weights)

    @property
    def state(self) -> MetabolicState:
        return self.metabolism.state

    @property
    def policy(self) -> StatePolicy:
        return self.metabolism.policy

    def effect_allowed(self, tool_class: str) -> Tuple[bool, str]:
        """Whether the current state allows a tool or effect of this class, and why not."""
        if self.policy.allows_tool(tool_class):
            return True, ''
        return False, f'{self.state.value} does not allow {tool_class} tools or effects'

    @property
    def consolidation_allowed(self) -> bool:
        return self.policy.consolidation

    # ---- time --------------------------------------------------------------------------------
    def _tick(self, now: float) -> None:
        """Recharge at the current state's rate for the time since the last tick."""
        dt = now - self._last_tick
        if math.isfinite(dt) and dt > 0:
            self.ledger.recharge(self.policy.recharge_per_s * dt)
            self._last_tick = now

    def _peak(self, now: float) -> float:
        peak, at = self._attention
        return peak * 0.5 ** (max(0.0, now - at) / self.config.metabolism.attention_half_life_s)

    def attention(self, now: float) -> float:
        """The salience the metabolic controller sees: the decayed peak of recent salience,
        or what waits or runs, whichever is higher."""
        held = [p.score.total for p in self.pending.values()] + \
            [d.salience for d in self.active.values()]
        return max([self._peak(now), *held])

    def _crisis(self, now: float) -> str:
        m = self.config.metabolism
        if not m.crisis_after_failures or self._failures < m.crisis_after_failures:
            return ''
        if now - self._last_failure_at < m.crisis_failure_hold_s:
            return f'{self._failures} consecutive failed goals'
        # The hold is over: the next failure crisis needs as many failures again.
        self._failures = 0
        return ''

    # ---- observe -------------------------------------------------------------------------------
    def observe(self, sensor_id: str, raw: Union[str, Observation], now: float,
                observation_id: str = '', turn_id: int = 0) -> Observed:
        """Sanitise and score one observation and queue it; `cycle` decides what happens.
        Each source (`sensor_id`) is scored against its own history and trusted on its own;
        `observation_id` is the sender's id ('' = '<source>/<turn>'). An observation without
        text (audio, image features) is scored and not queued. `turn_id` continues a turn
        already observed (what the perception block heard or saw in it): its words are scored
        and queued under that turn's id."""
        self._tick(now)
        turn = turn_id
        if not turn_id:
            turn = self._next_turn
            self._next_turn += 1
            self.observations_total += 1
        state = self.state.value
        oid = observation_id or f'{sensor_id}/{turn}'
        obs = Observation(text=raw, t=now) if isinstance(raw, str) else raw
        if obs.modality == 'audio':
            self._heard.add(sensor_id)
        self.trust.touch(sensor_id, KIND_SENSOR, now)

        def reject(reason: str, text: str = '', score: Optional[SalienceScore] = None
                   ) -> Observed:
            r = self._reject(Rejection(turn, sensor_id, text, reason,
                                       score.total if score else 0.0, state, oid))
            return Observed(turn, sensor_id, text, score, r, state, oid)

        text = ''
        if obs.text or not obs.features:
            try:
                text = sanitize(obs.text, self.config.kernel.max_input_chars)
            except InvalidText as exc:
                self.trust.record(sensor_id, KIND_SENSOR, Result(False), now)
                return reject(f'invalid input: {exc}')
        if not self.policy.accepts(sensor_id):
            return reject(f'{state} does not accept sensor {sensor_id!r}', text)
        self.trust.record(sensor_id, KIND_SENSOR, Result(True), now)
        score = self.scorer.score(sensor_id, dataclasses.replace(obs, text=text,
                                                                  t=obs.t or now))
        self.last_salience = score.total
        self._attention = (max(self._peak(now), score.total), now)
        if not text:
            self.last_decision = (f'turn {turn}: {sensor_id} observation attended '
                                  f'(salience {score.total:.2f}); no block serves {obs.modality}')
            return Observed(turn, sensor_id, text, score, None, state, oid)
        try:
            complexity = self.complexity(text)
        except Exception:  # a learned router failing must not lose the observation
            complexity = estimate_complexity(text)
        # Queued even while no block can take it (the graph is starting, or its block
        # stopped): it waits, bounded by deferred_ttl_s and max_pending, with the reason.
        self.pending[turn] = _Pending(turn, sensor_id, text, score, Complexity(complexity), now,
                                      state, observation_id=oid)
        if len(self.pending) > self.config.kernel.max_pending:
            victim = max(self.pending.values(), key=lambda p: (-p.score.total, -p.turn_id))
            del self.pending[victim.turn_id]
            why = f' ({victim.reason})' if victim.reason else ''
            self._expired.append(self._reject(Rejection(
                victim.turn_id, victim.sensor_id, victim.text,
                f'dropped: {self.config.kernel.max_pending} observations already waiting and '
                f'this was the least salient ({victim.score.total:.2f}){why}',
                victim.score.total, victim.state, victim.observation_id)))
        return Observed(turn, sensor_id, text, score, None, state, oid)

    def is_person(self, source: str) -> bool:
        """A person talks through this source: one of `people`, or an audio source that
        `hearing.people` names (its transcripts are turns of that source)."""
        return self.config.kernel.is_person(source) or (
            source in self._heard and self.config.hearing.is_person(source))

    # ---- perception ----------------------------------------------------------------------------
    def reserve_perception(self, now: float) -> Optional[float]:
        """Reserve one run (`atp.per_run`) for a perception goal; None when the available ATP
        cannot pay for it (the sample waits, "ATP short")."""
        self._tick(now)
        need = self.config.atp.per_run
        if self.ledger.available < need:
            return None
        return self.ledger.reserve(need)

    def settle_perception(self, grant: float, started: bool, now: float) -> float:
        """Settle a perception goal's grant: one run is charged when the block ran it, nothing
        when it never reached the block; returns what was charged."""
        self._tick(now)
        charged, _ = self.ledger.settle(grant, self.config.atp.per_run if started else 0.0)
        return charged

    def waiting_reason(self) -> str:
        """Why an observation that needs a conversation block cannot be served now."""
        return WAITING_FOR_GRAPH + (self.graph_reason or NO_CONVERSATION)

    # ---- cycle ---------------------------------------------------------------------------------
    def cycle(self, now: float) -> CycleResult:
        """One kernel cycle; see the module docstring."""
        self._tick(now)
        timeouts = self._time_out(now)
        expired = self._expired + self._expire(now)
        self._expired = []
        transition = self.metabolism.update(MetabolicInputs(
            atp_fraction=self.ledger.fraction, salience=self.attention(now),
            load=len(self.pending) + len(self.active), now=now, crisis=self._crisis(now)))
        if transition is not None:
            self.last_decision = (f'{transition.source.value} -> {transition.target.value}: '
                                  f'{transition.reason}')
            if transition.source is MetabolicState.CRISIS:
                self._failures = 0       # a crisis that is over starts the count afresh
        preemptions, dispatches, deferred = self._select_and_dispatch(now)
        self.trust.flush(now, force=False)      # sensor trust, at most every sensor_persist_s
        return CycleResult(tuple(dispatches), tuple(preemptions), tuple(expired),
                           tuple(timeouts), transition, tuple(deferred))

    def _time_out(self, now: float) -> List[Timeout]:
        out = []
        for turn, d in list(self.active.items()):
            if now >= d.deadline:
                del self.active[turn]
                # A stuck goal is assumed to have used its whole grant.
                charged, _ = self.ledger.settle(d.atp_grant, d.atp_grant)
                self._failed(d.block.name, Result(False, now - d.dispatched_at,
                                                  d.deadline - d.dispatched_at), now)
                reason = (f'no result from {d.block.name!r} within '
                          f'{d.deadline - d.dispatched_at:.3g} s')
                self.last_decision = f'turn {turn}: timed out ({reason})'
                out.append(Timeout(turn, d.block.name, reason, charged))
        return out

    def _expire(self, now: float) -> List[Rejection]:
        ttl = self.config.kernel.deferred_ttl_s
        out = []
        for turn, p in list(self.pending.items()):
            if now - p.received_at >= ttl and p.deferred:
                del self.pending[turn]
                out.append(self._reject(Rejection(
                    turn, p.sensor_id, p.text, f'expired after waiting {ttl:.0f} s: {p.reason}',
                    p.score.total, p.state, p.observation_id)))
        return out

    def _route(self, p: _Pending, full: Set[str]
               ) -> Tuple[Optional[BlockDescriptor], str, bool]:
        """(block, why, busy): the block `p` goes to, one with a free slot if there is one;
        `busy` when every such block is at its concurrency (it waits, or preempts in FOCUS and
        CRISIS); None when no loaded block serves it."""
        r = self.config.routing
        if p.complexity is Complexity.COMPLEX:
            if p.score.total < r.reasoning_min_salience:
                why = f'complex but salience {p.score.total:.2f} < {r.reasoning_min_salience:.2f}'
            elif self.ledger.available < r.reasoning_min_atp * self.ledger.capacity:
                why = (f'complex but ATP {self.ledger.available:.1f} < '
                       f'{r.reasoning_min_atp * self.ledger.capacity:.1f} for reasoning')
            else:
                why = f'complex, salience {p.score.total:.2f}: reasoning'
                block = self._reasoning_block(full)
                if block is not None:
                    return block, why, False
                block = self._reasoning_block()
                if block is not None:
                    return block, why, True
                why = 'complex but no reasoning block is loaded'
        else:
            why = p.complexity.value
        block = self._conversation_block(full)
        if block is not None:
            return block, why, False
        block = self._conversation_block()
        return block, why, block is not None

    def _trust_map(self) -> Dict[str, float]:
        return {e.name: e.trust for e in self.trust.entries(self._last_tick) if e.kind == KIND_BLOCK}

    def _conversation_block(self, full: Collection[str] = ()) -> Optional[BlockDescriptor]:
        return self.blocks.find('conversation', 'text', self._trust_map(), full)

    def _reasoning_block(self, full: Collection[str] = ()) -> Optional[BlockDescriptor]:
        return self.blocks.find('reasoning', 'text', self._trust_map(), full)

    def _need(self, kind: str) -> float:
        a = self.config.atp
        if kind == KIND_REASONING:
            return max(self.config.routing.reasoning_grant, a.min_grant)
        return max(a.per_run + a.answer_tokens * a.per_token, a.min_grant)

    @staticmethod
    def _kind(block: BlockDescriptor) -> str:
        return KIND_REASONING if block.action_type == ACTION_REASONING else KIND_LANGUAGE

    def _full(self, extra: Mapping[str, int], skip: Collection[int] = ()) -> Set[str]:
        """Blocks at their concurrency: goals running on them (less `skip`) plus `extra`."""
        used: Dict[str, int] = dict(extra)
        for d in self.active.values():
            if d.turn_id not in skip:
                used[d.block.name] = used.get(d.block.name, 0) + 1
        return {b.name for b in self.blocks
                if b.concurrency > 0 and used.get(b.name, 0) >= b.concurrency}

    def _select_and_dispatch(self, now: float
                             ) -> Tuple[List[Preemption], List[Dispatch], List[Tuple[int, str]]]:
        policy = self.policy
        state = self.state.value
        m = self.config.metabolism
        reasons: Dict[int, str] = {}
        # What the state serves, per source in arrival order.
        queues: Dict[str, Deque[_Pending]] = {}
        every = f'at most every {policy.min_period_s:g} s'
        people: List[_Pending] = []     # a person's turns, when the state answers them apart
        for p in sorted(self.pending.values(), key=lambda p: p.turn_id):
            if not policy.accepts(p.sensor_id):
                reasons[p.turn_id] = f'{state} does not accept sensor {p.sensor_id!r}'
            elif policy.person_targets and self.is_person(p.sensor_id) and (
                    p.score.total < policy.min_salience or policy.max_targets == 0):
                people.append(p)
            elif p.score.total < policy.min_salience:
                reasons[p.turn_id] = (f'{state} defers salience {p.score.total:.2f} '
                                      f'< {policy.min_salience:.2f}')
            elif now - self._last_served.get(p.sensor_id, -math.inf) < policy.min_period_s:
                reasons[p.turn_id] = f'{state} serves {p.sensor_id!r} {every}'
            else:
                queues.setdefault(p.sensor_id, deque()).append(p)

        preemptions: List[Preemption] = []
        if policy.preempt and len(self.active) > policy.max_targets:
            # Entering FOCUS or CRISIS with more goals running than the state serves: keep
            # the most salient, cancel the rest.
            goals = sorted(self.active.values(), key=_sort_key)
            top = goals[0] if policy.max_targets > 0 else None
            for d in goals[policy.max_targets:]:
                preemptions.append(self._preempt(
                    d, top, f'{state} serves {policy.max_targets} at once', now))
        # Targets in salience order across sources (the head of each source's queue), up to
        # the state's limit and each block's concurrency. In a preempting state a target may
        # claim the place of lower-salience goals; those cancels are only carried out if the
        # target then gets its ATP.
        chosen: List[_Choice] = []
        claimed: Dict[int, Tuple[Dispatch, _Pending, str]] = {}

        def running() -> int:
            return len(self.active) - len(claimed)

        def full() -> Set[str]:
            planned: Dict[str, int] = {}
            for c in chosen:
                planned[c.block.name] = planned.get(c.block.name, 0) + 1
            return self._full(planned, claimed)

        def choose(p: _Pending) -> str:
            """'' when `p` is chosen, else why it waits."""
            targets = (f'{policy.max_targets} target'
                       f'{"s" if policy.max_targets != 1 else ""} at once')
            if len(chosen) >= policy.max_targets:
                return f'{state} serves {targets}'
            block, why, _ = self._route(p, full())
            if block is None:
                return self.waiting_reason()
            mine: List[int] = []
            if policy.preempt:
                lower = [d for d in self.active.values() if d.turn_id not in claimed
                         and d.salience + m.preempt_margin <= p.score.total]
                for d in lower:
                    if d.block.name == block.name:
                        claimed[d.turn_id] = (d, p, 'it needs the block')
                        mine.append(d.turn_id)
                lower = sorted((d for d in lower if d.turn_id not in claimed), key=_sort_key)
                while lower and running() + len(chosen) >= policy.max_targets:
                    d = lower.pop()          # the least salient first
                    claimed[d.turn_id] = (d, p, 'it needs the slot')
                    mine.append(d.turn_id)
            wait = ''
            if running() + len(chosen) >= policy.max_targets:
                wait = f'busy: {state} runs {targets.replace("target", "goal")}'
            elif block.name in full():
                n = block.concurrency
                wait = f'busy: {block.name!r} works on {n} goal{"s" if n != 1 else ""} at once'
            if wait:
                for turn in mine:
                    del claimed[turn]
                return wait
            chosen.append(_Choice(p, block, why, mine))
            return ''

        while queues:
            source, queue = min(queues.items(), key=lambda kv: _sort_key(kv[1][0]))
            head = queue.popleft()
            why = choose(head)
            if why:
                reasons[head.turn_id] = why
                for p in queue:   # never before an earlier observation of the same source
                    reasons[p.turn_id] = f'after turn {head.turn_id} of {source!r}: {why}'
                del queues[source]
            elif not queue:
                del queues[source]
            elif policy.min_period_s > 0:
                for p in queue:
                    reasons[p.turn_id] = f'{state} serves {source!r} {every}'
                del queues[source]

        if people:
            self._choose_people(people, policy, chosen, reasons, full)

        def pool() -> float:    # this cycle's pool, counting what the claimed cancels return
            a = self.config.atp
            back = sum(max(0.0, d.atp_grant - a.per_run) for d, _, _ in claimed.values())
            return min(self.ledger.available + back, self.ledger.level) * policy.spend_fraction

        alloc: Dict[Any, float] = {}
        while chosen:
            alloc = self._allocate(pool(), chosen)
            if all(alloc[c.pending.turn_id] >= self.config.atp.min_grant for c in chosen):
                break
            drop = chosen.pop()    # the last chosen: no later one of its source was chosen
            for turn in drop.claims:
                del claimed[turn]
            reasons[drop.pending.turn_id] = (
                f'ATP short: a goal needs {self.config.atp.min_grant:.1f} ATP and {state} '
                f'grants {policy.spend_fraction:.0%} of the available ATP per cycle')
        for d, claimant, why in claimed.values():
            preemptions.append(self._preempt(d, claimant, why, now))
        dispatches = []
        for i, c in enumerate(chosen):
            planned: Dict[str, int] = {}
            for later in chosen[i + 1:]:
                planned[later.block.name] = planned.get(later.block.name, 0) + 1
            dispatches.append(self._dispatch(
                c.pending, c.block, c.why, min(alloc[c.pending.turn_id], self.ledger.available),
                now, self._full(planned)))

        deferred = []
        for turn, reason in reasons.items():
            waiting = self.pending.get(turn)
            if waiting is None:
                continue
            if not waiting.deferred:
                waiting.deferred = True
                self.deferred_total += 1
            if reason != waiting.reason:
                waiting.reason = reason
                deferred.append((turn, reason))
                self.last_decision = f'turn {turn}: waiting ({reason})'
        return preemptions, dispatches, deferred

    def _choose_people(self, people: List[_Pending], policy: StatePolicy,
                       chosen: List['_Choice'], reasons: Dict[int, str],
                       full: Callable[[], Set[str]]) -> None:
        """A state with `person_targets` (DREAM) still answers people whom its own rules would
        make wait: oldest first, up to that many at once, beside whatever else it serves. They
        are appended last, so an ATP shortage drops them first (with that reason)."""
        state = self.state.value
        limit = policy.person_targets
        running = sum(1 for d in self.active.values() if self.is_person(d.sensor_id))
        picked = 0
        for p in people:
            if running + picked >= limit:
                reasons[p.turn_id] = (f'{state} answers {limit} person{"s" if limit != 1 else ""}'
                                      ' at a time')
                continue
            block, why, _ = self._route(p, full())
            if block is None:
                reasons[p.turn_id] = self.waiting_reason()
            elif block.name in full():
                reasons[p.turn_id] = f'busy: {block.name!r} works on its goals'
            else:
                chosen.append(_Choice(p, block, f'{why}; a person, answered in {state}', []))
                picked += 1

    def _allocate(self, pool: float, chosen: List['_Choice']) -> Dict[Any, float]:
        boost = (self.config.metabolism.focus_boost
                 if self.state in (MetabolicState.FOCUS, MetabolicState.CRISIS) else 1.0)
        requests = []
        for i, c in enumerate(chosen):
            p, block = c.pending, c.block
            trust = (self.trust.get(block.name, KIND_BLOCK, self._last_tick)
                     * self.trust.get(p.sensor_id, KIND_SENSOR, self._last_tick))
            requests.append(AllocationRequest(
                p.turn_id, p.score.total, boost if i == 0 else 1.0, trust,
                cap=self._need(self._kind(block))))
        return allocate(pool, requests, self.config.atp.trust_floor)

    def _dispatch(self, p: _Pending, block: BlockDescriptor, why: str, alloc: float,
                  now: float, full: Collection[str] = ()) -> Dispatch:
        a, r = self.config.atp, self.config.routing
        kind = self._kind(block)
        if kind == KIND_REASONING and alloc < r.reasoning_min_grant:
            fallback = self._conversation_block(full)   # one with a free slot
            if fallback is not None:
                why = (f'complex, but a {alloc:.1f} ATP share is below '
                       f'{r.reasoning_min_grant:.1f} for reasoning')
                block, kind = fallback, self._kind(fallback)
                alloc = min(alloc, self._need(kind))
        grant = self.ledger.reserve(alloc)
        # The kernel charges per_run + what the block reports (reasoning) or per_run + tokens
        # (language), so the block gets the rest of the grant, and a language goal a token cap
        # the grant pays for: the charge never exceeds the grant.
        budget = max(0.0, grant - a.per_run)
        max_new_tokens = 0
        if kind == KIND_LANGUAGE and a.per_token > 0:
            max_new_tokens = max(1, int(math.floor(budget / a.per_token + 1e-9)))
        deadline_s = r.reasoning_deadline_s if kind == KIND_REASONING else r.language_deadline_s
        d = Dispatch(p.turn_id, p.sensor_id, p.text, block, kind, grant, budget, now + deadline_s,
                     p.received_at, now, p.score.total, p.complexity, max_new_tokens,
                     r.reasoning_max_steps if kind == KIND_REASONING else 0, p.state, why,
                     p.score, p.observation_id)
        del self.pending[p.turn_id]
        self.active[p.turn_id] = d
        self.dispatches_total += 1
        self._last_served[p.sensor_id] = now
        self.last_decision = (f'turn {p.turn_id}: dispatched to {block.name} with {grant:.1f} ATP'
                              f' (salience {p.score.total:.2f}, {why}, {self.state.value})')
        return d

    def _preempt(self, d: Dispatch, by: Optional[Union[_Pending, Dispatch]], why: str,
                 now: float) -> Preemption:
        """Cancel `d` for `by` (the more salient target or goal it makes room for; None when
        the state serves no goal at all)."""
        del self.active[d.turn_id]
        # The cancelled work is charged one run; the rest of its grant returns.
        charged, _ = self.ledger.settle(d.atp_grant, self.config.atp.per_run)
        if by is None:
            by_turn = 0
            reason = f'preempted (salience {d.salience:.2f}; {why}, {self.state.value})'
        else:
            by_turn = by.turn_id
            by_salience = by.score.total if isinstance(by, _Pending) else by.salience
            reason = (f'preempted by turn {by_turn} (salience {by_salience:.2f} vs '
                      f'{d.salience:.2f}; {why}, {self.state.value})')
        self.last_decision = f'turn {d.turn_id}: {reason}'
        return Preemption(d.turn_id, by_turn, d.block.name, reason, charged)

    # ---- sleep ---------------------------------------------------------------------------------
    def sleep(self, now: float, reason: str) -> Tuple[Optional[Transition], str]:
        """Enter DREAM now (`kernel/sleep`, a session's end), through the metabolic controller
        so its rules stay coherent: (transition, '') or (None, why not; '' when already
        dreaming). Falling asleep lets go of the attention a past observation left; what waits
        or runs still counts, and refuses the dream if it is salient enough to end it."""
        self._tick(now)
        held = max([p.score.total for p in self.pending.values()]
                   + [d.salience for d in self.active.values()], default=0.0)
        t, why = self.metabolism.enter_dream(MetabolicInputs(
            atp_fraction=self.ledger.fraction, salience=held,
            load=len(self.pending) + len(self.active), now=now, crisis=self._crisis(now)),
            reason)
        if t is not None:
            self._attention = (0.0, now)
            self.last_decision = f'{t.source.value} -> {t.target.value}: {t.reason}'
        return t, why

    # ---- results -------------------------------------------------------------------------------
    def requeue(self, turn_id: int, reason: str, now: float) -> bool:
        """Put a dispatch that its block could not start back in line (its grant returns): it
        waits with `reason` like any observation, keeps its place and age (deferred_ttl_s
        still bounds it), and goes out again when a block serves. False if not running."""
        d = self.active.pop(turn_id, None)
        if d is None:
            return False
        self._tick(now)
        self.ledger.settle(d.atp_grant, 0.0)
        score = d.score if d.score is not None else SalienceScore(
            0.0, 0.0, 0.0, 0.5, 0.0, d.salience)
        self.pending[turn_id] = _Pending(turn_id, d.sensor_id, d.text, score, d.complexity,
                                         d.received_at, d.metabolic_state, reason, True,
                                         d.observation_id)
        self.last_decision = f'turn {turn_id}: waiting again ({reason})'
        return True

    def complete(self, turn_id: int, result: WorkResult, now: float) -> Optional[Settlement]:
        """Settle a dispatch; None if the turn is not running (already preempted or timed out)."""
        d = self.active.pop(turn_id, None)
        if d is None:
            return None
        self._tick(now)
        a = self.config.atp
        if not result.started:
            cost = 0.0
        elif d.kind == KIND_REASONING:
            cost = a.per_run + max(0.0, result.atp_reported if math.isfinite(
                result.atp_reported) else 0.0)
        else:
            cost = a.per_run + max(0, result.completion_tokens) * a.per_token
        charged, refunded = self.ledger.settle(d.atp_grant, cost)
        outcome = Result(result.success, now - d.dispatched_at, d.deadline - d.dispatched_at,
                         result.converged)
        if not result.started:
            # The block never got the goal (unreachable, refused): nothing to learn about it and
            # no failure toward a crisis.
            trust = self.trust.get(d.block.name, KIND_BLOCK, now)
        elif result.success:
            self._failures = 0
            trust = self.trust.record(d.block.name, KIND_BLOCK, outcome, now)
        else:
            trust = self._failed(d.block.name, outcome, now)
        value = quality(outcome, self.config.trust)
        if result.started and d.score is not None:
            self.scorer.record_outcome(d.sensor_id, d.score, value)
            if self.store is not None:
                self.store.put(_SALIENCE_KEY, self.scorer.export_state())
        self.last_decision = (f'turn {turn_id}: {d.block.name} '
                              f'{"succeeded" if result.success else "failed"}, '
                              f'{charged:.2f} ATP charged, {refunded:.2f} returned')
        return Settlement(d, charged, refunded, value, trust)

    def block_lost(self, block: str, reason: str, now: float,
                   keep: Callable[[int], bool] = lambda turn: False) -> List[Lost]:
        """Every goal running on `block` (but those `keep` names) fails now: its process
        stopped or restarted, so no result will come. Each is charged one run (the rest of its
        grant returns) and the block's trust learns the failure; a dead process is not a failed
        answer, so it does not count toward a failure crisis."""
        self._tick(now)
        out = []
        for turn, d in list(self.active.items()):
            if d.block.name != block or keep(turn):
                continue
            del self.active[turn]
            charged, _ = self.ledger.settle(d.atp_grant, self.config.atp.per_run)
            self.trust.record(block, KIND_BLOCK, Result(False, now - d.dispatched_at,
                                                        d.deadline - d.dispatched_at), now)
            self.last_decision = f'turn {turn}: failed ({reason})'
            out.append(Lost(turn, block, reason, charged))
        return out

    def _failed(self, block: str, outcome: Result, now: float) -> float:
        self._failures += 1
        self._last_failure_at = now
        return self.trust.record(block, KIND_BLOCK, outcome, now)

    def _reject(self, r: Rejection) -> Rejection:
        self.rejected_total += 1
        self.last_decision = f'turn {r.turn_id}: rejected ({r.reason})'
        return r

    # ---- state ---------------------------------------------------------------------------------
    def flush(self, now: float) -> None:
        """Write what is persisted lazily (sensor trust); call before shutting down."""
        self.trust.flush(now)

    def snapshot(self, now: float) -> KernelSnapshot:
        self._tick(now)
        mc = self.metabolism
        return KernelSnapshot(
            metabolic_state=mc.state.value,
            previous_state=mc.previous.value if mc.previous else '',
            transition_reason=mc.reason, atp_level=self.ledger.level,
            atp_capacity=self.ledger.capacity, atp_reserved=self.ledger.reserved,
            max_targets=mc.policy.max_targets, consolidation_allowed=mc.policy.consolidation,
            deferred_total=self.deferred_total, last_salience=self.last_salience,
            trust=tuple(self.trust.entries(now)), active_dispatches=len(self.active),
            pending=len(self.pending), observations_total=self.observations_total,
            dispatches_total=self.dispatches_total, rejected_total=self.rejected_total,
            last_decision=self.last_decision)
