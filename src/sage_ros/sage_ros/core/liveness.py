"""Which nodes of the graph are alive: heartbeats in, 'gone' and 'restarted' out.

Every SAGE node sends a heartbeat every `period_s`. DDS notices a killed process only when its
participant lease runs out (about 20 s with Fast DDS defaults) and never notices a hung one, so
the graph watches heartbeats instead: a node is gone after `timeout_s` without one, and a new
`instance_id` under the same name means the node restarted (its goals are lost).

Times are monotonic seconds: liveness must not follow a simulated clock. A silence is confirmed
by a second look at least `confirm_s` later before the node counts as gone: a starved process
runs its timers before the heartbeats waiting in its queue, and must not call a live node dead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

NEW, RESTARTED, BACK = 'new', 'restarted', 'back'


@dataclass(frozen=True)
class Beat:
    """One heartbeat, as received (mirrors Heartbeat.msg)."""

    node: str
    instance_id: str
    block: str = ''
    ready: bool = True
    not_ready_reason: str = ''
    goals_active: int = 0
    goals_queued: int = 0
    period_s: float = 0.5


class LivenessMonitor:
    """Latest heartbeat per node, and who stopped sending."""

    def __init__(self, timeout_s: float, confirm_s: float = 0.2) -> None:
        if not timeout_s > 0:
            raise ValueError('liveness timeout must be > 0')
        self.timeout_s = timeout_s
        self.confirm_s = confirm_s
        self._latest: Dict[str, Tuple[Beat, float]] = {}
        self._gone: Dict[str, Beat] = {}
        self._suspect: Dict[str, float] = {}    # node -> when its silence was first seen

    def beat(self, b: Beat, now: float) -> Optional[str]:
        """Record a heartbeat. Returns NEW (first seen), RESTARTED (new instance: what the old
        one was doing is lost), BACK (same instance after being declared gone) or None."""
        prev = self._latest.get(b.node)
        self._suspect.pop(b.node, None)
        was_gone = self._gone.pop(b.node, None)
        self._latest[b.node] = (b, now)
        old = prev[0] if prev is not None else was_gone
        if old is None:
            return NEW
        if old.instance_id != b.instance_id:
            return RESTARTED
        return BACK if was_gone is not None else None

    def expire(self, now: float) -> List[Beat]:
        """Nodes silent for longer than the timeout, seen so by two calls `confirm_s` apart;
        each is returned once, when it goes."""
        gone = []
        for node, (b, seen) in list(self._latest.items()):
            if now - seen <= self.timeout_s:
                continue
            first = self._suspect.setdefault(node, now)
            if now - first >= self.confirm_s:
                del self._latest[node]
                del self._suspect[node]
                self._gone[node] = b
                gone.append(b)
        return gone

    def alive(self, node: str) -> Optional[Beat]:
        """The node's latest heartbeat while it counts as alive (call `expire` first)."""
        entry = self._latest.get(node)
        return entry[0] if entry is not None else None

    def block(self, name: str) -> Optional[Beat]:
        """The latest heartbeat of a live node serving block `name`."""
        for b, _ in self._latest.values():
            if b.block == name:
                return b
        return None

    def stopped(self, node: str, instance_id: str) -> str:
        """Why that instance of `node` no longer runs ('' = it runs, or was never seen): a
        server stops the work it asked for, which nobody waits for any more."""
        latest = self._latest.get(node)
        if latest is not None:
            return 'restarted' if latest[0].instance_id != instance_id else ''
        gone = self._gone.get(node)
        if gone is None:
            return ''
        if gone.instance_id != instance_id:
            return 'restarted'
        return f'stopped (no heartbeat for {self.timeout_s:.1f} s)'

    def seen_at(self, node: str) -> float:
        """When the node's latest heartbeat arrived (-inf if it counts as gone)."""
        entry = self._latest.get(node)
        return entry[1] if entry is not None else float('-inf')
