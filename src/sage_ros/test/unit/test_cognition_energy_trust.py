"""ATP ledger and allocation, and trust (with real sqlite persistence)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from sage_ros.core.energy import AllocationRequest, AtpLedger, allocate
from sage_ros.core.params import param_docs
from sage_ros.core.store import StateStore
from sage_ros.core.trust import KIND_BLOCK, KIND_SENSOR, Result, TrustBook, TrustParams, quality


# ---- ledger --------------------------------------------------------------------------------
def test_settling_one_goal_never_spends_another_goals_grant() -> None:
    ledger = AtpLedger(capacity=10.0)
    a, b = ledger.reserve(4.0), ledger.reserve(4.0)
    charged, refunded = ledger.settle(a, spent=50.0)      # overran its grant
    assert (charged, refunded) == (6.0, 0.0)              # 2 free + its own 4; b's 4 kept
    assert ledger.level == 4.0 and ledger.reserved == 4.0 == b
    assert ledger.unpaid_total == 44.0


def test_nan_and_negative_amounts_change_nothing() -> None:
    ledger = AtpLedger(capacity=10.0, level=5.0)
    assert ledger.recharge(math.nan) == 0.0 and ledger.recharge(-3.0) == 0.0
    assert ledger.reserve(math.nan) == 0.0 and ledger.reserve(-1.0) == 0.0
    assert ledger.settle(math.nan, math.nan) == (0.0, 0.0)
    assert ledger.level == 5.0 and ledger.recharge(math.inf) == 5.0 and ledger.level == 10.0
    with pytest.raises(ValueError, match='capacity'):
        AtpLedger(capacity=0.0)


def test_spend_pool_is_a_fraction_of_what_is_not_promised() -> None:
    ledger = AtpLedger(capacity=100.0)
    ledger.reserve(60.0)
    assert ledger.spend_pool(0.5) == 20.0
    assert ledger.spend_pool(7.0) == 40.0 and ledger.spend_pool(-1.0) == 0.0


# ---- allocation ----------------------------------------------------------------------------
def test_allocation_is_proportional_to_salience_state_weight_and_trust() -> None:
    alloc = allocate(12.0, [AllocationRequest('a', 0.6), AllocationRequest('b', 0.3),
                            AllocationRequest('c', 0.3, state_weight=2.0, trust=0.5)])
    assert alloc == pytest.approx({'a': 6.0, 'b': 3.0, 'c': 3.0})


def test_the_trust_floor_lets_an_untrusted_block_earn_trust() -> None:
    alloc = allocate(10.0, [AllocationRequest('trusted', 0.5, trust=1.0),
                            AllocationRequest('new', 0.5, trust=0.0)], trust_floor=0.1)
    assert alloc['new'] > 0 and alloc['trusted'] / alloc['new'] == pytest.approx(10.0)


def test_capped_targets_pass_what_they_cannot_use_to_the_others() -> None:
    alloc = allocate(10.0, [AllocationRequest('a', 0.9, cap=2.0), AllocationRequest('b', 0.1),
                            AllocationRequest('c', 0.1)])
    assert alloc == pytest.approx({'a': 2.0, 'b': 4.0, 'c': 4.0})
    small = allocate(10.0, [AllocationRequest('a', 0.5, cap=1.0), AllocationRequest('b', 0.5,
                                                                                   cap=2.0)])
    assert small == pytest.approx({'a': 1.0, 'b': 2.0})      # sum = min(pool, sum of caps)


def test_without_any_weight_the_pool_is_shared_equally() -> None:
    alloc = allocate(9.0, [AllocationRequest(k, 0.0) for k in 'abc'])
    assert alloc == pytest.approx({'a': 3.0, 'b': 3.0, 'c': 3.0})
    assert allocate(9.0, []) == {} and allocate(math.nan, [AllocationRequest('a', 1.0)]) == {'a': 0}


def test_focus_boost_changes_the_split() -> None:
    """Prototype bug: the per-state consumption rate multiplied every target's priority alike,
    so it never changed how ATP was split. Here a state weight does."""
    plain = allocate(10.0, [AllocationRequest('top', 0.6), AllocationRequest('other', 0.4)])
    boosted = allocate(10.0, [AllocationRequest('top', 0.6, state_weight=3.0),
                              AllocationRequest('other', 0.4)])
    assert boosted['top'] > plain['top'] and sum(boosted.values()) == pytest.approx(10.0)


# ---- trust ---------------------------------------------------------------------------------
def test_quality_counts_success_latency_and_convergence() -> None:
    p = TrustParams(latency_weight=0.3, convergence_weight=0.2)
    assert quality(Result(False), p) == 0.0
    assert quality(Result(True), p) == 1.0
    assert quality(Result(True, latency_s=5.0, deadline_s=10.0), p) == pytest.approx(0.85)
    assert quality(Result(True, latency_s=50.0, deadline_s=10.0, converged=False), p) == \
        pytest.approx(0.5)


def test_trust_learns_from_results_and_never_falls_below_the_floor() -> None:
    book = TrustBook(TrustParams(prior=0.5, alpha=0.5, floor=0.2, half_life_s=0.0))
    assert book.get('language') == 0.5
    assert book.record('language', KIND_BLOCK, Result(True), 0.0) == 0.75
    for _ in range(20):
        book.record('language', KIND_BLOCK, Result(False), 0.0)
    assert book.get('language') == 0.2
    assert [(e.name, e.kind, e.outcomes) for e in book.entries(0.0)] == [('language', 'block', 21)]


def test_idle_trust_drifts_back_to_the_prior() -> None:
    book = TrustBook(TrustParams(prior=0.5, alpha=1.0, half_life_s=100.0))
    book.record('eyes', KIND_SENSOR, Result(True), now=0.0)
    assert book.get('eyes', KIND_SENSOR, now=0.0) == 1.0
    assert book.get('eyes', KIND_SENSOR, now=100.0) == pytest.approx(0.75)
    assert book.get('eyes', KIND_SENSOR, now=1e6) == pytest.approx(0.5)


def test_trust_survives_a_restart_through_the_state_store(tmp_path: Path) -> None:
    store = StateStore(tmp_path / 'kernel.db')
    book = TrustBook(TrustParams(alpha=0.5, half_life_s=0.0), store)
    book.record('language', KIND_BLOCK, Result(True), 10.0)
    book.record('text', KIND_SENSOR, Result(False), 10.0)
    book.flush(10.0)                       # what the kernel node does at shutdown
    store.close()
    again = TrustBook(TrustParams(half_life_s=0.0), StateStore(tmp_path / 'kernel.db'))
    assert again.get('language', KIND_BLOCK) == 0.75
    assert again.get('text', KIND_SENSOR) == 0.25
    assert {(e.name, e.outcomes) for e in again.entries(10.0)} == {('language', 1), ('text', 1)}


def test_sensor_trust_is_written_at_most_every_sensor_persist_s(tmp_path: Path) -> None:
    """A sensor's trust changes on every observation: writing (and fsyncing) each one would put
    a disk flush on the observation path, so it is saved lazily; block trust at once."""
    store = StateStore(tmp_path / 'kernel.db')
    book = TrustBook(TrustParams(alpha=0.5, half_life_s=0.0, sensor_persist_s=30.0), store)
    book.record('language', KIND_BLOCK, Result(True), 1.0)
    book.record('text', KIND_SENSOR, Result(False), 1.0)
    assert set(store.items('trust/')) == {'block/language'}
    book.flush(20.0, force=False)                       # not due yet
    assert set(store.items('trust/')) == {'block/language'}
    book.record('text', KIND_SENSOR, Result(False), 31.0)   # due: written with this record
    assert store.items('trust/')['sensor/text']['outcomes'] == 2
    book.record('text', KIND_SENSOR, Result(True), 32.0)
    assert store.items('trust/')['sensor/text']['outcomes'] == 2
    book.flush(32.0)                                      # forced (shutdown)
    assert store.items('trust/')['sensor/text']['outcomes'] == 3


def test_trust_parameters_are_documented_and_checked() -> None:
    assert all(d.doc for d in param_docs(TrustParams))
    with pytest.raises(ValueError, match='must not exceed 1'):
        TrustParams(latency_weight=0.7, convergence_weight=0.5)
    with pytest.raises(ValueError, match='alpha'):
        TrustParams(alpha=1.5)
