"""Metabolic controller: every transition of the table, hysteresis, circadian biases, and one
test per bug recorded in the prototype (sage_algorithms.md sections 1-3 and 11)."""

from __future__ import annotations

from typing import Any

import pytest

from sage_ros.core.kernel import KernelConfig, config_with
from sage_ros.core.metabolism import (DEFAULT_POLICIES, MetabolicController, MetabolicInputs,
                                      MetabolicParams, MetabolicState, StatePolicy, check_policies,
                                      thresholds)
from sage_ros.core.salience import Observation, SnarcSalience, ngram_embedder

S = MetabolicState
DAY = 86400.0
NOON, MIDNIGHT = 0.5 * DAY, 0.0


def params(**kw: Any) -> MetabolicParams:
    base: dict = dict(circadian_period_s=0.0, min_dwell_s=1.0, dream_idle_s=60.0,
                      rest_to_dream_s=30.0, dream_duration_s=100.0)
    base.update(kw)
    return MetabolicParams(**base)


def ctl(state: MetabolicState, **kw: Any) -> MetabolicController:
    return MetabolicController(params(**kw), now=0.0, state=state)


def step(c: MetabolicController, now: float, atp: float, sal: float = 0.0, load: int = 0,
         crisis: str = '') -> MetabolicState:
    c.update(MetabolicInputs(atp, sal, load, now, crisis))
    return c.state


# ---- the transition table ------------------------------------------------------------------
@pytest.mark.parametrize('start, atp, sal, load, target, why', [
    (S.WAKE, 0.9, 0.7, 1, S.FOCUS, 'salience'),
    (S.WAKE, 0.2, 0.0, 0, S.REST, 'rest level'),
    (S.WAKE, 0.05, 0.0, 0, S.CRISIS, 'crisis level'),
    (S.FOCUS, 0.9, 0.1, 0, S.WAKE, 'attention'),
    (S.FOCUS, 0.35, 0.9, 1, S.WAKE, 'too low to stay focused'),
    (S.FOCUS, 0.2, 0.9, 1, S.REST, 'rest level'),
    (S.FOCUS, 0.05, 0.9, 1, S.CRISIS, 'crisis level'),
    (S.REST, 0.7, 0.0, 0, S.WAKE, 'recovered'),
    (S.REST, 0.05, 0.0, 0, S.CRISIS, 'crisis level'),
    (S.DREAM, 0.25, 0.0, 0, S.REST, 'dream level'),
    (S.DREAM, 0.05, 0.0, 0, S.CRISIS, 'crisis level'),
    (S.CRISIS, 0.25, 0.0, 0, S.REST, 'recovered'),
])
def test_each_transition_fires_on_its_rule(start: MetabolicState, atp: float, sal: float,
                                           load: int, target: MetabolicState, why: str) -> None:
    c = ctl(start)
    t = c.update(MetabolicInputs(atp, sal, load, 2.0))
    assert t is not None and (t.source, t.target) == (start, target) and why in t.reason
    assert c.previous is start and c.reason == t.reason


def test_wake_goes_to_dream_after_being_idle_long_enough() -> None:
    c = ctl(S.WAKE)
    assert step(c, 59.0, 0.9) is S.WAKE
    assert step(c, 61.0, 0.9) is S.DREAM and 'idle' in c.reason


def test_wake_does_not_dream_while_work_waits_or_energy_is_low() -> None:
    busy, tired = ctl(S.WAKE), ctl(S.WAKE, rest_enter=0.1, wake_enter=0.6)
    for t in range(0, 200, 10):
        step(busy, float(t), 0.9, sal=0.1, load=1)
        step(tired, float(t), 0.35)
    assert busy.state is S.WAKE and tired.state is S.WAKE


def test_rest_goes_to_dream_when_rested_and_idle() -> None:
    c = ctl(S.REST)
    assert step(c, 29.0, 0.5) is S.REST          # above dream_min_atp, below wake_enter
    assert step(c, 31.0, 0.5) is S.DREAM and 'rested' in c.reason


def test_a_rested_idle_kernel_dreams_rather_than_wakes() -> None:
    """REST tests idleness before recovered ATP, else its fast recharge woke it first and
    REST -> DREAM never fired."""
    c = ctl(S.REST)
    assert step(c, 31.0, 0.9) is S.DREAM and 'rested and idle for 31 s' in c.reason
    early = ctl(S.REST)
    assert step(early, 29.0, 0.9) is S.WAKE and 'recovered' in early.reason


def test_rest_counts_idle_time_not_time_in_the_state() -> None:
    c = ctl(S.REST)
    for t in range(2, 26, 2):                       # 24 s in REST, busy with deferred work
        assert step(c, float(t), 0.5, sal=0.3, load=1) is S.REST
    assert step(c, 40.0, 0.5) is S.REST              # 40 s in REST, idle for 16 s
    assert step(c, 55.0, 0.5) is S.DREAM and 'idle for 31 s' in c.reason


def test_dream_ends_after_its_duration() -> None:
    c = ctl(S.DREAM)
    assert step(c, 99.0, 0.9) is S.DREAM
    assert step(c, 101.0, 0.9) is S.WAKE and 'dream complete' in c.reason


def test_salient_input_wakes_from_dream_without_waiting_for_the_dwell() -> None:
    c = ctl(S.DREAM, min_dwell_s=50.0)
    assert step(c, 0.1, 0.9, sal=0.2, load=1) is S.DREAM
    assert step(c, 0.2, 0.9, sal=0.5, load=1) is S.WAKE and 'ended the dream' in c.reason


def test_every_state_is_reachable_and_left_on_one_timeline() -> None:
    c = ctl(S.WAKE)
    visited = [c.state]
    for now, atp, sal, load in [(2, 0.9, 0.8, 1), (4, 0.9, 0.1, 0), (6, 0.2, 0.0, 0),
                                (8, 0.5, 0.0, 0), (40, 0.5, 0.0, 0), (42, 0.9, 0.6, 1),
                                (44, 0.05, 0.0, 1), (46, 0.25, 0.0, 0), (48, 0.7, 0.0, 0)]:
        if step(c, float(now), atp, sal, load) is not visited[-1]:
            visited.append(c.state)
    assert visited == [S.WAKE, S.FOCUS, S.WAKE, S.REST, S.DREAM, S.WAKE, S.CRISIS, S.REST,
                       S.WAKE]
    assert [(t.source, t.target) for t in c.history][0] == (S.WAKE, S.FOCUS)


# ---- hysteresis ----------------------------------------------------------------------------
def test_no_normal_transition_before_the_minimum_dwell() -> None:
    c = ctl(S.WAKE, min_dwell_s=5.0)
    assert step(c, 4.9, 0.9, sal=0.9, load=1) is S.WAKE
    assert step(c, 5.0, 0.9, sal=0.9, load=1) is S.FOCUS
    assert step(c, 6.0, 0.9, sal=0.0) is S.FOCUS          # dwell again in FOCUS
    assert step(c, 10.0, 0.9, sal=0.0) is S.WAKE


def test_crisis_ignores_the_dwell_but_leaving_it_does_not() -> None:
    c = ctl(S.WAKE, min_dwell_s=5.0)
    assert step(c, 0.1, 0.05) is S.CRISIS
    assert step(c, 1.0, 0.9) is S.CRISIS
    assert step(c, 5.1, 0.9) is S.REST


def test_thresholds_between_enter_and_exit_hold_the_state() -> None:
    c = ctl(S.FOCUS)
    assert step(c, 2.0, 0.9, sal=0.5) is S.FOCUS           # 0.4 <= 0.5 < 0.6: stays
    w = ctl(S.WAKE)
    assert step(w, 2.0, 0.9, sal=0.5) is S.WAKE            # and does not enter
    r = ctl(S.REST)
    assert step(r, 2.0, 0.45) is S.REST                     # 0.3 <= 0.45 < 0.6


@pytest.mark.parametrize('kw, message', [
    (dict(crisis_enter=0.3, crisis_exit=0.2), 'crisis_enter'),
    (dict(rest_enter=0.6, wake_enter=0.6), 'rest_enter'),
    (dict(focus_enter=0.4, focus_exit=0.4), 'focus_exit'),
    (dict(dream_exit_atp=0.5, dream_min_atp=0.4), 'dream_exit_atp'),
    (dict(min_dwell_s=-1.0), 'min_dwell_s'),
])
def test_parameters_without_hysteresis_are_refused(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        params(**kw)


# ---- policies ------------------------------------------------------------------------------
def test_each_state_has_its_policy() -> None:
    p = DEFAULT_POLICIES
    assert [p[s].max_targets for s in S] == [3, 1, 1, 0, 1]
    assert [s for s in S if p[s].consolidation] == [S.DREAM]
    assert [s for s in S if p[s].preempt] == [S.FOCUS, S.CRISIS]
    assert p[S.FOCUS].allows_tool('dangerous') and not p[S.WAKE].allows_tool('dangerous')
    assert not p[S.DREAM].allows_tool('standard') and p[S.REST].min_salience > 0
    assert p[S.REST].min_period_s > p[S.WAKE].min_period_s
    assert StatePolicy(sensors=('text',)).accepts('text')
    assert not StatePolicy(sensors=('text',)).accepts('camera')
    assert StatePolicy(tools=('none',)).tools == ()


def test_circadian_biases_point_the_right_way() -> None:
    p = MetabolicParams()
    noon, night = thresholds(NOON, p), thresholds(MIDNIGHT, p)
    assert noon.focus_enter < night.focus_enter == p.focus_enter
    assert noon.wake_enter < night.wake_enter
    assert night.dream_idle_s < noon.dream_idle_s and night.rest_to_dream_s < noon.rest_to_dream_s
    off = thresholds(NOON, MetabolicParams(circadian_period_s=0.0))
    assert off.focus_enter == p.focus_enter and off.rest_enter == p.rest_enter


# ---- the prototype's bugs, one test each ---------------------------------------------------
def test_bug_constant_salience_made_focus_unreachable() -> None:
    """Prototype bug: the live loop's salience was a constant per input type (a chat message
    always scored 0.62), so WAKE->FOCUS (salience > 0.8) could never fire. Here salience comes
    from SNARC, routine input stays below the threshold and a sudden change crosses it."""
    snarc, c = SnarcSalience(ngram_embedder()), ctl(S.WAKE)
    now = 0.0
    for i in range(8):
        now += 2.0
        sc = snarc.score('text', Observation(f'status report {i}: all systems nominal'))
        step(c, now, 0.9, sal=sc.total, load=1)
        assert c.state is S.WAKE and sc.total < c.params.focus_enter
    sc = snarc.score('text', Observation('FIRE!!! EVERYONE OUT OF THE BUILDING NOW!!!'))
    assert sc.total >= c.params.focus_enter
    assert step(c, now + 2.0, 0.9, sal=sc.total, load=1) is S.FOCUS


def test_bug_focus_to_rest_branch_was_unreachable() -> None:
    """Prototype bug: FOCUS->WAKE on ATP < 20 was tested before FOCUS->REST on ATP < 15, so
    FOCUS could never go to REST. Here low ATP is tested first."""
    c = ctl(S.FOCUS)
    assert step(c, 2.0, 0.15, sal=0.9, load=1) is S.REST


def test_bug_rest_to_wake_branch_was_unreachable() -> None:
    """Prototype bug (AttentionManager): the REST->WAKE branch could never be taken. Here REST
    wakes as soon as ATP is back."""
    c = ctl(S.REST)
    assert step(c, 2.0, 0.65) is S.WAKE


def test_bug_durations_counted_in_cycles_depend_on_the_cycle_rate() -> None:
    """Prototype bug: dwell and idle times were cycle counts, so DREAM came after a few ms at
    fast rates (and the fix for slow rates made it rate-dependent). Here they are seconds of the
    clock: 10,000 cycles in one second do not dream, one cycle after the idle time does."""
    c = ctl(S.WAKE)
    for i in range(10_000):
        step(c, 2.0 + i * 1e-4, 0.9)
    assert c.state is S.WAKE
    assert step(c, 61.0, 0.9) is S.DREAM


def test_bug_rest_threshold_was_highest_at_midday() -> None:
    """Prototype bug: rest_threshold = 30 x wake_bias peaked at noon although it was meant to be
    raised at night. Here REST comes sooner at night."""
    p = MetabolicParams()
    assert thresholds(MIDNIGHT, p).rest_enter > thresholds(NOON, p).rest_enter


def test_bug_dreams_were_shorter_at_night() -> None:
    """Prototype bug: DREAM->WAKE after 18 / dream_bias cycles, so the night bias shortened
    dreams. Here a night dream lasts longer than a day one."""
    p = MetabolicParams()
    assert thresholds(MIDNIGHT, p).dream_duration_s > thresholds(NOON, p).dream_duration_s


def test_bug_full_energy_ended_every_dream_at_once() -> None:
    """Prototype bug: DREAM->WAKE when ATP > 70, so a dream entered from a rested WAKE ended on
    the next cycle. Here a dream with full ATP runs its duration."""
    c = ctl(S.WAKE)
    assert step(c, 61.0, 1.0) is S.DREAM
    assert step(c, 100.0, 1.0) is S.DREAM
    assert step(c, 162.0, 1.0) is S.WAKE


def test_bug_crisis_could_only_come_from_energy() -> None:
    """Prototype bug: `crisis_detected` was always False in the loop. Here the kernel's crisis
    flag (repeated failures) enters CRISIS, holds it while set, and leaving follows once it
    clears."""
    c = ctl(S.WAKE)
    assert step(c, 0.5, 0.9, crisis='3 consecutive failed goals') is S.CRISIS
    assert step(c, 5.0, 0.9, crisis='3 consecutive failed goals') is S.CRISIS
    assert step(c, 6.0, 0.9) is S.REST


def test_bug_recovery_states_without_recharge_were_traps() -> None:
    """Prototype bug: REST allowed 0 plugins and FOCUS recovered 0 ATP, so states could hold the
    kernel with nothing to do. Here a recovery state must recharge, and CRISIS serves one."""
    for state in (S.REST, S.DREAM, S.CRISIS):
        bad = dict(DEFAULT_POLICIES)
        bad[state] = StatePolicy(recharge_per_s=0.0)
        with pytest.raises(ValueError, match='could never be left'):
            check_policies(bad)
    bad = dict(DEFAULT_POLICIES)
    bad[S.CRISIS] = StatePolicy(max_targets=2, recharge_per_s=1.0)
    with pytest.raises(ValueError, match='only the most salient'):
        check_policies(bad)


def test_bug_state_names_compared_case_sensitively() -> None:
    """Prototype bug: the LLM pool compared 'focus' with 'FOCUS' and never applied its state
    bonus. Here the state a parameter names ('states.<state>.<field>') is parsed
    case-insensitively, and an unknown one is an error that lists the states."""
    cfg = config_with(KernelConfig(), {'states.Focus.max_targets': 2,
                                       'states.REST.min_salience': 0.4})
    assert cfg.states[S.FOCUS].max_targets == 2 and cfg.states[S.REST].min_salience == 0.4
    with pytest.raises(ValueError, match="unknown metabolic state 'sleep'; expected one of WAKE"):
        config_with(KernelConfig(), {'states.sleep.max_targets': 1})
