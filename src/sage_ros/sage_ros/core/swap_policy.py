"""Which resident model answers a request, and what must be evicted to load another.

Pure decisions over figures the model pool measures (memory at load, load and generation
durations): no torch, no ROS, so every rule is unit-tested with plain numbers.

Per request the policy chooses one of:
- USE: the requested role is resident;
- LOAD: load it without evicting anything (memory and `max_resident` allow it, and every resident
  model and the new one may stay resident side by side: `keep_resident`);
- SWAP: evict the least valuable resident models, then load it;
- SUBSTITUTE: answer with a resident model that is *more* capable than the one requested,
  because a swap down would cost more than it saves (hysteresis: it takes several requests in a
  row, and a minimum time since the last swap, before a bigger model is swapped out for a
  smaller one), or because the requested role does not fit in memory;
- REFUSE: the role does not fit in memory and nothing resident can stand in; the caller falls
  back to another role.

Model kinds: `max_resident` and the keep_resident sharing rule concern chat models only (a
speech, vision or embedding model loads beside them); every model counts toward the memory
budget and the free memory, so a load that does not fit evicts the least valuable models of any
kind. Only a chat model stands in for a chat model.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

GIB = float(1 << 30)
CHAT = 'chat'   # the kind `max_resident` counts (inference.KIND_CHAT)

# Weights of a resident model's value when choosing what to evict (least valuable first).
# keep_resident dominates, then capability, recency and use count.
KEEP_RESIDENT_WEIGHT = 4.0
PRIORITY_WEIGHT = 1.0
RECENCY_WEIGHT = 1.0
RECENCY_TIME_S = 300.0     # [s] a model idle this long has lost ~63 % of its recency value
USES_WEIGHT = 0.5
USES_SATURATION = 100      # uses beyond this add nothing
# A model that is running now is evicted only after its run ends (the load waits), so idle models
# of similar value go first; keep_resident still outweighs it.
RUNNING_WEIGHT = 2.0

# How much one request of each complexity counts toward swapping a bigger model out.
# A moderate request gains more from the bigger model, so it counts less; complex never counts.
STREAK_WEIGHT = {'simple': 1.0, 'moderate': 0.5, 'complex': 0.0}

# Smoothing of the measured load and generation durations (exponential moving average).
EMA_ALPHA = 0.3


def gib(n: float) -> str:
    """Bytes as GiB for messages."""
    return f'{n / GIB:.2f} GiB'


class Action(str, enum.Enum):
    USE = 'use'
    LOAD = 'load'
    SWAP = 'swap'
    SUBSTITUTE = 'substitute'
    REFUSE = 'refuse'


@dataclass(frozen=True)
class RoleInfo:
    """A configured role as the policy sees it."""

    role: str
    priority: int              # capability rank: higher = more capable
    keep_resident: bool        # may stay resident next to other keep_resident models
    need_bytes: int            # memory it takes once loaded (measured before, else estimated)
    kind: str = CHAT


@dataclass(frozen=True)
class ResidentInfo:
    """A loaded model as the policy sees it. Times are monotonic seconds."""

    role: str
    priority: int
    keep_resident: bool
    memory_bytes: int
    loaded_at: float
    last_used: float
    uses: int
    kind: str = CHAT
    running: bool = False      # a call is running it (or waiting to): evicting it means waiting


@dataclass(frozen=True)
class MemoryState:
    max_resident: int = 1
    budget_bytes: int = 0                  # 0 = no budget
    available_bytes: Optional[int] = None  # free on the device or system now; None = unknown
    reserve_bytes: int = 0                 # kept free out of `available_bytes`


@dataclass(frozen=True)
class MemoryPlan:
    fits: bool
    evict: Tuple[str, ...]     # roles to unload first, least valuable first ('' if none)
    reason: str                # why it does not fit ('' if it does)
    why: Tuple[str, ...] = ()  # per evicted role: why it must go
    for_memory: Tuple[str, ...] = ()   # the evicted roles that go for memory (budget, free)


@dataclass(frozen=True)
class PolicyConfig:
    substitute: bool = True            # a more capable resident model may answer instead of a swap
    hysteresis_requests: float = 3.0   # weighted requests in a row before swapping a model down
    min_dwell_s: float = 30.0          # [s] no swap down sooner than this after a model's load
    swap_cost_weight: float = 1.0      # weight of a swap second against a generation second saved

    def __post_init__(self) -> None:
        if self.hysteresis_requests < 0 or self.min_dwell_s < 0 or self.swap_cost_weight < 0:
            raise ValueError('policy figures must not be negative')


@dataclass(frozen=True)
class Decision:
    action: Action
    role: str                  # role that answers
    requested_role: str
    evict: Tuple[str, ...] = ()
    reason: str = ''           # in words, for the result and the log


def resident_value(r: ResidentInfo, now: float, max_priority: int) -> float:
    """How much keeping `r` resident is worth: keep_resident, capability, recency, use count,
    and whether it is running now (evicting it would wait for its run)."""
    recency = math.exp(-max(0.0, now - r.last_used) / RECENCY_TIME_S)
    uses = math.log1p(min(r.uses, USES_SATURATION)) / math.log1p(USES_SATURATION)
    priority = r.priority / max_priority if max_priority > 0 else 0.0
    return (KEEP_RESIDENT_WEIGHT * r.keep_resident + PRIORITY_WEIGHT * priority
            + RECENCY_WEIGHT * recency + USES_WEIGHT * uses + RUNNING_WEIGHT * r.running)


def plan_memory(target: RoleInfo, residents: Sequence[ResidentInfo], memory: MemoryState,
                now: float) -> MemoryPlan:
    """What to evict so `target` fits: chat models that may not share residency with a chat
    target first, then the least valuable chat models until `max_resident` allows it, then the
    least valuable models of any kind until the budget and the free memory (minus the reserve)
    allow the load. Nothing is evicted when even evicting everything would not be enough."""
    others = [r for r in residents if r.role != target.role]
    if memory.budget_bytes and target.need_bytes > memory.budget_bytes:
        return MemoryPlan(False, (), f'role {target.role!r} needs {gib(target.need_bytes)}, more '
                                     f'than the whole memory budget ({gib(memory.budget_bytes)})')
    chat_target = target.kind == CHAT
    must_go = [r for r in others if chat_target and r.kind == CHAT
               and not (target.keep_resident and r.keep_resident)]
    max_priority = max([r.priority for r in others] + [target.priority, 1])
    kept = sorted((r for r in others if r not in must_go),
                  key=lambda r: resident_value(r, now, max_priority))
    evicted: List[ResidentInfo] = list(must_go)
    why: List[str] = [f'{target.role!r} and {r.role!r} may not be resident together'
                      for r in must_go]

    def over_count() -> bool:
        return chat_target and sum(r.kind == CHAT for r in kept) + 1 > memory.max_resident

    def short_of_memory() -> str:
        used = sum(r.memory_bytes for r in kept)
        if memory.budget_bytes and used + target.need_bytes > memory.budget_bytes:
            return (f'{gib(used)} resident + {gib(target.need_bytes)} exceeds the budget of '
                    f'{gib(memory.budget_bytes)}')
        if memory.available_bytes is not None:
            free = memory.available_bytes + sum(r.memory_bytes for r in evicted) \
                - memory.reserve_bytes
            if target.need_bytes > free:
                return (f'only {gib(max(0, free))} would be free (keeping '
                        f'{gib(memory.reserve_bytes)} in reserve)')
        return ''

    while over_count():
        victim = next(r for r in kept if r.kind == CHAT)   # least valuable chat model
        kept.remove(victim)
        evicted.append(victim)
        why.append(f'max_resident is {memory.max_resident}')
    short = short_of_memory()
    for_memory: List[str] = []
    while short and kept:
        evicted.append(kept.pop(0))
        for_memory.append(evicted[-1].role)
        why.append(short)
        short = short_of_memory()
    if short:
        return MemoryPlan(False, (), f'role {target.role!r} needs {gib(target.need_bytes)} but '
                                     f'{short}')
    return MemoryPlan(True, tuple(r.role for r in evicted), '', tuple(why), tuple(for_memory))


class SwapPolicy:
    """Decides per request; remembers measured load and generation times and the current streak
    of requests that a bigger resident model answered in place of a smaller one."""

    def __init__(self, config: Optional[PolicyConfig] = None) -> None:
        self.config = config or PolicyConfig()
        self.streak = 0.0
        self.streak_role = ''                   # the role the current streak asks for
        self.load_s: Dict[str, float] = {}      # [s] per role, smoothed load duration
        self.generate_s: Dict[str, float] = {}  # [s] per role, smoothed duration of one answer

    # ---- measurements ------------------------------------------------------------------------
    @staticmethod
    def _smooth(table: Dict[str, float], role: str, value: float) -> None:
        old = table.get(role)
        table[role] = value if old is None else old + EMA_ALPHA * (value - old)

    def observe_load(self, role: str, duration_s: float) -> None:
        self._smooth(self.load_s, role, max(0.0, duration_s))

    def observe_generation(self, role: str, duration_s: float) -> None:
        self._smooth(self.generate_s, role, max(0.0, duration_s))

    def forget(self, role: str) -> None:
        """The role's model changed: its measured figures no longer apply."""
        self.load_s.pop(role, None)
        self.generate_s.pop(role, None)

    # ---- decision ----------------------------------------------------------------------------
    def decide(self, requested: RoleInfo, residents: Sequence[ResidentInfo], memory: MemoryState,
               now: float, complexity: Optional[str] = None) -> Decision:
        by_role = {r.role: r for r in residents}
        if requested.role in by_role:
            self.streak = 0.0
            return Decision(Action.USE, requested.role, requested.role)
        plan = plan_memory(requested, residents, memory, now)
        if plan.fits and not plan.evict:
            self.streak = 0.0
            beside = ', '.join(sorted(by_role))
            return Decision(Action.LOAD, requested.role, requested.role, (),
                            f'loaded beside {beside}' if beside else 'nothing was resident')
        stand_in = self._stand_in(requested, residents)
        if not plan.fits:
            if stand_in is not None:
                return Decision(Action.SUBSTITUTE, stand_in.role, requested.role, (),
                                f'{plan.reason}; answered with resident {stand_in.role!r}')
            return Decision(Action.REFUSE, requested.role, requested.role, (), plan.reason)
        if stand_in is not None and complexity != 'complex':
            if self.streak_role != requested.role:   # a streak counts requests for one role
                self.streak, self.streak_role = 0.0, requested.role
            self.streak += STREAK_WEIGHT.get(complexity or 'simple', 1.0)
            why_keep = self._reason_to_keep(requested, stand_in, now)
            if why_keep:
                return Decision(Action.SUBSTITUTE, stand_in.role, requested.role, (), why_keep)
        self.streak = 0.0
        return Decision(Action.SWAP, requested.role, requested.role, plan.evict,
                        f'evicting {", ".join(plan.evict)}')

    def _stand_in(self, requested: RoleInfo, residents: Sequence[ResidentInfo]
                  ) -> Optional[ResidentInfo]:
        """The least capable resident model that is more capable than the one requested."""
        if not self.config.substitute or requested.kind != CHAT:
            return None
        better = [r for r in residents if r.kind == CHAT and r.priority > requested.priority]
        if not better:
            return None
        return min(better, key=lambda r: (r.priority, -r.last_used))

    def _reason_to_keep(self, requested: RoleInfo, resident: ResidentInfo, now: float) -> str:
        """Why `resident` should answer instead of swapping down to `requested` ('' = swap)."""
        cfg = self.config
        age = now - resident.loaded_at
        if age < cfg.min_dwell_s:
            return (f'kept {resident.role!r} loaded {age:.0f} s ago (no swap down within '
                    f'{cfg.min_dwell_s:.0f} s)')
        if self.streak < cfg.hysteresis_requests:
            return (f'kept {resident.role!r}: {self.streak:g} of {cfg.hysteresis_requests:g} '
                    f'requests in a row before swapping down to {requested.role!r}')
        there, back = self.load_s.get(requested.role), self.load_s.get(resident.role)
        slow, fast = self.generate_s.get(resident.role), self.generate_s.get(requested.role)
        if None not in (there, back, slow, fast):
            assert there is not None and back is not None and slow is not None and fast is not None
            cost = cfg.swap_cost_weight * (there + back)
            saving = (slow - fast) * self.streak  # the streak so far predicts the requests to come
            if saving < cost:
                return (f'kept {resident.role!r}: a swap to {requested.role!r} and back costs '
                        f'~{there + back:.1f} s, saving ~{max(0.0, slow - fast):.2f} s per '
                        'request')
        return ''
