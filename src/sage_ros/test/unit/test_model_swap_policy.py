"""Swap policy and memory planning with plain numbers: no models, no ROS."""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

from sage_ros.core.swap_policy import (GIB, Action, MemoryState, PolicyConfig, ResidentInfo,
                                       RoleInfo, SwapPolicy, plan_memory)

SMALL = RoleInfo('small', priority=0, keep_resident=False, need_bytes=int(0.3 * GIB))
LARGE = RoleInfo('large', priority=1, keep_resident=False, need_bytes=int(1.2 * GIB))
ONE = MemoryState(max_resident=1)


def resident(info: RoleInfo, loaded_at: float = 0.0, last_used: float = 0.0, uses: int = 0,
             memory: Optional[int] = None) -> ResidentInfo:
    return ResidentInfo(info.role, info.priority, info.keep_resident,
                        info.need_bytes if memory is None else memory, loaded_at, last_used, uses)


class Simulator:
    """Applies the policy's decisions to a resident set, as the pool does, and counts loads."""

    def __init__(self, policy: SwapPolicy, roles: Dict[str, RoleInfo], memory: MemoryState,
                 start: Sequence[str]) -> None:
        self.policy, self.roles, self.memory = policy, roles, memory
        self.residents = {r: resident(roles[r]) for r in start}
        self.loads = self.evictions = 0
        self.answered: List[Tuple[str, Action]] = []

    def request(self, role: str, now: float, complexity: Optional[str] = None) -> Action:
        d = self.policy.decide(self.roles[role], list(self.residents.values()), self.memory, now,
                               complexity)
        if d.action in (Action.LOAD, Action.SWAP):
            for gone in d.evict:
                del self.residents[gone]
                self.evictions += 1
            self.residents[d.role] = resident(self.roles[d.role], loaded_at=now)
            self.loads += 1
        assert d.action is not Action.REFUSE
        r = self.residents[d.role]
        self.residents[d.role] = replace(r, last_used=now, uses=r.uses + 1)
        self.answered.append((d.role, d.action))
        return d.action


def alternating(n: int = 20) -> List[str]:
    return ['small' if i % 2 == 0 else 'large' for i in range(n)]


def test_alternating_requests_do_not_thrash_under_one_resident_model() -> None:
    sim = Simulator(SwapPolicy(), {'small': SMALL, 'large': LARGE}, ONE, ['small'])
    for i, role in enumerate(alternating()):
        sim.request(role, now=2.0 * i)
    assert sim.loads <= 2 and sim.evictions <= 2
    assert all(role == 'large' for role, _ in sim.answered[1:]), 'large stands in for small'
    # without stand-ins the same sequence swaps on every request after the first
    strict = Simulator(SwapPolicy(PolicyConfig(substitute=False)),
                       {'small': SMALL, 'large': LARGE}, ONE, ['small'])
    for i, role in enumerate(alternating()):
        strict.request(role, now=2.0 * i)
    assert strict.loads == 19


def test_alternating_requests_cost_no_extra_swap_when_both_fit() -> None:
    roles = {r.role: replace(r, keep_resident=True) for r in (SMALL, LARGE)}
    memory = MemoryState(max_resident=2, budget_bytes=int(2 * GIB))
    sim = Simulator(SwapPolicy(), roles, memory, ['small'])
    actions = [sim.request(role, now=2.0 * i) for i, role in enumerate(alternating())]
    assert sim.loads == 1 and sim.evictions == 0
    assert actions[1] is Action.LOAD and set(actions[2:]) == {Action.USE}
    assert sim.answered[-2:] == [('small', Action.USE), ('large', Action.USE)]


def test_swap_down_waits_for_hysteresis_and_dwell() -> None:
    policy = SwapPolicy(PolicyConfig(hysteresis_requests=3, min_dwell_s=30))
    big = [resident(LARGE, loaded_at=0.0)]
    d = policy.decide(SMALL, big, ONE, now=10.0)
    assert d.action is Action.SUBSTITUTE and d.role == 'large' and 'loaded 10 s ago' in d.reason
    assert policy.decide(SMALL, big, ONE, now=20.0).action is Action.SUBSTITUTE
    d = policy.decide(SMALL, big, ONE, now=40.0)  # third in a row, dwell time over
    assert d.action is Action.SWAP and d.role == 'small' and d.evict == ('large',)
    assert policy.streak == 0


def test_requests_count_toward_a_swap_down_by_complexity() -> None:
    policy = SwapPolicy(PolicyConfig(hysteresis_requests=2, min_dwell_s=0))
    big = [resident(LARGE)]
    d = policy.decide(SMALL, big, ONE, now=100.0, complexity='moderate')
    assert d.action is Action.SUBSTITUTE and '0.5 of 2' in d.reason
    assert policy.decide(SMALL, big, ONE, 101.0, 'moderate').action is Action.SUBSTITUTE
    assert policy.decide(SMALL, big, ONE, 102.0, 'moderate').action is Action.SUBSTITUTE
    assert policy.decide(SMALL, big, ONE, 103.0, 'moderate').action is Action.SWAP
    # the resident model's own role resets the streak; a complex request is never stood in for
    assert policy.decide(LARGE, big, ONE, 104.0).action is Action.USE
    assert policy.decide(SMALL, big, ONE, 105.0, 'complex').action is Action.SWAP


def test_a_streak_counts_requests_for_one_role_only() -> None:
    """With three roles, requests for two different smaller roles must not add up to a swap."""
    tiny = RoleInfo('tiny', priority=0, keep_resident=False, need_bytes=int(0.1 * GIB))
    mid = replace(SMALL, priority=1)
    big = [resident(replace(LARGE, priority=2))]
    policy = SwapPolicy(PolicyConfig(hysteresis_requests=2, min_dwell_s=0))
    assert policy.decide(tiny, big, ONE, 100.0).action is Action.SUBSTITUTE
    assert policy.decide(mid, big, ONE, 101.0).action is Action.SUBSTITUTE   # a new streak
    assert policy.decide(tiny, big, ONE, 102.0).action is Action.SUBSTITUTE   # and again
    assert policy.decide(tiny, big, ONE, 103.0).action is Action.SWAP         # 2 in a row


def test_measured_swap_cost_keeps_the_resident_model_when_a_swap_would_not_pay() -> None:
    policy = SwapPolicy(PolicyConfig(hysteresis_requests=3, min_dwell_s=0))
    policy.observe_load('small', 2.0)
    policy.observe_load('large', 20.0)
    policy.observe_generation('large', 1.0)
    policy.observe_generation('small', 0.5)
    big = [resident(LARGE)]
    for t in range(5):
        d = policy.decide(SMALL, big, ONE, now=100.0 + t)
        assert d.action is Action.SUBSTITUTE
    assert 'costs ~22.0 s' in d.reason and 'saving ~0.50 s per request' in d.reason
    policy.observe_generation('large', 30.0)  # the big model turns out slow: now a swap pays
    assert policy.decide(SMALL, big, ONE, now=200.0).action is Action.SWAP


def test_an_upgrade_always_swaps_and_a_role_that_cannot_fit_is_stood_in_for_or_refused() -> None:
    policy = SwapPolicy()
    small_resident = [resident(SMALL)]
    d = policy.decide(LARGE, small_resident, ONE, now=1.0)
    assert d.action is Action.SWAP and d.evict == ('small',)
    tight = MemoryState(max_resident=1, budget_bytes=int(1.0 * GIB))
    d = policy.decide(LARGE, small_resident, tight, now=1.0)
    assert d.action is Action.REFUSE and 'more than the whole memory budget' in d.reason
    huge_small = replace(SMALL, need_bytes=int(2 * GIB))
    d = policy.decide(huge_small, [resident(LARGE)], tight, now=1.0)
    assert d.action is Action.SUBSTITUTE and d.role == 'large' and 'budget' in d.reason


def test_plan_evicts_the_least_valuable_model_first() -> None:
    keep = MemoryState(max_resident=2)
    gib = int(GIB)
    a = ResidentInfo('a', 0, True, gib, loaded_at=0, last_used=0, uses=0)        # idle, unused
    b = ResidentInfo('b', 0, True, gib, loaded_at=0, last_used=990, uses=50)     # busy, recent
    target = RoleInfo('c', 0, True, gib)
    assert plan_memory(target, [a, b], keep, now=1000).evict == ('a',)
    assert plan_memory(target, [replace(a, last_used=999, uses=60), b], keep, 1000).evict == ('b',)
    # keep_resident outweighs recency; a model that may not share residency always goes
    c = replace(b, role='c2', keep_resident=False, last_used=1000, uses=99)
    plan = plan_memory(target, [a, c], MemoryState(max_resident=3), now=1000)
    assert plan.fits and plan.evict == ('c2',)
    # a target that may not share residency evicts everything
    alone = replace(target, keep_resident=False)
    assert set(plan_memory(alone, [a, b], MemoryState(max_resident=9), 1000).evict) == {'a', 'b'}


def test_plan_respects_budget_and_free_memory_and_evicts_nothing_when_it_cannot_fit() -> None:
    a = ResidentInfo('a', 0, True, 3 * 1 << 30, 0, 0, 0)
    b = ResidentInfo('b', 1, True, 2 * 1 << 30, 0, 900, 5)
    target = RoleInfo('t', 2, True, 4 * 1 << 30)
    plan = plan_memory(target, [a, b], MemoryState(max_resident=3, budget_bytes=8 << 30), 1000)
    assert plan.fits and plan.evict == ('a',)
    plan = plan_memory(target, [a, b], MemoryState(max_resident=3, budget_bytes=3 << 30), 1000)
    assert not plan.fits and plan.evict == ()
    assert 'more than the whole memory budget' in plan.reason
    free = MemoryState(max_resident=3, available_bytes=1 << 30, reserve_bytes=1 << 29)
    plan = plan_memory(RoleInfo('t', 2, True, 2 << 30), [a], free, 1000)
    assert plan.fits and plan.evict == ('a',)     # 1 GiB free + 3 evicted - 0.5 reserve
    plan = plan_memory(RoleInfo('t', 2, True, 4 << 30), [a], free, 1000)
    assert not plan.fits and plan.evict == () and 'only 3.50 GiB would be free' in plan.reason


def test_policy_figures_are_validated() -> None:
    with pytest.raises(ValueError, match='must not be negative'):
        PolicyConfig(min_dwell_s=-1)
