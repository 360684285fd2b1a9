"""DREAM answers people and can be entered on request, without ROS.

DREAM serves no goal of its own, but a person's turn (the kernel's `people` sources) is still
answered, one at a time, without ending the dream; a sensor stream waits as before, and a
salient observation still wakes the kernel. `Kernel.sleep` enters DREAM through the metabolic
controller, which refuses a dream its own rules would end at once.
"""

from __future__ import annotations

from typing import Any

import pytest

from sage_ros.core.kernel import Kernel, KernelConfig, WorkResult, config_with
from sage_ros.core.metabolism import (MetabolicController, MetabolicInputs, MetabolicParams,
                                      MetabolicState)
from test_core_kernel import kernel

S = MetabolicState


def dreaming(**changes: Any) -> Kernel:
    """A kernel that fell asleep on its own (idle in WAKE), at t=11."""
    k = kernel({'whisper': 0.25, 'hi': 0.2, 'again': 0.2, 'hey!': 0.5, 'uh': 0.25},
               metabolism__dream_idle_s=10.0, **changes)
    k.cycle(0.0)
    k.cycle(11.0)
    assert k.state is S.DREAM
    return k


def test_in_dream_a_person_is_answered_one_at_a_time_and_the_dream_goes_on() -> None:
    k = dreaming()
    first = k.observe('console', 'hi', 12.0)
    second = k.observe('text', 'again', 12.0)
    sensor = k.observe('radio', 'whisper', 12.0)
    out = k.cycle(12.0)
    assert out.transition is None and k.state is S.DREAM
    assert [d.turn_id for d in out.dispatches] == [first.turn_id]
    (d,) = out.dispatches
    assert 'a person, answered in DREAM' in d.reason and d.max_new_tokens > 0
    waits = dict(out.deferred)
    assert waits[second.turn_id] == 'DREAM answers 1 person at a time'
    assert waits[sensor.turn_id] == 'DREAM defers salience 0.25 < 1.00'
    k.complete(d.turn_id, WorkResult(True, completion_tokens=5), 13.0)
    out = k.cycle(13.0)
    assert [x.turn_id for x in out.dispatches] == [second.turn_id] and k.state is S.DREAM
    assert sensor.turn_id in k.pending         # the sensor stream still waits


def test_in_dream_a_salient_observation_still_wakes_the_kernel() -> None:
    k = dreaming()
    k.observe('radio', 'whisper', 12.0)
    k.cycle(12.0)
    k.observe('console', 'hey!', 13.0)
    out = k.cycle(13.0)
    assert out.transition is not None and out.transition.target is S.WAKE
    assert 'ended the dream' in out.transition.reason
    assert [d.text for d in out.dispatches] == ['hey!', 'whisper']


def test_people_are_a_parameter_and_a_dream_without_person_targets_lets_them_wait() -> None:
    k = dreaming(people=['hri/text'])
    console = k.observe('console', 'hi', 12.0)
    hri = k.observe('hri/text', 'uh', 12.0)
    out = k.cycle(12.0)
    assert [d.turn_id for d in out.dispatches] == [hri.turn_id]
    assert dict(out.deferred)[console.turn_id] == 'DREAM defers salience 0.20 < 1.00'
    k2 = dreaming(**{'states.dream.person_targets': 0})
    k2.observe('console', 'hi', 12.0)
    assert k2.cycle(12.0).dispatches == ()
    everyone = config_with(KernelConfig(), {'people': ['*']}).kernel
    assert everyone.is_person('anything') and not config_with(
        KernelConfig(), {'people': ['none']}).kernel.is_person('console')


def test_a_person_in_dream_waits_when_atp_is_short_and_says_why() -> None:
    k = dreaming(**{'states.dream.spend_fraction': 0.01})   # 1 ATP: below min_grant 2
    obs = k.observe('console', 'hi', 12.0)
    out = k.cycle(12.0)
    assert out.dispatches == () and 'ATP short' in dict(out.deferred)[obs.turn_id]


def test_sleep_enters_dream_now_and_the_dream_runs_its_course() -> None:
    k = kernel({'hello': 0.5}, metabolism__min_dwell_s=30.0)
    k.cycle(0.0)
    d = k.observe('console', 'hello', 1.0)
    (sent,) = k.cycle(1.0).dispatches
    k.complete(sent.turn_id, WorkResult(True, completion_tokens=3), 1.5)
    # The answered turn's attention (0.5) has not decayed, and the dwell is not over: neither
    # stops a dream someone asked for.
    t, why = k.sleep(2.0, 'the user said goodnight')
    assert why == '' and t is not None and (t.source, t.target) == (S.WAKE, S.DREAM)
    assert t.reason == 'the user said goodnight' and k.metabolism.history[-1] is t
    snap = k.snapshot(2.0)
    assert snap.metabolic_state == 'DREAM' and snap.consolidation_allowed
    assert snap.transition_reason == 'the user said goodnight' and d.turn_id not in k.pending
    assert k.cycle(3.0).transition is None and k.state is S.DREAM   # attention let go
    assert k.sleep(4.0, 'again') == (None, '')                       # already dreaming
    out = k.cycle(2.0 + 300.0)
    assert out.transition is not None and out.transition.target is S.WAKE
    assert 'dream complete' in out.transition.reason


def test_sleep_is_refused_when_the_dream_would_end_at_once() -> None:
    k = kernel({'urgent!': 0.8})
    k.cycle(0.0)
    k.observe('console', 'urgent!', 1.0)        # waits: no ATP to grant (capacity drained)
    k.ledger.reserve(k.ledger.available)
    k.cycle(1.0)
    t, why = k.sleep(1.0, 'sleep')
    assert t is None and 'something salient (0.80 >= 0.30)' in why and k.state is not S.DREAM


@pytest.mark.parametrize('start, atp, crisis, expect', [
    (S.CRISIS, 0.9, '', 'in CRISIS'),
    (S.WAKE, 0.35, '', 'below the 40% needed to dream'),
    (S.WAKE, 0.05, '', 'a crisis is due'),
    (S.WAKE, 0.9, '3 consecutive failed goals', 'a crisis is due: 3 consecutive'),
])
def test_the_controller_refuses_a_forced_dream_its_rules_would_end(
        start: MetabolicState, atp: float, crisis: str, expect: str) -> None:
    c = MetabolicController(MetabolicParams(circadian_period_s=0.0), now=0.0, state=start)
    t, why = c.enter_dream(MetabolicInputs(atp, 0.0, 0, 1.0, crisis), 'asked')
    assert t is None and expect in why and c.state is start and not c.history


def test_a_forced_dream_counts_its_dwell_and_idle_time_from_its_start() -> None:
    c = MetabolicController(MetabolicParams(circadian_period_s=0.0, dream_duration_s=50.0),
                            now=0.0)
    t, _ = c.enter_dream(MetabolicInputs(0.9, 0.1, 0, 10.0), '')
    assert t is not None and t.reason == 'asked to sleep' and c.entered_at == 10.0
    assert c.update(MetabolicInputs(0.9, 0.0, 0, 59.0)) is None
    woke = c.update(MetabolicInputs(0.9, 0.0, 0, 60.0))
    assert woke is not None and woke.target is S.WAKE and 'after 50 s' in woke.reason
