"""ATP: the kernel's energy budget, charged for work actually done."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AtpLedger:
    """Energy that recharges with time, is reserved per dispatch and charged on completion.

    A dispatch reserves a grant; on completion the actual cost is charged and the rest of the
    grant returns, so a block that did less work than granted costs less.
    """

    capacity: float = 100.0
    recharge_per_s: float = 0.5
    level: float = 100.0
    reserved: float = 0.0
    _last_t: float | None = None

    def __post_init__(self) -> None:
        if self.capacity <= 0:
            raise ValueError('capacity must be positive')
        self.level = min(max(self.level, 0.0), self.capacity)

    def tick(self, now: float) -> None:
        """Recharge for the time since the previous tick."""
        if self._last_t is not None and now > self._last_t:
            self.level = min(self.capacity, self.level + (now - self._last_t) * self.recharge_per_s)
        self._last_t = now

    @property
    def available(self) -> float:
        return max(0.0, self.level - self.reserved)

    def reserve(self, amount: float) -> float:
        """Reserve up to `amount`; returns what was granted (possibly less, never negative)."""
        grant = min(max(amount, 0.0), self.available)
        self.reserved += grant
        return grant

    def settle(self, granted: float, spent: float) -> float:
        """Release a grant and charge what was actually spent (capped at the grant)."""
        charged = min(max(spent, 0.0), granted)
        self.reserved = max(0.0, self.reserved - granted)
        self.level = max(0.0, self.level - charged)
        return charged
