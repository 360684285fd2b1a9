"""ATP: the kernel's energy budget, and how a spend pool is shared between targets."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Hashable, Optional, Sequence, Tuple


def _finite(x: float, default: float = 0.0) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return default
    return x if math.isfinite(x) else default


# ---- the ledger ------------------------------------------------------------------------------
class AtpLedger:
    """Energy that recharges, is reserved per dispatch and charged for the work actually done.

    Invariant (whatever the inputs, NaN included): 0 <= reserved <= level <= capacity.
    A dispatch reserves a grant; settling releases it and charges the actual cost, so a block
    that did less than granted costs less (the prototype charged the whole allocation up front
    and never refunded). A block that used more than its grant is charged the excess too, as far
    as unreserved energy allows; what could not be charged is counted in `unpaid_total`.
    """

    def __init__(self, capacity: float = 100.0, level: Optional[float] = None) -> None:
        capacity = _finite(capacity)
        if capacity <= 0:
            raise ValueError('ATP capacity must be positive and finite')
        self.capacity = capacity
        self.level = capacity if level is None else min(max(_finite(level), 0.0), capacity)
        self.reserved = 0.0
        self.charged_total = 0.0
        self.refunded_total = 0.0
        self.unpaid_total = 0.0

    @property
    def available(self) -> float:
        """Energy neither spent nor promised to a running goal."""
        return max(0.0, self.level - self.reserved)

    @property
    def fraction(self) -> float:
        return self.level / self.capacity

    def recharge(self, amount: float) -> float:
        """Add energy (negative, NaN: nothing; +inf: fill); returns what was added."""
        amount = _finite(amount, self.capacity if amount == math.inf else 0.0)
        before = self.level
        self.level = min(self.capacity, self.level + max(0.0, amount))
        return self.level - before

    def spend_pool(self, fraction: float) -> float:
        """This cycle's spend pool: a fraction of the available energy."""
        return self.available * min(1.0, max(0.0, _finite(fraction)))

    def reserve(self, amount: float) -> float:
        """Reserve up to `amount`; returns what was granted (possibly less, never negative)."""
        grant = min(max(_finite(amount), 0.0), self.available)
        self.reserved += grant
        return grant

    def settle(self, grant: float, spent: float) -> Tuple[float, float]:
        """Release a grant and charge what was spent; returns (charged, refunded)."""
        grant = min(max(_finite(grant), 0.0), self.reserved)
        spent = max(0.0, _finite(spent))
        self.reserved = max(0.0, self.reserved - grant)
        charged = min(spent, self.level - self.reserved)   # other goals' grants stay covered
        charged = max(0.0, charged)
        self.level = max(self.reserved, self.level - charged)
        refunded = max(0.0, grant - charged)
        self.charged_total += charged
        self.refunded_total += refunded
        self.unpaid_total += max(0.0, spent - charged)
        return charged, refunded

    def spend(self, amount: float) -> float:
        """Charge work that had no grant (e.g. consolidation); returns what was charged."""
        return self.settle(0.0, amount)[0]


# ---- allocation ------------------------------------------------------------------------------
@dataclass(frozen=True)
class AllocationRequest:
    """One target competing for the spend pool."""

    key: Hashable
    salience: float          # [0, 1]
    state_weight: float = 1.0
    trust: float = 1.0       # [0, 1] trust of the block (and sensor) that would do the work
    cap: float = math.inf    # [ATP] most this target can use (its need)


def allocation_weight(req: AllocationRequest, trust_floor: float) -> float:
    """salience x state weight x max(trust, floor): the floor lets an untrusted block earn trust."""
    s = min(1.0, max(0.0, _finite(req.salience)))
    w = max(0.0, _finite(req.state_weight))
    t = max(min(1.0, max(0.0, _finite(req.trust))), max(0.0, _finite(trust_floor)))
    return s * w * t


def allocate(pool: float, requests: Sequence[AllocationRequest],
             trust_floor: float = 0.05) -> Dict[Any, float]:
    """Share `pool` across requests in proportion to their weights, never above a request's cap.

    What a capped request cannot use goes to the others (water filling), so the allocations sum
    to min(pool, sum of caps). With no positive weight the pool is shared equally. Keys must be
    unique.
    """
    pool = max(0.0, _finite(pool))
    alloc: Dict[Any, float] = {r.key: 0.0 for r in requests}
    if not requests or pool <= 0.0:
        return alloc
    caps = {r.key: max(0.0, _finite(r.cap, math.inf if r.cap == math.inf else 0.0))
            for r in requests}
    weights = {r.key: allocation_weight(r, trust_floor) for r in requests}
    top = max(weights.values())
    if top <= 0.0:
        weights = {k: 1.0 for k in weights}
    else:   # relative to the largest, so sums of huge weights cannot overflow
        weights = {k: w / top for k, w in weights.items()}
    open_keys = [r.key for r in requests if caps[r.key] > 0.0]
    remaining = pool
    while open_keys and remaining > 1e-12:
        total_w = sum(weights[k] for k in open_keys)
        if total_w <= 0.0:
            shares = {k: remaining / len(open_keys) for k in open_keys}
        else:
            shares = {k: remaining * (weights[k] / total_w) for k in open_keys}
        saturated = [k for k in open_keys if alloc[k] + shares[k] >= caps[k]]
        if not saturated:
            for k in open_keys:
                alloc[k] += shares[k]
            remaining = 0.0
            break
        for k in saturated:   # fill these to their cap, then share the rest again
            remaining -= caps[k] - alloc[k]
            alloc[k] = caps[k]
        open_keys = [k for k in open_keys if k not in saturated]
    return alloc

