"""Metabolic states: WAKE, FOCUS, REST, DREAM, CRISIS, and what each lets the kernel do.

The transition table is the prototype's (`sage/core/metabolic_controller.py`), with hysteresis
(a minimum dwell and separate enter/exit thresholds) and circadian biases, minus its recorded
bugs:

- FOCUS -> REST was unreachable (FOCUS -> WAKE on low ATP was tested first): here low ATP is
  tested first, so both exits happen.
- Time in a state was counted in cycles, so at fast cycle rates DREAM came too early and at
  slow rates never; here every duration is in seconds of the injected clock.
- The circadian biases pointed the wrong way: the rest threshold was highest at midday and
  dreams got shorter at night. Here REST comes sooner at night, dreams come sooner and last
  longer at night, FOCUS and waking come easier by day.
- DREAM woke on high ATP, so entering DREAM from a rested WAKE ended it at once; here a dream
  ends when its duration is over or when a salient observation arrives. Its ATP exits (to REST
  below `dream_exit_atp`, to CRISIS below `crisis_enter`) are guards: DREAM serves no goal and
  the kernel spends nothing while dreaming, so they fire only if work that charges the ledger
  (`AtpLedger.spend`, e.g. a future consolidation) runs during the dream.
- REST went back to WAKE on recovered ATP before its dream timer could run out, so REST -> DREAM
  never fired. Here REST tests idleness first, counts idle time (nothing waiting or running and
  attention below `idle_salience`) rather than time in the state, and the defaults (REST
  recharges 1 ATP/s, dreams after 10 s idle) let a rested, idle kernel dream before it wakes.
- Nothing but ATP could trigger CRISIS (`crisis_detected` was always False): here the kernel
  also raises it after consecutive failures, and the flag clears on its own.
- REST allowed 0 targets (fixed later by the authors) and the target selection let one target
  through even with a limit of 0; here each state's `max_targets` is exact, and a state that
  must recover energy (REST, DREAM, CRISIS) must recharge (recharge 0 is refused), so none of
  them can become a trap.

Every duration and threshold is a parameter; ATP levels are fractions of capacity.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass
from typing import Deque, Dict, Mapping, Optional, Tuple

from .params import check_ranges, tunable

TOOL_CLASSES = ('standard', 'elevated', 'dangerous')
ALL_SENSORS = '*'
NONE = 'none'


class MetabolicState(str, enum.Enum):
    WAKE = 'WAKE'      # normal operation
    FOCUS = 'FOCUS'    # a salient target holds attention
    REST = 'REST'      # recovering energy; low-salience input waits
    DREAM = 'DREAM'    # offline consolidation; input waits unless salient enough to wake (people
                       # are still answered, one at a time: StatePolicy.person_targets)
    CRISIS = 'CRISIS'  # energy critical or repeated failures: only the most salient target

    @classmethod
    def parse(cls, name: str) -> 'MetabolicState':
        """Case-insensitive, for state names read from parameters ('states.focus.*'): the
        prototype's LLM pool compared 'focus' with 'FOCUS' and never matched."""
        try:
            return cls(str(name).strip().upper())
        except ValueError:
            raise ValueError(f'unknown metabolic state {name!r}; expected one of '
                             f'{", ".join(s.value for s in cls)}') from None


@dataclass(frozen=True)
class StatePolicy:
    """What the kernel does in one state."""

    max_targets: int = tunable(3, 'Goals served at once in this state (0: none)', 0, 64,
                               unit='goals')
    min_salience: float = tunable(
        0.0, 'Observations below this total salience wait in this state', 0.0, 1.0)
    min_period_s: float = tunable(
        0.0, 'Shortest interval between two dispatched observations of one sensor '
        '(the polling rate; faster ones wait)', 0.0, 3600.0, unit='s')
    recharge_per_s: float = tunable(0.5, 'ATP regained per second in this state', 0.0, 1e6,
                                    unit='ATP/s')
    spend_fraction: float = tunable(
        0.3, 'Share of the available ATP a cycle may grant (the spend pool)', 0.0, 1.0)
    sensors: Tuple[str, ...] = tunable(
        (ALL_SENSORS,), 'Sensors whose observations are accepted ("*": all, "none": no sensor); '
        'others are rejected with a reason')
    tools: Tuple[str, ...] = tunable(
        ('standard',), 'Tool and effect classes allowed (standard, elevated, dangerous; '
        '"none": no tool)')
    consolidation: bool = tunable(False, 'Whether memory consolidation may run')
    preempt: bool = tunable(
        False, 'Whether a more salient target may cancel a running lower-salience goal')
    person_targets: int = tunable(
        0, "Goals from people (the kernel's people sources) served at once in this state even "
        'when max_targets, min_salience or min_period_s would make them wait, without leaving '
        'the state (0: people follow the state\'s rules)', 0, 64, unit='goals')

    def __post_init__(self) -> None:
        check_ranges(self)
        # 'none' stands for an empty list (a ROS parameter cannot declare an empty string list)
        object.__setattr__(self, 'sensors', tuple(str(s) for s in self.sensors if s != NONE))
        object.__setattr__(self, 'tools', tuple(str(t) for t in self.tools if t != NONE))
        bad = [t for t in self.tools if t not in TOOL_CLASSES]
        if bad:
            raise ValueError(f'unknown tool class {bad[0]!r}; expected {", ".join(TOOL_CLASSES)}')

    def accepts(self, sensor_id: str) -> bool:
        return ALL_SENSORS in self.sensors or sensor_id in self.sensors

    def allows_tool(self, tool_class: str) -> bool:
        return tool_class in self.tools


DEFAULT_POLICIES: Dict[MetabolicState, StatePolicy] = {
    MetabolicState.WAKE: StatePolicy(3, 0.0, 0.0, 0.5, 0.3, (ALL_SENSORS,),
                                     ('standard', 'elevated'), False, False),
    MetabolicState.FOCUS: StatePolicy(1, 0.0, 0.0, 0.2, 0.8, (ALL_SENSORS,),
                                      ('standard', 'elevated', 'dangerous'), False, True),
    MetabolicState.REST: StatePolicy(1, 0.5, 1.0, 1.0, 0.2, (ALL_SENSORS,), ('standard',),
                                     False, False),
    # DREAM serves no goal, but a person is still answered, one at a time (DREAM lowers
    # attention, it does not drop people); something salient ends the dream as before.
    MetabolicState.DREAM: StatePolicy(0, 1.0, 10.0, 1.0, 0.1, (ALL_SENSORS,), (), True, False,
                                      1),
    MetabolicState.CRISIS: StatePolicy(1, 0.0, 0.2, 1.0, 0.95, (ALL_SENSORS,), ('standard',),
                                       False, True),
}
# States that exist to recover: with no recharge they could never be left.
RECOVERY_STATES = (MetabolicState.REST, MetabolicState.DREAM, MetabolicState.CRISIS)


def check_policies(policies: Mapping[MetabolicState, StatePolicy]) -> None:
    missing = [s.value for s in MetabolicState if s not in policies]
    if missing:
        raise ValueError(f'no policy for state {missing[0]}')
    for s in RECOVERY_STATES:
        if policies[s].recharge_per_s <= 0.0:
            raise ValueError(f'{s.value.lower()}.recharge_per_s must be positive: '
                             f'{s.value} could never be left')
    if policies[MetabolicState.CRISIS].max_targets > 1:
        raise ValueError('crisis.max_targets must be 0 or 1: CRISIS serves only the most '
                         'salient target')


@dataclass(frozen=True)
class MetabolicParams:
    """Thresholds (ATP as a fraction of capacity, salience in [0, 1]) and durations."""

    min_dwell_s: float = tunable(
        2.0, 'Least time in a state before a normal transition (CRISIS entry and a salient '
        'wake from DREAM do not wait)', 0.0, 3600.0, unit='s')
    crisis_enter: float = tunable(0.1, 'ATP fraction below which any state goes to CRISIS',
                                  0.0, 1.0)
    crisis_exit: float = tunable(0.2, 'ATP fraction at which CRISIS goes to REST', 0.0, 1.0)
    rest_enter: float = tunable(0.3, 'ATP fraction below which WAKE or FOCUS goes to REST',
                                0.0, 1.0)
    wake_enter: float = tunable(0.6, 'ATP fraction at which REST goes back to WAKE', 0.0, 1.0)
    focus_enter: float = tunable(0.6, 'Attention salience at which WAKE goes to FOCUS', 0.0,
                                 1.0)
    focus_exit: float = tunable(0.4, 'Attention salience below which FOCUS goes back to WAKE',
                                0.0, 1.0)
    focus_min_atp: float = tunable(
        0.4, 'ATP fraction FOCUS needs; below it FOCUS ends and WAKE cannot enter it', 0.0, 1.0)
    dream_min_atp: float = tunable(0.4, 'ATP fraction needed to start dreaming', 0.0, 1.0)
    dream_exit_atp: float = tunable(0.3, 'ATP fraction below which DREAM goes to REST', 0.0,
                                    1.0)
    dream_idle_s: float = tunable(600.0, 'Idle time after which WAKE goes to DREAM', 0.0,
                                  1e7, unit='s')
    rest_to_dream_s: float = tunable(
        10.0, 'Idle time in REST after which REST goes to DREAM (tested before REST->WAKE)', 0.0,
        1e7, unit='s')
    dream_duration_s: float = tunable(300.0, 'How long a dream lasts before WAKE', 0.0, 1e7,
                                      unit='s')
    dream_wake_salience: float = tunable(
        0.3, 'Attention salience that wakes from DREAM at once', 0.0, 1.0)
    idle_salience: float = tunable(
        0.2, 'Attention salience below which (with nothing queued or running) the kernel is '
        'idle', 0.0, 1.0)
    attention_half_life_s: float = tunable(
        5.0, 'Half-life of the attention left by a salient observation', 0.01, 1e6, unit='s')
    crisis_after_failures: int = tunable(
        3, 'Consecutive failed goals that raise CRISIS (0: never)', 0, 1000, unit='goals')
    crisis_failure_hold_s: float = tunable(
        30.0, 'How long a failure crisis holds without new failures', 0.0, 1e6, unit='s')
    focus_boost: float = tunable(
        3.0, 'Allocation weight multiplier of the most salient target in FOCUS and CRISIS',
        1.0, 100.0)
    preempt_margin: float = tunable(
        0.1, 'Salience a target needs above a running goal to preempt it', 0.0, 1.0)
    circadian_period_s: float = tunable(
        86400.0, 'Length of the circadian day (0: no circadian biases)', 0.0, 1e9, unit='s')
    circadian_offset_s: float = tunable(
        0.0, 'Added to the clock before taking the phase (e.g. the UTC offset of local time); '
        'phase 0 is midnight, 0.5 noon', -1e9, 1e9, unit='s')
    focus_day_gain: float = tunable(
        0.25, 'By day the FOCUS threshold is divided by (1 + this x daylight)', 0.0, 10.0)
    wake_day_gain: float = tunable(
        0.25, 'By day the REST->WAKE threshold is divided by (1 + this x daylight)', 0.0, 10.0)
    rest_night_gain: float = tunable(
        0.25, 'At night the REST threshold is multiplied by (1 + this x darkness)', 0.0, 10.0)
    dream_night_gain: float = tunable(
        1.0, 'At night dreams start (1 + this x darkness) times sooner and last that much '
        'longer', 0.0, 100.0)

    def __post_init__(self) -> None:
        check_ranges(self)
        on = 1.0 if self.circadian_period_s > 0 else 0.0    # gains apply only with a clock
        if not self.crisis_enter < self.crisis_exit:
            raise ValueError('crisis_enter must be below crisis_exit (hysteresis)')
        if not self.rest_enter * (1 + on * self.rest_night_gain) < self.wake_enter / (
                1 + on * self.wake_day_gain):
            raise ValueError('rest_enter (raised at night) must stay below wake_enter '
                             '(lowered by day): REST needs a way out')
        if not self.focus_exit < self.focus_enter / (1 + on * self.focus_day_gain):
            raise ValueError('focus_exit must stay below focus_enter (lowered by day)')
        if not self.dream_exit_atp < self.dream_min_atp:
            raise ValueError('dream_exit_atp must be below dream_min_atp (hysteresis)')


@dataclass(frozen=True)
class Circadian:
    phase: float      # [0, 1): 0 midnight, 0.5 noon
    day: float        # [0, 1] daylight, 1 at noon
    night: float      # [0, 1] darkness, 1 at midnight


def circadian(now: float, params: MetabolicParams) -> Circadian:
    if params.circadian_period_s <= 0 or not math.isfinite(now):
        return Circadian(0.0, 0.0, 0.0)
    phase = ((now + params.circadian_offset_s) % params.circadian_period_s) \
        / params.circadian_period_s
    return Circadian(phase, max(0.0, math.cos(2 * math.pi * (phase - 0.5))),
                     max(0.0, math.cos(2 * math.pi * phase)))


@dataclass(frozen=True)
class Thresholds:
    """The thresholds in force now, after the circadian biases."""

    focus_enter: float
    rest_enter: float
    wake_enter: float
    dream_idle_s: float
    rest_to_dream_s: float
    dream_duration_s: float


def thresholds(now: float, p: MetabolicParams) -> Thresholds:
    c = circadian(now, p)
    dream_bias = 1.0 + p.dream_night_gain * c.night
    return Thresholds(
        focus_enter=p.focus_enter / (1.0 + p.focus_day_gain * c.day),
        rest_enter=p.rest_enter * (1.0 + p.rest_night_gain * c.night),
        wake_enter=p.wake_enter / (1.0 + p.wake_day_gain * c.day),
        dream_idle_s=p.dream_idle_s / dream_bias,
        rest_to_dream_s=p.rest_to_dream_s / dream_bias,
        dream_duration_s=p.dream_duration_s * dream_bias)


@dataclass(frozen=True)
class MetabolicInputs:
    atp_fraction: float      # level / capacity
    salience: float          # attention: decayed peak of recent salience, or queued/running max
    load: int                # observations waiting plus goals running
    now: float               # [s]
    crisis: str = ''         # why the kernel declares a crisis ('' = no crisis besides ATP)


@dataclass(frozen=True)
class Transition:
    source: MetabolicState
    target: MetabolicState
    reason: str
    at: float


def _pct(x: float) -> str:
    return f'{100.0 * x:.0f}%'


class MetabolicController:
    """Decides the state from ATP, attention and load; every state can be reached and left."""

    def __init__(self, params: Optional[MetabolicParams] = None,
                 policies: Optional[Mapping[MetabolicState, StatePolicy]] = None,
                 now: float = 0.0, state: MetabolicState = MetabolicState.WAKE) -> None:
        self.params = params or MetabolicParams()
        self.policies: Dict[MetabolicState, StatePolicy] = dict(policies or DEFAULT_POLICIES)
        check_policies(self.policies)
        self.state = state
        self.previous: Optional[MetabolicState] = None
        self.reason = 'start'
        self.entered_at = now
        self.last_busy = now
        self.history: Deque[Transition] = deque(maxlen=100)

    @property
    def policy(self) -> StatePolicy:
        return self.policies[self.state]

    def set_params(self, params: MetabolicParams) -> None:
        self.params = params

    def set_policies(self, policies: Mapping[MetabolicState, StatePolicy]) -> None:
        check_policies(policies)
        self.policies = dict(policies)

    def update(self, inp: MetabolicInputs) -> Optional[Transition]:
        """Apply the transition rules once; returns the transition if the state changed."""
        if inp.load > 0 or inp.salience >= self.params.idle_salience:
            self.last_busy = inp.now
        nxt = self._next(inp)
        if nxt is None:
            return None
        target, reason = nxt
        t = Transition(self.state, target, reason, inp.now)
        self.previous, self.state, self.reason = self.state, target, reason
        self.entered_at = inp.now
        self.last_busy = inp.now      # idle time is counted per state
        self.history.append(t)
        return t

    def enter_dream(self, inp: MetabolicInputs, reason: str) -> Tuple[Optional[Transition], str]:
        """Enter DREAM now, asked for (`kernel/sleep`, a session's end): (transition, '') or
        (None, why not). The dwell is not waited for (someone asked), but every rule that would
        end the dream at once refuses it instead, so a forced dream is one the table keeps: not
        in CRISIS, not with ATP below `dream_min_atp`, not while something salient enough to
        wake it is waiting or running. Already dreaming: (None, '') and the dream goes on."""
        p = self.params
        a = inp.atp_fraction if math.isfinite(inp.atp_fraction) else 0.0
        s = inp.salience if math.isfinite(inp.salience) else 0.0
        if self.state is MetabolicState.DREAM:
            return None, ''
        if self.state is MetabolicState.CRISIS:
            return None, f'in CRISIS ({self.reason}): it must recover first'
        if a < p.crisis_enter or inp.crisis:
            return None, 'a crisis is due: ' + (inp.crisis or f'ATP {_pct(a)}')
        if a < p.dream_min_atp:
            return None, (f'ATP {_pct(a)} is below the {_pct(p.dream_min_atp)} needed to dream; '
                          'REST recharges first')
        if s >= p.dream_wake_salience:
            return None, (f'something salient ({s:.2f} >= {p.dream_wake_salience:.2f}) is waiting '
                          'or being answered: it would end the dream at once')
        t = Transition(self.state, MetabolicState.DREAM, reason or 'asked to sleep', inp.now)
        self.previous, self.state, self.reason = self.state, t.target, t.reason
        self.entered_at = inp.now
        self.last_busy = inp.now
        self.history.append(t)
        return t, ''

    def _next(self, inp: MetabolicInputs) -> Optional[Tuple[MetabolicState, str]]:
        p = self.params
        S = MetabolicState
        th = thresholds(inp.now, p)
        a = inp.atp_fraction if math.isfinite(inp.atp_fraction) else 0.0
        s = inp.salience if math.isfinite(inp.salience) else 0.0
        dwell = inp.now - self.entered_at
        dwell_ok = dwell >= p.min_dwell_s
        idle = inp.load == 0 and s < p.idle_salience
        idle_for = inp.now - self.last_busy if idle else 0.0
        st = self.state

        # Interrupts: ignore the dwell.
        if st is not S.CRISIS:
            if a < p.crisis_enter:
                return S.CRISIS, f'ATP {_pct(a)} below the crisis level {_pct(p.crisis_enter)}'
            if inp.crisis:
                return S.CRISIS, inp.crisis
        if st is S.DREAM and s >= p.dream_wake_salience:
            return S.WAKE, f'salient input ({s:.2f} >= {p.dream_wake_salience:.2f}) ended the dream'
        if not dwell_ok:
            return None

        if st is S.CRISIS:
            if a >= p.crisis_exit and not inp.crisis:
                return S.REST, f'ATP recovered to {_pct(a)} (>= {_pct(p.crisis_exit)})'
        elif st is S.WAKE:
            if a < th.rest_enter:
                return S.REST, f'ATP {_pct(a)} below the rest level {_pct(th.rest_enter)}'
            if s >= th.focus_enter and a >= p.focus_min_atp:
                return S.FOCUS, f'salience {s:.2f} >= focus threshold {th.focus_enter:.2f}'
            if idle and idle_for >= th.dream_idle_s and a >= p.dream_min_atp:
                return S.DREAM, f'idle for {idle_for:.0f} s'
        elif st is S.FOCUS:
            if a < th.rest_enter:
                return S.REST, f'ATP {_pct(a)} below the rest level {_pct(th.rest_enter)}'
            if s < p.focus_exit:
                return S.WAKE, f'attention {s:.2f} fell below {p.focus_exit:.2f}'
            if a < p.focus_min_atp:
                return S.WAKE, f'ATP {_pct(a)} too low to stay focused ({_pct(p.focus_min_atp)})'
        elif st is S.REST:
            # Idle first: a rested kernel with nothing to do dreams rather than wakes.
            if idle and idle_for >= th.rest_to_dream_s and a >= p.dream_min_atp:
                return S.DREAM, f'rested and idle for {idle_for:.0f} s'
            if a >= th.wake_enter:
                return S.WAKE, f'ATP recovered to {_pct(a)} (>= {_pct(th.wake_enter)})'
        elif st is S.DREAM:
            if a < p.dream_exit_atp:
                return S.REST, f'ATP {_pct(a)} below the dream level {_pct(p.dream_exit_atp)}'
            if dwell >= th.dream_duration_s:
                return S.WAKE, f'dream complete after {dwell:.0f} s'
        return None
