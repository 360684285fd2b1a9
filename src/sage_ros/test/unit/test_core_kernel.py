"""The kernel's cycle without ROS: queueing, deferral and expiry, state policies, allocation,
preemption, time-outs, routing to reasoning or language, settlement and persistence.

Salience comes from a table chosen by each test (the SNARC engine has its own tests), so the
kernel's decisions can be checked against exact salience values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytest

from sage_ros.core.blocks import BlockDescriptor, BlockRegistry, BlockType
from sage_ros.core.kernel import (ACTION_LANGUAGE, ACTION_REASONING, KIND_LANGUAGE,
                                  KIND_REASONING, Dispatch, Kernel, KernelConfig, WorkResult,
                                  config_params, config_with)
from sage_ros.core.language import LanguageBlock
from sage_ros.core.metabolism import MetabolicState
from sage_ros.core.routing import Complexity
from sage_ros.core.salience import (Observation, SalienceScore, SnarcSalience, ngram_embedder)
from sage_ros.core.store import StateStore

S = MetabolicState


class TableScorer:
    """Salience chosen by the test: the total per text (default 0.3); records outcomes."""

    def __init__(self, table: Optional[Dict[str, float]] = None) -> None:
        self.table = table or {}
        self.outcomes: List[Tuple[str, float, float]] = []
        self.restored: Dict[str, Any] = {}

    @property
    def weights(self) -> Tuple[float, ...]:
        return (0.2,) * 5

    def score(self, sensor_id: str, observation: Observation) -> SalienceScore:
        t = self.table.get(observation.text, 0.3)
        return SalienceScore(t, t, t, 0.5, 0.0, total=t)

    def record_outcome(self, sensor_id: str, score: SalienceScore, value: float) -> None:
        self.outcomes.append((sensor_id, score.total, value))

    def export_state(self) -> Dict[str, Any]:
        return {'outcomes': len(self.outcomes)}

    def restore_state(self, state: Dict[str, Any]) -> None:
        self.restored = state


def block(name: str = 'language', loaded: bool = True, action: str = ACTION_LANGUAGE,
          capability: str = 'conversation', concurrency: int = 0) -> BlockDescriptor:
    return BlockDescriptor(name, BlockType.MONOLITHIC, (capability,), ('text',),
                           f'/sage/blocks/{name}', action, loaded, concurrency=concurrency)


def config(**changes: Any) -> KernelConfig:
    base: Dict[str, Any] = {'metabolism.circadian_period_s': 0.0, 'metabolism.min_dwell_s': 0.0}
    base.update({k.replace('__', '.'): v for k, v in changes.items()})
    return config_with(KernelConfig(), base)


def kernel(table: Optional[Dict[str, float]] = None, blocks: Tuple[BlockDescriptor, ...] = (
        block(),), store: Optional[StateStore] = None, complexity: Any = None,
           **changes: Any) -> Kernel:
    reg = BlockRegistry()
    for b in blocks:
        reg.update(b)
    kw: Dict[str, Any] = {} if complexity is None else {'complexity': complexity}
    return Kernel(TableScorer(table), config(**changes), reg, store=store, **kw)


def serve(k: Kernel, text: str, now: float) -> Dispatch:
    obs = k.observe('text', text, now)
    assert obs.rejection is None
    out = k.cycle(now)
    assert [d.turn_id for d in out.dispatches] == [obs.turn_id], out
    return out.dispatches[0]


def drain_to(k: Kernel, level: float, now: float) -> None:
    """Spend ATP through a real goal that overran its grant, down to `level`."""
    d = serve(k, 'drain', now)
    tokens = (k.ledger.level - level - k.config.atp.per_run) / k.config.atp.per_token
    k.complete(d.turn_id, WorkResult(True, completion_tokens=round(tokens)), now)
    assert k.ledger.level == pytest.approx(level, abs=0.1)


# ---- observe and dispatch ------------------------------------------------------------------
def test_text_is_sanitised_scored_and_dispatched_with_budget_deadline_and_complexity() -> None:
    k = kernel({'hello robot': 0.5}, complexity=lambda text: Complexity.COMPLEX)
    obs = k.observe('text', 'hello\x00 robot', now=0.0)
    assert obs.text == 'hello robot' and obs.score is not None and obs.metabolic_state == 'WAKE'
    d = k.cycle(0.0).dispatches[0]
    assert (d.turn_id, d.text, d.block.name, d.kind) == (1, 'hello robot', 'language',
                                                         KIND_LANGUAGE)
    assert d.complexity is Complexity.COMPLEX and 'no reasoning block' in d.reason
    assert d.atp_grant == pytest.approx(1.0 + 128 * 0.05)   # what one answer needs
    assert d.atp_budget == pytest.approx(128 * 0.05)        # the run's own charge is the kernel's
    assert d.max_new_tokens == 128 and d.deadline == 300.0  # always bounded by the grant
    snap = k.snapshot(0.0)
    assert snap.active_dispatches == 1 and snap.atp_reserved == pytest.approx(d.atp_grant)


@pytest.mark.parametrize('raw, reason', [('', 'invalid input: empty text'),
                                         ('x' * 5000, 'invalid input: text too long')])
def test_invalid_text_is_rejected_with_a_reason_and_not_scored(raw: str, reason: str) -> None:
    k = kernel()
    obs = k.observe('text', raw, now=0.0)
    assert obs.score is None and obs.rejection is not None
    assert obs.rejection.reason.startswith(reason)
    snap = k.snapshot(0.0)
    assert snap.rejected_total == 1 and [(t.name, t.kind) for t in snap.trust] == [('text',
                                                                                  'sensor')]
    assert snap.trust[0].trust < k.config.trust.prior


def test_without_a_block_an_observation_waits_for_the_graph_then_is_served() -> None:
    k = kernel(blocks=(block(loaded=False),))
    obs = k.observe('text', 'hello', now=0.0)
    assert obs.rejection is None and obs.score is not None and obs.observation_id == 'text/1'
    out = k.cycle(0.0)
    assert out.dispatches == () and out.deferred == (
        (obs.turn_id, 'waiting for the graph: no loaded block offers conversation on text'),)
    k.graph_reason = "the language block is not ready: loading 'small'"
    assert k.cycle(0.5).deferred == (
        (obs.turn_id, "waiting for the graph: the language block is not ready: loading 'small'"),)
    k.blocks.update(block())
    (d,) = k.cycle(1.0).dispatches
    assert (d.turn_id, d.observation_id) == (obs.turn_id, 'text/1')


def test_waiting_for_the_graph_expires_with_the_reason() -> None:
    k = kernel(blocks=(), deferred_ttl_s=5.0)
    k.graph_reason = 'the language block stopped (no heartbeat for 2.0 s)'
    obs = k.observe('console', 'hello', 0.0, observation_id='c1/1')
    k.cycle(0.0)
    (expired,) = k.cycle(5.0).expired
    assert (expired.turn_id, expired.observation_id, expired.sensor_id) == (obs.turn_id, 'c1/1',
                                                                          'console')
    assert expired.reason == ('expired after waiting 5 s: waiting for the graph: the language '
                              'block stopped (no heartbeat for 2.0 s)')


def test_a_sensor_the_state_does_not_accept_is_rejected() -> None:
    k = kernel(states__wake__sensors=['camera'])
    obs = k.observe('text', 'hello', now=0.0)
    assert obs.rejection is not None and "does not accept sensor 'text'" in obs.rejection.reason


def test_features_only_observations_are_attended_but_not_dispatched() -> None:
    k = Kernel(SnarcSalience(ngram_embedder()), config())
    k.blocks.update(block())
    obs = k.observe('camera', Observation(features=(1.0, 2.0), modality='image'), now=0.0)
    assert obs.rejection is None and obs.score is not None and k.pending == {}
    assert 'no block serves image' in k.last_decision


# ---- ATP: deferral, expiry, settlement -----------------------------------------------------
def test_low_salience_waits_while_atp_is_short_then_is_dispatched() -> None:
    k = kernel(atp__capacity=10.0, atp__per_token=1.0, atp__answer_tokens=4,
               states__wake__recharge_per_s=0.5, metabolism__rest_enter=0.05,
               metabolism__crisis_enter=0.01, metabolism__crisis_exit=0.02)
    first = serve(k, 'one', 0.0)
    assert first.atp_grant == pytest.approx(3.0) and first.max_new_tokens == 2  # 30 % of 10
    k.complete(first.turn_id, WorkResult(True, completion_tokens=2), 0.0)
    second = serve(k, 'two', 0.0)
    k.complete(second.turn_id, WorkResult(True, completion_tokens=1), 0.0)
    assert k.ledger.level == pytest.approx(5.0)
    obs = k.observe('text', 'three', 0.0)
    out = k.cycle(0.0)
    assert out.dispatches == () and out.deferred[0][0] == obs.turn_id
    assert out.deferred[0][1] == ('ATP short: a goal needs 2.0 ATP and WAKE grants 30% of the '
                                  'available ATP per cycle')
    snap = k.snapshot(0.0)
    assert snap.deferred_total == 1 and 'ATP short' in snap.last_decision and snap.pending == 1
    assert k.cycle(3.0).dispatches == ()                       # 6.5 ATP: pool 1.95
    assert [d.turn_id for d in k.cycle(4.0).dispatches] == [obs.turn_id]   # 7 ATP: pool 2.1


def test_a_waiting_observation_expires_with_its_reason() -> None:
    k = kernel(deferred_ttl_s=5.0, states__wake__max_targets=1)
    serve(k, 'busy', 0.0)
    k.observe('text', 'later', 1.0)
    assert k.cycle(1.0).deferred[0][1] == 'busy: WAKE runs 1 goal at once'
    out = k.cycle(6.0)
    assert [(r.turn_id, r.text) for r in out.expired] == [(2, 'later')]
    assert out.expired[0].reason == 'expired after waiting 5 s: busy: WAKE runs 1 goal at once'
    assert k.snapshot(6.0).rejected_total == 1


def test_a_waiting_observation_expires_with_the_atp_short_reason() -> None:
    k = kernel(deferred_ttl_s=5.0, atp__min_grant=40.0)     # WAKE's pool: 30 % of 100 ATP
    obs = k.observe('text', 'hello', 0.0)
    assert k.cycle(0.0).deferred == ((obs.turn_id, 'ATP short: a goal needs 40.0 ATP and WAKE '
                                      'grants 30% of the available ATP per cycle'),)
    assert k.cycle(4.9).expired == ()
    (expired,) = k.cycle(5.0).expired
    assert expired.turn_id == obs.turn_id and expired.reason == (
        'expired after waiting 5 s: ATP short: a goal needs 40.0 ATP and WAKE grants 30% of the '
        'available ATP per cycle')
    assert k.snapshot(5.0).rejected_total == 1 and k.pending == {}


def test_completion_charges_work_done_refunds_the_rest_and_learns() -> None:
    k = kernel(atp__per_token=0.5, trust__alpha=0.5)
    d = serve(k, 'hello', 0.0)
    s = k.complete(d.turn_id, WorkResult(True, completion_tokens=4), now=1.0)
    assert s is not None and s.charged == 3.0 and s.refunded == pytest.approx(d.atp_grant - 3.0)
    assert k.ledger.reserved == 0.0 and s.trust > k.config.trust.prior
    assert k.scorer.outcomes == [('text', 0.3, s.value)] and 0.99 < s.value <= 1.0  # type: ignore
    assert k.complete(d.turn_id, WorkResult(True), 1.0) is None    # settled once


def test_bug_the_allocation_was_charged_before_knowing_the_block_exists() -> None:
    """Prototype bug: the whole allocation was subtracted before running, even when the plugin
    did not exist, and never refunded. Here a goal that never reached its block costs nothing."""
    k = kernel()
    d = serve(k, 'hello', 0.0)
    s = k.complete(d.turn_id, WorkResult(False, started=False), 0.0)
    assert s is not None and s.charged == 0.0 and s.refunded == d.atp_grant
    assert k.ledger.level == k.ledger.capacity
    assert k.scorer.outcomes == []     # type: ignore[attr-defined]  # nothing to learn from


def test_a_goal_that_never_started_neither_lowers_trust_nor_counts_toward_a_crisis() -> None:
    k = kernel(metabolism__crisis_after_failures=2)
    for i in range(3):                      # e.g. the block's action server is not reachable
        d = serve(k, f'hello {i}', float(i))
        s = k.complete(d.turn_id, WorkResult(False, started=False), float(i) + 0.1)
        assert s is not None and s.trust == k.config.trust.prior
    k.cycle(3.0)
    assert k.state is S.WAKE and k.trust.get('language') == k.config.trust.prior


def test_token_cap_follows_a_grant_smaller_than_an_answer_needs() -> None:
    k = kernel(atp__capacity=20.0, atp__per_token=0.5, atp__answer_tokens=100)
    d = serve(k, 'hello', 0.0)
    assert d.atp_grant == pytest.approx(6.0) and d.max_new_tokens == 10


# ---- metabolic states drive the kernel -----------------------------------------------------
def test_rest_defers_low_salience_and_still_serves_salient_input() -> None:
    k = kernel({'help!': 0.8})
    drain_to(k, 25.0, 0.0)
    k.cycle(0.1)
    assert k.state is S.REST and k.snapshot(0.1).max_targets == 1
    k.observe('text', 'chat', 1.2)
    out = k.cycle(1.2)
    assert out.dispatches == () and out.deferred[0][1] == 'REST defers salience 0.30 < 0.50'
    k.observe('text', 'help!', 1.3)
    assert [d.text for d in k.cycle(1.3).dispatches] == ['help!']


def test_rest_polls_a_sensor_at_its_slower_rate() -> None:
    k = kernel({'a!': 0.8, 'b!': 0.8})
    drain_to(k, 25.0, 0.0)
    k.cycle(0.1)
    assert k.state is S.REST
    first = serve(k, 'a!', 1.2)
    k.complete(first.turn_id, WorkResult(True, 1), 1.3)
    k.observe('text', 'b!', 1.4)
    assert "serves 'text' at most every 1 s" in k.cycle(1.4).deferred[0][1]
    assert [d.text for d in k.cycle(2.3).dispatches] == ['b!']


def test_bug_a_state_with_no_targets_still_served_one() -> None:
    """Prototype bug: target selection let one above-threshold target through even when the
    state allowed none (REST had 0). Here DREAM's 0 targets means nothing is dispatched until
    something salient wakes the kernel."""
    k = kernel({'whisper': 0.25, 'hey!': 0.5}, metabolism__dream_idle_s=10.0)
    k.cycle(0.0)
    k.cycle(11.0)
    assert k.state is S.DREAM and k.snapshot(11.0).consolidation_allowed
    k.observe('radio', 'whisper', 12.0)
    out = k.cycle(12.0)
    assert out.dispatches == () and out.deferred[0][1] == 'DREAM defers salience 0.25 < 1.00'
    k.observe('text', 'hey!', 13.0)
    out = k.cycle(13.0)
    assert out.transition is not None and out.transition.target is S.WAKE
    assert [d.text for d in out.dispatches] == ['hey!', 'whisper']


def test_with_the_default_config_a_drained_kernel_rests_dreams_and_wakes() -> None:
    """Every default, circadian clock included, at noon (when REST wakes soonest and dreams
    latest): chat drains ATP into REST; once idle, REST dreams before it would wake; the dream
    runs its course and ends in WAKE. Results settle and cycles run as the node runs them."""
    reg = BlockRegistry()
    reg.update(block())
    noon = 12 * 3600.0
    k = Kernel(TableScorer(), KernelConfig(), reg, now=noon)
    now, n = noon, 0
    while k.state is S.WAKE:
        n += 1
        assert n < 100, 'chat never drained ATP'
        k.observe('text', f'chat {n}', now)
        for d in k.cycle(now).dispatches:
            k.complete(d.turn_id, WorkResult(True, completion_tokens=d.max_new_tokens), now + 0.5)
        k.cycle(now + 0.5)
        now += 1.0
    assert k.state is S.REST and k.pending == {} and k.ledger.fraction < 0.3
    while now < noon + 1000.0 and k.state is not S.WAKE:
        k.cycle(now)
        now += 1.0
    path = [(t.source, t.target) for t in k.metabolism.history]
    assert path == [(S.WAKE, S.REST), (S.REST, S.DREAM), (S.DREAM, S.WAKE)]
    rest, dream, wake = k.metabolism.history
    assert 'rested and idle' in dream.reason and dream.at - rest.at < 30.0
    assert 'dream complete' in wake.reason and wake.at - dream.at == pytest.approx(300.0, abs=1)
    assert k.ledger.level == k.ledger.capacity


def test_crisis_serves_only_the_most_salient_target() -> None:
    k = kernel({'low': 0.2, 'high': 0.9, 'mid': 0.5}, metabolism__min_dwell_s=100.0)
    drain_to(k, 8.0, 0.0)
    for text in ('low', 'high', 'mid'):           # three sources: served by salience
        k.observe(f'{text} sensor', text, 0.1)
    out = k.cycle(0.1)
    assert k.state is S.CRISIS and [d.text for d in out.dispatches] == ['high']
    assert k.snapshot(0.1).max_targets == 1
    assert sorted(p.text for p in k.pending.values()) == ['low', 'mid']
    assert k.cycle(0.6).dispatches == ()              # one at a time, even when polled again
    k.complete(out.dispatches[0].turn_id, WorkResult(True, 1), 0.7)
    assert [d.text for d in k.cycle(0.8).dispatches] == ['mid']


def test_crisis_polls_a_source_at_its_slower_rate() -> None:
    k = kernel(metabolism__min_dwell_s=100.0)
    drain_to(k, 8.0, 0.0)                           # 'text' served at 0.0
    k.observe('text', 'again', 0.1)
    out = k.cycle(0.1)
    assert k.state is S.CRISIS and "CRISIS serves 'text' at most every 0.2 s" in out.deferred[0][1]
    assert [d.text for d in k.cycle(0.3).dispatches] == ['again']


def test_entering_crisis_keeps_only_the_most_salient_running_goal() -> None:
    k = kernel({'a': 0.3, 'b': 0.5, 'c': 0.2, 'd': 0.25}, states__wake__max_targets=4,
               metabolism__crisis_after_failures=1)
    for text in ('a', 'b', 'c', 'd'):
        k.observe('text', text, 0.0)
    running = k.cycle(0.0).dispatches
    assert len(running) == 4
    k.complete(4, WorkResult(False), 0.1)               # a failure raises the crisis
    out = k.cycle(0.1)
    assert k.state is S.CRISIS and list(k.active) == [2]
    assert sorted(p.turn_id for p in out.preemptions) == [1, 3]
    assert all(p.by_turn == 2 and 'CRISIS serves 1 at once' in p.reason for p in out.preemptions)
    reasons = {p.turn_id: p.reason for p in out.preemptions}   # the kept goal's salience first
    assert reasons[1].startswith('preempted by turn 2 (salience 0.50 vs 0.30;')
    assert reasons[3].startswith('preempted by turn 2 (salience 0.50 vs 0.20;')


def test_a_state_that_serves_no_goal_cancels_all_without_naming_a_preempter() -> None:
    k = kernel({'a': 0.3}, states__crisis__max_targets=0, metabolism__crisis_after_failures=1)
    a = serve(k, 'a', 0.0)
    b = serve(k, 'b', 0.0)
    k.complete(b.turn_id, WorkResult(False), 0.1)
    out = k.cycle(0.1)
    assert k.state is S.CRISIS and k.active == {}
    (p,) = out.preemptions
    assert p.turn_id == a.turn_id and p.by_turn == 0 and 'turn 0' not in p.reason
    assert p.reason.startswith('preempted (salience 0.30; CRISIS serves 0 at once')


def test_focus_preempts_a_lower_salience_goal_that_holds_the_block() -> None:
    k = kernel({'routine': 0.3, 'FIRE!': 0.9})
    routine = serve(k, 'routine', 0.0)
    k.observe('text', 'FIRE!', 1.0)
    out = k.cycle(1.0)
    assert out.transition is not None and out.transition.target is S.FOCUS
    assert [(p.turn_id, p.by_turn) for p in out.preemptions] == [(routine.turn_id, 2)]
    assert out.preemptions[0].reason.startswith('preempted by turn 2 (salience 0.90 vs 0.30')
    assert [d.text for d in out.dispatches] == ['FIRE!']
    assert k.complete(routine.turn_id, WorkResult(True, 5), 2.0) is None   # late result ignored
    assert k.ledger.reserved == pytest.approx(out.dispatches[0].atp_grant)


@pytest.mark.parametrize('focus_spend, preempted', [(0.05, False), (0.1, True)])
def test_a_goal_is_only_preempted_if_the_claimant_then_gets_its_atp(focus_spend: float,
                                                                   preempted: bool) -> None:
    k = kernel({'routine': 0.3, 'FIRE!': 0.9}, atp__min_grant=3.0,
               states__focus__spend_fraction=focus_spend)
    drain_to(k, 50.0, 0.0)
    routine = serve(k, 'routine', 0.0)
    k.observe('text', 'FIRE!', 1.0)
    out = k.cycle(1.0)
    assert k.state is S.FOCUS
    assert [p.turn_id for p in out.preemptions] == ([routine.turn_id] if preempted else [])
    assert [d.text for d in out.dispatches] == (['FIRE!'] if preempted else [])
    if not preempted:
        assert routine.turn_id in k.active and out.deferred[0][1].startswith('ATP short')


def test_wake_does_not_preempt() -> None:
    k = kernel({'a': 0.3, 'b': 0.55}, states__wake__max_targets=1)
    serve(k, 'a', 0.0)
    k.observe('text', 'b', 1.0)
    out = k.cycle(1.0)
    assert out.preemptions == () and out.dispatches == () and k.state is S.WAKE


def test_stuck_goals_time_out_and_repeated_failures_raise_a_crisis() -> None:
    k = kernel(routing__language_deadline_s=10.0, metabolism__crisis_after_failures=3)
    for i in range(3):
        d = serve(k, f'q{i}', 20.0 * i)
        out = k.cycle(20.0 * i + 10.0)
        assert [t.turn_id for t in out.timeouts] == [d.turn_id]
        assert out.timeouts[0].charged == pytest.approx(d.atp_grant)
        assert "no result from 'language' within 10 s" in out.timeouts[0].reason
    out = k.cycle(51.0)
    assert k.state is S.CRISIS and '3 consecutive failed goals' in k.metabolism.reason
    assert k.trust.get('language') < k.config.trust.prior


def test_after_a_failure_crisis_one_more_failure_does_not_bring_it_back() -> None:
    k = kernel(metabolism__crisis_after_failures=2, metabolism__crisis_failure_hold_s=5.0)
    for i in range(2):
        d = serve(k, f'q{i}', 0.0)
        k.complete(d.turn_id, WorkResult(False), 0.1)
    k.cycle(0.2)
    assert k.state is S.CRISIS
    k.cycle(5.0)
    assert k.state is S.CRISIS                      # held for crisis_failure_hold_s
    k.cycle(5.2)
    assert k.state is S.REST and 'recovered' in k.metabolism.reason
    k.cycle(5.3)
    assert k.state is S.WAKE
    d = serve(k, 'q2', 6.0)
    k.complete(d.turn_id, WorkResult(False), 6.1)
    k.cycle(6.2)
    assert k.state is S.WAKE                        # one failure, not the third in a row
    d = serve(k, 'q3', 7.0)
    k.complete(d.turn_id, WorkResult(False), 7.1)
    k.cycle(7.2)
    assert k.state is S.CRISIS and '2 consecutive failed goals' in k.metabolism.reason


# ---- routing -------------------------------------------------------------------------------
def reasoning_kernel(**changes: Any) -> Kernel:
    def complexity(text: str) -> Complexity:
        return Complexity.COMPLEX if text.startswith('plan') else Complexity.SIMPLE
    return kernel({'plan a party': 0.55, 'plan quietly': 0.2},
                  blocks=(block(), block('reasoning', action=ACTION_REASONING,
                                         capability='reasoning')),
                  complexity=complexity, routing__reasoning_max_steps=7, **changes)


def test_complex_salient_requests_go_to_reasoning_when_atp_allows() -> None:
    k = reasoning_kernel()
    d = serve(k, 'plan a party', 0.0)
    assert (d.kind, d.block.name, d.max_steps) == (KIND_REASONING, 'reasoning', 7)
    assert d.atp_grant == pytest.approx(30.0) and d.deadline == 600.0
    assert d.atp_budget == pytest.approx(29.0)       # the grant less the run the kernel charges
    s = k.complete(d.turn_id, WorkResult(True, atp_reported=12.5, converged=True), 5.0)
    assert s is not None and s.charged == pytest.approx(13.5)   # one run + what it reported
    # A block that spends its whole budget costs exactly the grant: nothing beyond it.
    d = serve(k, 'plan a party', 6.0)
    s = k.complete(d.turn_id, WorkResult(True, atp_reported=d.atp_budget), 7.0)
    assert s is not None and s.charged == pytest.approx(d.atp_grant) and s.refunded == 0.0
    assert k.ledger.unpaid_total == 0.0


@pytest.mark.parametrize('changes, text, why', [
    ({}, 'plan quietly', 'complex but salience 0.20 < 0.40'),
    ({'routing__reasoning_min_atp': 0.5}, 'plan a party', '< 50.0 for reasoning'),
    ({'states__wake__spend_fraction': 0.05}, 'plan a party', 'share is below 10.0'),
    ({}, 'hello', 'simple'),
])
def test_otherwise_they_go_to_language_and_say_why(changes: Dict[str, Any], text: str,
                                                   why: str) -> None:
    k = reasoning_kernel(**changes)
    drain_to(k, 45.0, 0.0)
    d = serve(k, text, 1.0)
    assert d.kind == KIND_LANGUAGE and why in d.reason


def test_reasoning_needs_a_loaded_reasoning_block() -> None:
    k = kernel({'plan a party': 0.6}, blocks=(block(), block('reasoning', loaded=False,
                                                             action=ACTION_REASONING,
                                                             capability='reasoning')),
               complexity=lambda t: Complexity.COMPLEX)
    assert 'no reasoning block is loaded' in serve(k, 'plan a party', 0.0).reason


# ---- configuration and persistence ---------------------------------------------------------
def test_every_constant_is_a_documented_parameter() -> None:
    params = dict(config_params(KernelConfig()))
    assert 'atp.capacity' in params and 'states.crisis.max_targets' in params
    assert 'salience.weights.novelty' in params and 'metabolism.focus_enter' in params
    assert all(d.doc and d.default is not None for d in params.values())
    assert not params['atp.capacity'].runtime and params['metabolism.focus_enter'].runtime


@pytest.mark.parametrize('changes, message', [
    ({'nope': 1}, 'unknown kernel parameter'),
    ({'metabolism.crisis_enter': 0.5}, 'crisis_enter must be below crisis_exit'),
    ({'states.rest.recharge_per_s': 0.0}, 'could never be left'),
    ({'atp.min_grant': 0.5}, 'min_grant must pay for one run'),
    ({'states.wake.tools': ['magic']}, 'unknown tool class'),
    ({'salience.surprise_alpha': 2.0}, 'surprise_alpha'),
])
def test_bad_parameter_values_are_refused_with_a_reason(changes: Dict[str, Any],
                                                        message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config_with(KernelConfig(), changes)


def test_reconfigure_applies_new_thresholds_at_run_time() -> None:
    k = kernel({'x': 0.5})
    k.observe('text', 'x', 0.0)
    k.cycle(0.0)
    assert k.state is S.WAKE
    k.reconfigure(config_with(k.config, {'metabolism.focus_enter': 0.45}))
    k.cycle(1.0)
    assert k.state is S.FOCUS
    assert k.effect_allowed('dangerous') == (True, '')
    assert k.effect_allowed('elevated')[0] and not kernel().effect_allowed('dangerous')[0]


def test_learned_weights_and_trust_survive_a_restart(tmp_path: Path) -> None:
    store = StateStore(tmp_path / 'kernel.db')
    k = Kernel(SnarcSalience(ngram_embedder()), config(**{'salience.weight_learning_rate': 0.3}),
               store=store)
    k.blocks.update(block())
    for i in range(3):
        d = serve(k, f'a new thing number {i}', float(i))
        k.complete(d.turn_id, WorkResult(True, 4), float(i) + 0.5)
    learned = k.scorer.weights
    defaults = SnarcSalience(ngram_embedder()).weights
    assert max(abs(a - b) for a, b in zip(learned, defaults)) > 1e-3   # something was learned
    store.close()
    again = Kernel(SnarcSalience(ngram_embedder()), config(), store=StateStore(
        tmp_path / 'kernel.db'))
    assert again.scorer.weights == pytest.approx(learned)
    assert again.trust.get('language') > again.config.trust.prior


def test_the_language_block_advertises_conversation() -> None:
    desc = LanguageBlock(generator=None).describe('/sage/blocks/language', ACTION_LANGUAGE)  # type: ignore[arg-type]
    assert desc.block_type is BlockType.MONOLITHIC and 'conversation' in desc.capabilities
    reg = BlockRegistry()
    reg.update(desc)
    assert reg.find('conversation', 'text') == desc


# ---- sources, ids, concurrency, lost blocks (issue 8) --------------------------------------
def test_one_source_is_served_in_arrival_order_and_sources_by_salience() -> None:
    k = kernel({'first': 0.2, 'second': 0.45, 'other': 0.3}, blocks=(block(concurrency=1),))
    first = k.observe('console', 'first', 0.0, observation_id='c/1')
    second = k.observe('console', 'second', 0.0, observation_id='c/2')
    k.observe('mic', 'other', 0.0)
    out = k.cycle(0.0)
    # 'second' is the most salient, but it may not overtake 'first' of its own source.
    assert [(d.text, d.sensor_id, d.observation_id) for d in out.dispatches] == [
        ('other', 'mic', 'mic/3')]
    reasons = dict(out.deferred)
    assert reasons[first.turn_id] == "busy: 'language' works on 1 goal at once"
    assert reasons[second.turn_id] == (f"after turn {first.turn_id} of 'console': busy: "
                                       "'language' works on 1 goal at once")
    k.complete(out.dispatches[0].turn_id, WorkResult(True, 1), 0.1)
    (d,) = k.cycle(0.1).dispatches
    assert (d.text, d.observation_id) == ('first', 'c/1')
    k.complete(d.turn_id, WorkResult(True, 1), 0.2)
    assert [d.observation_id for d in k.cycle(0.2).dispatches] == ['c/2']


def test_no_block_gets_more_goals_than_its_concurrency_and_others_take_the_rest() -> None:
    k = kernel(blocks=(block('language', concurrency=1), block('chat', concurrency=2)),
               states__wake__max_targets=5)
    for i in range(5):
        k.observe(f'source {i}', f'hello {i}', 0.0)
    out = k.cycle(0.0)
    assert sorted(d.block.name for d in out.dispatches) == ['chat', 'chat', 'language']
    assert len(k.pending) == 2 and all('busy:' in r for _, r in out.deferred)
    assert k.cycle(0.1).dispatches == ()


def test_a_lost_block_fails_its_running_goals_at_once_without_a_crisis() -> None:
    k = kernel(blocks=(block('language'), block('reasoning', action=ACTION_REASONING,
                                                   capability='reasoning')),
               metabolism__crisis_after_failures=1)
    on_language = serve(k, 'hello', 0.0)
    level = k.ledger.level
    lost = k.block_lost('language', 'the language block stopped (no heartbeat for 2.0 s)', 1.0)
    assert [(x.turn_id, x.block_name) for x in lost] == [(on_language.turn_id, 'language')]
    assert lost[0].charged == k.config.atp.per_run and k.active == {}
    assert k.ledger.reserved == 0.0 and k.ledger.level == pytest.approx(level - 1.0, abs=0.01)
    assert k.trust.get('language') < k.config.trust.prior
    assert k.block_lost('language', 'again', 1.0) == []
    k.cycle(1.1)
    assert k.state is S.WAKE      # a dead process is not a failed answer
    assert k.complete(on_language.turn_id, WorkResult(True, 3), 1.2) is None   # too late


def test_turn_ids_start_where_the_node_says() -> None:
    reg = BlockRegistry()
    reg.update(block())
    k = Kernel(TableScorer(), config(), reg, first_turn=1_700_000_000_000_000)
    obs = k.observe('text', 'hello', 0.0)
    assert obs.turn_id == 1_700_000_000_000_000 and obs.observation_id == 'text/1700000000000000'
    assert k.observe('text', 'again', 0.0).turn_id == obs.turn_id + 1


def test_a_dropped_observation_keeps_its_id_and_says_why() -> None:
    k = kernel({'a': 0.5, 'b': 0.2}, blocks=(), max_pending=1)
    k.observe('console', 'a', 0.0, observation_id='c/1')
    k.cycle(0.0)
    k.observe('console', 'b', 0.1, observation_id='c/2')
    (dropped,) = k.cycle(0.1).expired
    assert dropped.observation_id == 'c/2' and dropped.reason.startswith(
        'dropped: 1 observations already waiting and this was the least salient (0.20)')
