"""Trust in blocks and sensors, learned from results and kept across restarts.

A result's quality combines success, latency against the goal's deadline and, for iterative
blocks, convergence. Trust moves toward each result by `alpha`, drifts back toward a prior while
nothing happens (old evidence fades), and never falls below a floor, so an untrusted block still
gets enough work to earn trust back. With a `StateStore`, trust is reloaded at start; a block's
trust is written through after every result, a sensor's (updated on every observation, where a
synchronous write per observation would cost a disk flush each) at most every
`sensor_persist_s` and on `flush`.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Set

from .params import check_ranges, tunable
from .store import StateStore

KIND_BLOCK = 'block'
KIND_SENSOR = 'sensor'
_KEY_PREFIX = 'trust/'


@dataclass(frozen=True)
class TrustParams:
    prior: float = tunable(0.5, 'Trust of a block or sensor never seen, and where idle trust '
                           'drifts', 0.0, 1.0)
    alpha: float = tunable(0.1, 'Weight of one result in trust', 0.0, 1.0)
    floor: float = tunable(0.05, 'Trust never falls below this, so a block can earn it back',
                           0.0, 1.0)
    half_life_s: float = tunable(
        86400.0, 'Half-life of the drift of idle trust back to the prior (0: no drift)', 0.0,
        1e9, unit='s')
    latency_weight: float = tunable(
        0.3, 'Share of a successful result\'s quality that depends on speed (latency / '
        'deadline)', 0.0, 1.0)
    convergence_weight: float = tunable(
        0.2, 'Share of a successful result\'s quality that depends on convergence, for blocks '
        'that report it', 0.0, 1.0)
    sensor_persist_s: float = tunable(
        30.0, 'Sensor trust (updated on every observation) is written to the state file at most '
        'this often, and at shutdown; block trust is written after every result', 0.0, 86400.0,
        unit='s')

    def __post_init__(self) -> None:
        check_ranges(self)
        if self.latency_weight + self.convergence_weight > 1.0:
            raise ValueError('latency_weight + convergence_weight must not exceed 1')


@dataclass(frozen=True)
class Result:
    """What one piece of work by a block (or one observation of a sensor) showed."""

    success: bool
    latency_s: float = 0.0
    deadline_s: float = 0.0          # 0: no deadline, latency does not count
    converged: Optional[bool] = None  # None: the block does not report convergence


@dataclass(frozen=True)
class TrustEntry:
    name: str
    kind: str
    trust: float
    outcomes: int


def quality(r: Result, p: TrustParams) -> float:
    """[0, 1]: 0 for a failure; for a success, 1 minus penalties for slowness and divergence."""
    if not r.success:
        return 0.0
    q = 1.0
    if r.deadline_s > 0 and math.isfinite(r.latency_s):
        q -= p.latency_weight * min(1.0, max(0.0, r.latency_s / r.deadline_s))
    if r.converged is False:
        q -= p.convergence_weight
    return min(1.0, max(0.0, q))


class TrustBook:
    """Trust per (kind, name), thread-safe, written through to a store if one is given."""

    def __init__(self, params: Optional[TrustParams] = None,
                 store: Optional[StateStore] = None, now: float = 0.0) -> None:
        self.params = params or TrustParams()
        self._store = store
        self._lock = threading.Lock()
        self._entries: Dict[str, Dict[str, float]] = {}   # key 'kind/name'
        self._unsaved: Set[str] = set()                   # sensor keys not yet written
        self._saved_at = now
        if store is not None:
            for key, value in store.items(_KEY_PREFIX).items():
                if isinstance(value, dict) and isinstance(value.get('trust'), (int, float)):
                    self._entries[key] = {
                        'trust': min(1.0, max(0.0, float(value['trust']))),
                        'outcomes': float(value.get('outcomes', 0)),
                        'updated': float(value.get('updated', now))}

    def set_params(self, params: TrustParams) -> None:
        with self._lock:
            self.params = params

    def _decayed(self, e: Dict[str, float], now: float) -> float:
        p = self.params
        t = e['trust']
        dt = now - e['updated']
        if p.half_life_s > 0 and dt > 0 and math.isfinite(dt):
            t = p.prior + (t - p.prior) * 0.5 ** (dt / p.half_life_s)
        return max(p.floor, t) if e['outcomes'] > 0 else t

    def get(self, name: str, kind: str = KIND_BLOCK, now: Optional[float] = None) -> float:
        with self._lock:
            e = self._entries.get(f'{kind}/{name}')
            if e is None:
                return self.params.prior
            return self._decayed(e, e['updated'] if now is None else now)

    def touch(self, name: str, kind: str, now: float) -> None:
        """Make a block or sensor known (at the prior) without a result."""
        with self._lock:
            self._entries.setdefault(f'{kind}/{name}', {'trust': self.params.prior,
                                                        'outcomes': 0.0, 'updated': now})

    def record(self, name: str, kind: str, result: Result, now: float) -> float:
        """Update from one result; returns the new trust."""
        p = self.params
        with self._lock:
            key = f'{kind}/{name}'
            e = self._entries.get(key)
            current = p.prior if e is None else self._decayed(e, now)
            outcomes = 0.0 if e is None else e['outcomes']
            new = current + p.alpha * (quality(result, p) - current)
            new = min(1.0, max(p.floor, new))
            e = self._entries[key] = {'trust': new, 'outcomes': outcomes + 1, 'updated': now}
            if self._store is not None:
                if kind == KIND_SENSOR:
                    self._unsaved.add(key)
                    self._save(now, force=False)
                else:
                    self._store.put(_KEY_PREFIX + key, e)
            return new

    def flush(self, now: float, force: bool = True) -> None:
        """Write the sensor trust not yet saved (unless `force` is False and it was saved less
        than `sensor_persist_s` ago)."""
        with self._lock:
            self._save(now, force)

    def _save(self, now: float, force: bool) -> None:
        elapsed = now - self._saved_at
        if not self._unsaved or (not force and 0.0 <= elapsed < self.params.sensor_persist_s):
            return
        if self._store is not None:
            for key in sorted(self._unsaved):
                self._store.put(_KEY_PREFIX + key, self._entries[key])
        self._unsaved.clear()
        self._saved_at = now

    def entries(self, now: float) -> List[TrustEntry]:
        with self._lock:
            items = sorted(self._entries.items())
        out = []
        for key, e in items:
            kind, _, name = key.partition('/')
            with self._lock:
                t = self._decayed(e, now)
            out.append(TrustEntry(name, kind, t, int(e['outcomes'])))
        return out
