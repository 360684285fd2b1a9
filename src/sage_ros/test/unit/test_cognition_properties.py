"""Invariants of the cognition engine under any input (hypothesis): ATP stays within [0,
capacity], allocations sum to the spend pool, salience stays in [0, 1] (NaN, empty, huge), the
metabolic controller never sticks in a state its rules should leave, and the kernel as a whole
keeps its ATP and target limits whatever happens."""

from __future__ import annotations

import math
from typing import List, Tuple

from hypothesis import given, settings
from hypothesis import strategies as st

from sage_ros.core.blocks import BlockDescriptor, BlockType
from sage_ros.core.energy import AllocationRequest, AtpLedger, allocate
from sage_ros.core.kernel import ACTION_LANGUAGE, Kernel, KernelConfig, WorkResult, config_with
from sage_ros.core.metabolism import (MetabolicController, MetabolicInputs, MetabolicParams,
                                      MetabolicState)
from sage_ros.core.salience import Observation, SnarcSalience, ngram_embedder

SETTINGS = settings(max_examples=60, deadline=None)
any_float = st.floats(allow_nan=True, allow_infinity=True)
wild_float = st.one_of(any_float, st.sampled_from([0.0, -0.0, 1e308, -1e308, 1e-308, 5.0]))


def ledger_ok(ledger: AtpLedger) -> bool:
    return 0.0 <= ledger.reserved <= ledger.level + 1e-9 and ledger.level <= ledger.capacity \
        and ledger.available >= 0.0


# ---- ATP -----------------------------------------------------------------------------------
ops = st.lists(st.tuples(st.sampled_from(['recharge', 'reserve', 'settle', 'spend']), wild_float,
                         wild_float), max_size=40)


@SETTINGS
@given(capacity=st.floats(min_value=0.1, max_value=1e9), ops=ops)
def test_atp_never_negative_nor_above_capacity(capacity: float,
                                               ops: List[Tuple[str, float, float]]) -> None:
    ledger = AtpLedger(capacity)
    grants: List[float] = []
    for op, x, y in ops:
        if op == 'recharge':
            ledger.recharge(x)
        elif op == 'reserve':
            grants.append(ledger.reserve(x))
        elif op == 'settle' and grants:
            ledger.settle(grants.pop(0), y)
        elif op == 'spend':
            ledger.spend(y)
        assert ledger_ok(ledger), (op, x, y, ledger.level, ledger.reserved)
        assert all(g >= 0.0 for g in grants)


requests = st.lists(st.tuples(wild_float, wild_float, wild_float), min_size=1, max_size=8)


@SETTINGS
@given(pool=st.floats(min_value=0.0, max_value=1e9), reqs=requests,
       floor=st.floats(min_value=0.0, max_value=1.0))
def test_allocations_sum_to_the_spend_pool(pool: float, reqs: List[Tuple[float, float, float]],
                                           floor: float) -> None:
    alloc = allocate(pool, [AllocationRequest(i, s, w, t) for i, (s, w, t) in enumerate(reqs)],
                     floor)
    assert all(v >= 0.0 and math.isfinite(v) for v in alloc.values())
    assert math.isclose(sum(alloc.values()), pool, rel_tol=1e-9, abs_tol=1e-9)


@SETTINGS
@given(pool=st.floats(min_value=0.0, max_value=1e6), reqs=requests,
       caps=st.lists(st.floats(min_value=0.0, max_value=1e6), min_size=8, max_size=8))
def test_capped_allocations_sum_to_what_the_targets_can_use(
        pool: float, reqs: List[Tuple[float, float, float]], caps: List[float]) -> None:
    alloc = allocate(pool, [AllocationRequest(i, s, w, t, cap=caps[i])
                            for i, (s, w, t) in enumerate(reqs)])
    assert all(0.0 <= alloc[i] <= caps[i] + 1e-9 for i in alloc)
    expected = min(pool, sum(caps[:len(reqs)]))
    assert math.isclose(sum(alloc.values()), expected, rel_tol=1e-9, abs_tol=1e-6)


# ---- salience ------------------------------------------------------------------------------
observations = st.lists(st.tuples(
    st.sampled_from(['text', 'camera', 'mic']),
    st.one_of(st.just(''), st.text(max_size=60), st.just('A' * 5000)),
    st.lists(wild_float, max_size=6),
    st.floats(min_value=-1e3, max_value=1e3) | any_float,
    st.one_of(st.none(), wild_float)), min_size=1, max_size=12)


@SETTINGS
@given(obs=observations)
def test_salience_dimensions_stay_in_the_unit_interval(
        obs: List[Tuple[str, str, List[float], float, object]]) -> None:
    s = SnarcSalience(ngram_embedder(64))
    for sensor, text, features, t, outcome in obs:
        sc = s.score(sensor, Observation(text, tuple(features), t))
        for v in (*sc.dims(), sc.total, sc.confidence):
            assert 0.0 <= v <= 1.0, sc
        if outcome is not None:
            s.record_outcome(sensor, sc, outcome)  # type: ignore[arg-type]
        assert math.isclose(sum(s.weights), 1.0, rel_tol=1e-9)
        assert all(s.params.weight_min - 1e-9 <= w <= s.params.weight_max + 1e-9
                   for w in s.weights)


# ---- metabolic controller ------------------------------------------------------------------
inputs = st.lists(st.tuples(st.floats(min_value=0.0, max_value=1.0), st.floats(0.0, 1.0),
                            st.integers(0, 5), st.booleans(), st.floats(0.0, 50.0)),
                  max_size=40)
metabolic_params = st.builds(
    MetabolicParams, min_dwell_s=st.floats(0.0, 10.0), dream_idle_s=st.floats(0.0, 200.0),
    rest_to_dream_s=st.floats(0.0, 200.0), dream_duration_s=st.floats(0.0, 200.0),
    circadian_period_s=st.sampled_from([0.0, 100.0, 86400.0]))


@SETTINGS
@given(p=metabolic_params, history=inputs, dt=st.floats(0.05, 5.0))
def test_the_controller_never_sticks_in_a_state_its_rules_should_leave(
        p: MetabolicParams, history: List[Tuple[float, float, int, bool, float]],
        dt: float) -> None:
    c = MetabolicController(p)
    now = 0.0
    for atp, sal, load, crisis, step in history:
        now += step
        c.update(MetabolicInputs(atp, sal, load, now, 'failures' if crisis else ''))
    # Calm: full energy, nothing salient, nothing to do, no crisis. Whatever came before, the
    # controller must get back to WAKE within three dwells and the longest dream (the longest
    # way: CRISIS -> REST -> DREAM, since a rested idle REST dreams, -> WAKE).
    bound = now + 3 * p.min_dwell_s + p.dream_duration_s * (1 + p.dream_night_gain) + 3 * dt
    seen = {c.state}
    while now < bound:
        now += dt
        c.update(MetabolicInputs(1.0, 0.0, 0, now))
        seen.add(c.state)
    assert MetabolicState.WAKE in seen
    # An empty tank means CRISIS at once, from anywhere.
    c.update(MetabolicInputs(0.0, 0.0, 0, now + dt))
    assert c.state is MetabolicState.CRISIS


# ---- the kernel as a whole -----------------------------------------------------------------
kernel_ops = st.lists(st.tuples(st.sampled_from(['observe', 'cycle', 'complete', 'fail']),
                                st.sampled_from(['hello', 'FIRE!!!', 'status ok', '', 'x' * 50,
                                                 'plan the week']),
                                st.floats(0.0, 3.0), st.integers(0, 400)), max_size=40)


@SETTINGS
@given(ops=kernel_ops, capacity=st.floats(5.0, 200.0))
def test_the_kernel_keeps_atp_and_target_limits_under_any_traffic(
        ops: List[Tuple[str, str, float, int]], capacity: float) -> None:
    cfg = config_with(KernelConfig(), {'atp.capacity': capacity, 'metabolism.min_dwell_s': 0.5,
                                       'metabolism.circadian_period_s': 0.0})
    k = Kernel(SnarcSalience(ngram_embedder(64)), cfg)
    k.blocks.update(BlockDescriptor('language', BlockType.MONOLITHIC, ('conversation',),
                                    ('text',), '/sage/blocks/language', ACTION_LANGUAGE, True))
    now = 0.0
    for op, text, dt, tokens in ops:
        now += dt
        if op == 'observe':
            k.observe('text', text, now)
        elif op == 'cycle':
            out = k.cycle(now)
            if k.policy.preempt:
                assert len(k.active) <= k.policy.max_targets
            assert len(out.dispatches) <= max(k.policy.max_targets, 0)
        elif k.active:
            turn = next(iter(k.active))
            k.complete(turn, WorkResult(op == 'complete', completion_tokens=tokens), now)
        assert ledger_ok(k.ledger)
        snap = k.snapshot(now)
        assert snap.observations_total >= snap.dispatches_total
        assert snap.active_dispatches == len(k.active)
