"""Which models are resident: load with progress within the memory budget (evicting by
`swap_policy`), unload, measured memory, the pool's locks, and persistence of swap records.

Concurrency. Two levels of locks, always taken in this order:
1. the residency lock (`_lock`, re-entrant): decisions, loads, unloads and evictions, one at a
   time;
2. each resident model's run lock (`LoadedModel.run_lock`): one run (generation, inference) of
   that model at a time. Runs of DIFFERENT models proceed side by side.
A call picks (and if need be loads) its model under the residency lock, marks itself a user of
it (`LoadedModel.users`, under the small `_state` condition, taken last and never held while
waiting for anything else), releases the residency lock, and only then waits for the model's run
lock and runs. A run never takes the residency lock, so a thread waiting under it for a run to
end always sees that run end. An `infer` on a model that is resident takes the fast path: it
becomes a user under `_state` alone, without waiting for a load of another model in progress.

Eviction never pulls a model out from under a run: unloading a model first marks it `evicting`
(no new users), then waits until its users are gone (still holding the residency lock, so other
decisions and loads wait too; runs already started go on). The eviction plan prefers idle models
(`swap_policy.RUNNING_WEIGHT`), so a load waits for a run only when memory leaves no other choice;
it says so through `note_listeners` ("waiting for role 'large' to finish ...").
Do not call the pool from inside a run's own callbacks (`on_text`) in a way that loads or
unloads: that thread is a user of its model, and an eviction of that model would wait for it."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from collections import OrderedDict, deque
from contextlib import contextmanager
from typing import Callable, Deque, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from ..context import DEFAULT_MEMORY_SHARE, SummaryCache
from ..inference import KIND_CHAT, Runner
from ..store import StateStore
from ..swap_policy import (Decision, MemoryState, ResidentInfo, RoleInfo, SwapPolicy, gib,
                           plan_memory)
from .events import LoadedModel, LoadProgress, ProgressFn, SwapEvent
from .loader import load_model, preread
from .memory import available_memory, pin_malloc_mmap_threshold, release_memory
from .registry import RunnerRegistry
from .specs import Cancelled, LoadError, ModelError, ModelSpec, OverBudget, StopFn, UnknownRole, \
    WeightInfo

SWAP_STREAM = 'model_manager/swaps'          # StateStore log of swap records
SWAP_COUNT_KEY = 'model_manager/swap_count'  # StateStore counter, continues across restarts
MEASURED_KEY = 'model_manager/measured'      # StateStore: measured memory per model entry


class Residency:
    """The resident half of `ModelPool` (which adds generation, inference and fallback).

    The residency lock serialises decisions, loads, unloads and evictions; each model's run lock
    serialises its runs (see the module's docstring). Waiting for either lock is cancellable
    (`should_stop`); a swap never pulls a model out from under a running generation."""

    def __init__(self, specs: Mapping[str, ModelSpec], default_role: str,
                 max_resident: int = 1, *, memory_budget_bytes: int = 0,
                 memory_reserve_bytes: int = 0, policy: Optional[SwapPolicy] = None,
                 preread_weights: bool = True, preread_chunk_bytes: int = 16 << 20,
                 retry_failed_s: float = 60.0, history_limit: int = 50,
                 store: Optional[StateStore] = None,
                 malloc_mmap_threshold: int = 128 << 10, summary_tokens: int = 96,
                 runners: Optional[Mapping[str, Runner]] = None) -> None:
        if default_role not in specs:
            raise UnknownRole(f'default role {default_role!r} is not among the configured roles '
                              f'{sorted(specs)}')
        if max_resident < 1:
            raise ValueError('max_resident must be at least 1')
        if memory_budget_bytes < 0 or memory_reserve_bytes < 0 or preread_chunk_bytes < 1:
            raise ValueError('memory figures and the read chunk must not be negative')
        if malloc_mmap_threshold > 0:
            pin_malloc_mmap_threshold(malloc_mmap_threshold)
        self.specs: Dict[str, ModelSpec] = dict(specs)
        self.default_role = default_role
        self.max_resident = max_resident       # chat models resident at once
        self.memory_budget_bytes = memory_budget_bytes   # every kind counts
        self.memory_reserve_bytes = memory_reserve_bytes
        self.policy = policy or SwapPolicy()
        self.preread_weights = preread_weights
        self.preread_chunk_bytes = preread_chunk_bytes
        self.retry_failed_s = retry_failed_s
        self.store = store
        self.summary_tokens = summary_tokens   # 0 = extractive summaries only
        self.memory_share = DEFAULT_MEMORY_SHARE   # of the window for preamble + memories
        self._summaries = SummaryCache()
        self._summary_lock = threading.Lock()   # the cache is shared by every chat model
        # Insertion order = least recently used first. Changed under the residency lock; a fast
        # path user moves its entry to the end under `_state` (move_to_end is atomic).
        self._loaded: 'OrderedDict[str, LoadedModel]' = OrderedDict()
        self._lock = threading.RLock()        # residency: decisions, loads, unloads, evictions
        self._state = threading.Condition()   # users of each model, the busy count (taken last)
        self._busy_depth = 0
        self.loading_role = ''
        self.history: Deque[SwapEvent] = deque(maxlen=max(1, history_limit))
        self.swap_count = 0
        self.errors: 'OrderedDict[str, str]' = OrderedDict()  # role -> load error, newest last
        self._failures: Dict[str, Tuple[str, str, float]] = {}  # role -> (key, error, monotonic)
        self._measured: Dict[str, int] = {}  # spec key -> measured memory bytes
        self.listeners: List[Callable[[], None]] = []  # called after any change of state
        self.progress_listeners: List[ProgressFn] = []  # called at every step of every load
        # Called with (level 'info' | 'warning', text) for what a load did that the log should
        # say: an adapter applied or not (and why), a model evicted for memory.
        self.note_listeners: List[Callable[[str, str], None]] = []
        self.runners = RunnerRegistry(self._note, runners)
        if store is not None:
            self._restore(store)

    # ---- persistence -------------------------------------------------------------------------
    def _restore(self, store: StateStore) -> None:
        """Swap count, recent history and measured memory from a previous run."""
        self.swap_count = int(store.get(SWAP_COUNT_KEY, 0) or 0)
        measured = store.get(MEASURED_KEY, {}) or {}
        self._measured = {str(k): int(v) for k, v in measured.items()}
        keys = {s.role: s.key for s in self.specs.values()}
        for raw in reversed(store.recent(SWAP_STREAM, self.history.maxlen or 50)):
            try:
                event = SwapEvent.from_dict(raw)
            except (TypeError, ValueError):
                continue  # a record from an incompatible version: skip it
            self.history.append(event)
            if event.succeeded and keys.get(event.to_role) == event.model_key:
                self.policy.observe_load(event.to_role, event.duration_s)

    def _record(self, event: SwapEvent) -> None:
        self.history.append(event)
        self.swap_count += 1
        if self.store is not None:
            self.store.append(SWAP_STREAM, event.to_dict(), keep=1000)
            self.store.put(SWAP_COUNT_KEY, self.swap_count)

    # ---- queries -------------------------------------------------------------------------
    @property
    def swaps(self) -> List[SwapEvent]:
        """Recent load attempts, oldest first (bounded by `history_limit`)."""
        return list(self.history)

    @property
    def busy(self) -> bool:
        return self._busy_depth > 0

    @property
    def last_error(self) -> str:
        """The newest load error of a role that has not loaded since ('' if none)."""
        return next(reversed(self.errors.values()), '')

    def loaded(self) -> List[LoadedModel]:
        return list(self._loaded.values())

    def is_loaded(self, role: str) -> bool:
        entry = self._loaded.get(role)
        return entry is not None and entry.key == self.specs[role].key

    def spec(self, role: str) -> ModelSpec:
        role = role or self.default_role
        try:
            return self.specs[role]
        except KeyError:
            raise UnknownRole(f'unknown model role {role!r}; configured roles: '
                              f'{", ".join(sorted(self.specs))}') from None

    def kind(self, role: str) -> str:
        return self.spec(role).kind

    def inspect(self, role: str) -> WeightInfo:
        """Check a role's files with its kind's runner (LoadError if missing or corrupt)."""
        spec = self.spec(role)
        return self.runners.get(spec.kind).inspect(spec)

    def memory_used(self) -> int:
        return sum(e.memory_bytes for e in self.loaded())

    def memory_available(self) -> int:
        return available_memory(self.specs[self.default_role].device)

    def estimate_need(self, role: str) -> int:
        """Memory the role will take: measured at its last load, else from its files."""
        spec = self.spec(role)
        return self._measured.get(spec.key) or self.inspect(spec.role).estimated_bytes

    def _memory_state(self, device: str) -> MemoryState:
        return MemoryState(max_resident=self.max_resident, budget_bytes=self.memory_budget_bytes,
                           available_bytes=available_memory(device),
                           reserve_bytes=self.memory_reserve_bytes)

    def _residents(self) -> List[ResidentInfo]:
        return [ResidentInfo(e.spec.role, e.spec.priority, e.spec.keep_resident, e.memory_bytes,
                             e.loaded_mono, e.last_used, e.uses, e.spec.kind, e.users > 0)
                for e in self.loaded() if e.key == self.specs[e.spec.role].key]

    def _role_info(self, spec: ModelSpec, need: int) -> RoleInfo:
        return RoleInfo(spec.role, spec.priority, spec.keep_resident, need, spec.kind)

    def decide(self, role: str, complexity: Optional[str] = None) -> Decision:
        """What the policy would do for a request to `role` now (updates its streak)."""
        spec = self.spec(role)
        try:
            need = self.estimate_need(spec.role)
        except LoadError:
            need = 0  # the load will fail and fall back; the decision does not need the figure
        return self.policy.decide(self._role_info(spec, need), self._residents(),
                                  self._memory_state(spec.device), time.monotonic(), complexity)

    # ---- configuration changes -----------------------------------------------------------------
    def update_specs(self, specs: Mapping[str, ModelSpec]) -> List[str]:
        """Apply changed model entries. Returns the resident roles whose weights changed (path,
        dtype, device or kind): they are reloaded by `reload` or at their next use."""
        stale = []
        for role, spec in specs.items():
            old = self.specs.get(role)
            self.specs[role] = spec
            if old is not None and old.key != spec.key:
                self.policy.forget(role)
                self._failures.pop(role, None)
                self.errors.pop(role, None)
            entry = self._loaded.get(role)
            if entry is not None:
                if entry.key == spec.key:
                    entry.spec = spec
                else:
                    stale.append(role)
        self._notify()
        return stale

    # ---- locking -------------------------------------------------------------------------------
    def _notify(self) -> None:
        for fn in list(self.listeners):
            fn()

    def _note(self, level: str, text: str) -> None:
        for fn in list(self.note_listeners):
            fn(level, text)

    @contextmanager
    def _locked(self, should_stop: Optional[StopFn]) -> Iterator[None]:
        while not self._lock.acquire(timeout=0.05):
            if should_stop is not None and should_stop():
                raise Cancelled('cancelled while waiting for another load or decision')
        try:
            yield
        finally:
            self._lock.release()

    @contextmanager
    def _busy(self) -> Iterator[None]:
        with self._state:
            self._busy_depth += 1
            first = self._busy_depth == 1
        if first:
            self._notify()
        try:
            yield
        finally:
            with self._state:
                self._busy_depth -= 1
                last = self._busy_depth == 0
            if last:
                self._notify()

    # ---- users of a model (runs) -------------------------------------------------------------
    def _use(self, entry: LoadedModel) -> None:
        """Make the caller a user of `entry` (residency lock held: it cannot be unloaded now)."""
        with self._state:
            entry.users += 1

    def _use_resident(self, role: str) -> Optional[LoadedModel]:
        """The fast path: a user of `role`'s model if it is resident, current and not being
        evicted, without the residency lock; None otherwise (take the residency path)."""
        with self._state:
            entry = self._loaded.get(role)
            if entry is None or entry.evicting or entry.key != self.specs[role].key:
                return None
            entry.users += 1
            self._loaded.move_to_end(role)
            return entry

    def _done_using(self, entry: LoadedModel) -> None:
        with self._state:
            entry.users -= 1
            self._state.notify_all()

    @contextmanager
    def _running(self, entry: LoadedModel, should_stop: Optional[StopFn]) -> Iterator[None]:
        """Hold `entry`'s run lock (the caller is already its user; its use ends here, whether
        the run happens, fails or is cancelled while waiting). Never takes the residency lock."""
        try:
            while not entry.run_lock.acquire(timeout=0.05):
                if should_stop is not None and should_stop():
                    raise Cancelled(f'cancelled while waiting for role {entry.spec.role!r} to '
                                    'finish another run')
            try:
                yield
            finally:
                entry.run_lock.release()
        finally:
            self._done_using(entry)

    def _wait_idle(self, entries: Sequence[LoadedModel], should_stop: Optional[StopFn],
                   purpose: str) -> None:
        """Mark `entries` evicting (no new users) and wait until their runs have ended
        (residency lock held). A cancel clears the marks and raises `Cancelled`."""
        with self._state:
            for e in entries:
                e.evicting = True
            running = [e.spec.role for e in entries if e.users > 0]
        if running:
            self._note('info', f'waiting for role(s) {", ".join(map(repr, running))} to finish '
                               f'running before {purpose}')
        try:
            with self._state:
                while any(e.users > 0 for e in entries):
                    if should_stop is not None and should_stop():
                        raise Cancelled(f'cancelled while waiting for role(s) '
                                        f'{", ".join(map(repr, running))} to finish running')
                    self._state.wait(0.05)
        except BaseException:
            with self._state:
                for e in entries:
                    e.evicting = False
            raise

    # ---- load / unload -------------------------------------------------------------------
    def _unload_locked(self, role: str) -> bool:
        """Unload `role` (residency lock held), after its running calls have ended."""
        current = self._loaded.get(role)
        if current is None:
            return False
        self._wait_idle([current], None, f'unloading {role!r}')
        with self._state:
            entry = self._loaded.pop(role, None)
        if entry is None:
            return False
        ref = weakref.ref(entry.model)
        entry.model = None
        entry.tokenizer = None
        del entry
        if ref() is not None:  # held in a reference cycle: only the collector frees it
            gc.collect()
        release_memory(collect=False)
        if ref() is not None:  # pragma: no cover - would be a leak in our own code
            raise ModelError(f'model of role {role!r} is still referenced after unload')
        return True

    def unload(self, role: str) -> bool:
        """Drop a role's model and give its memory back; True if it was loaded."""
        with self._lock:
            done = self._unload_locked(role)
        if done:
            self._notify()
        return done

    def unload_all(self, should_stop: Optional[StopFn] = None) -> None:
        with self._locked(should_stop):
            for role in list(self._loaded):
                self._unload_locked(role)
        self._notify()

    def _fail(self, role: str, key: str, error: str) -> None:
        self._failures[role] = (key, error, time.monotonic())
        self.errors.pop(role, None)
        self.errors[role] = error

    def load(self, role: str, reason: str = '', progress: Optional[ProgressFn] = None,
             should_stop: Optional[StopFn] = None, retry_failed: bool = False) -> LoadedModel:
        """Make `role` resident. Steps: check its files with its kind's runner and plan memory
        (refusing with `OverBudget`, before touching anything, when it cannot fit even after
        evicting every other model); read the files ahead with progress in bytes and shards
        (cancellable: the resident models are still intact); evict the models the plan names
        (saying so through `note_listeners` when they go for memory or are of another kind);
        load with the runner. A role that failed with the same entry less than `retry_failed_s`
        ago fails again at once, without a new attempt, unless `retry_failed`."""
        spec = self.spec(role)
        role = spec.role

        def report(p: LoadProgress) -> None:
            for fn in list(self.progress_listeners):
                fn(p)
            if progress is not None:
                progress(p)

        with self._locked(should_stop), self._busy():
            entry = self._loaded.get(role)
            if entry is not None and entry.key == spec.key:
                self._loaded.move_to_end(role)  # mark most recent
                return entry
            failed = self._failures.get(role)
            if failed and failed[0] == spec.key and not retry_failed \
                    and time.monotonic() - failed[2] < self.retry_failed_s:
                raise LoadError(failed[1])  # same entry, failed moments ago: not tried again
            t0 = time.monotonic()
            evicted: List[str] = []
            unload_s = read_s = 0.0
            try:
                if entry is not None:  # its entry changed since it was loaded
                    self._wait_idle([entry], should_stop, f'reloading {role!r}')
                    report(LoadProgress(role, 'unloading', 0.0))
                    self._unload_locked(role)
                    evicted.append(role)
                runner = self.runners.get(spec.kind)
                info = runner.inspect(spec)
                need = self._measured.get(spec.key) or info.estimated_bytes
                plan = plan_memory(self._role_info(spec, need), self._residents(),
                                   self._memory_state(spec.device), time.monotonic())
                if not plan.fits:
                    raise OverBudget(f'cannot load role {role!r}: {plan.reason}')
                self.loading_role = role
                self._notify()
                read_s = preread(spec, info, report, should_stop, self.preread_weights,
                                 self.preread_chunk_bytes)
                t_unload = time.monotonic()
                # Runs of the victims end first (cancellable: nothing is evicted yet).
                self._wait_idle([self._loaded[v] for v in plan.evict if v in self._loaded],
                                None if evicted else should_stop, f'loading {role!r}')
                for victim, why in zip(plan.evict, plan.why or ('',) * len(plan.evict)):
                    report(LoadProgress(role, 'unloading', 0.8, info.file_bytes,
                                        info.file_bytes, len(info.files), len(info.files)))
                    self._evict(victim, spec, why, victim in plan.for_memory)
                    evicted.append(victim)
                unload_s += time.monotonic() - t_unload
                # Once something was evicted, a cancel would leave nothing resident: the load
                # then runs to the end (cancellable before that, during the read-ahead).
                entry = load_model(runner, spec, info, report,
                                   None if evicted else should_stop, self.preread_weights)
            except BaseException as exc:
                self.loading_role = ''
                error = str(exc) or type(exc).__name__
                if isinstance(exc, LoadError):
                    self._fail(role, spec.key, error)
                self._record(SwapEvent(evicted[0] if evicted else '', role, reason,
                                       time.monotonic() - t0, False, time.time(), error,
                                       tuple(evicted), unload_s=unload_s, read_s=read_s,
                                       model_key=spec.key))
                self._notify()
                raise
            self.loading_role = ''
            self._loaded[role] = entry
            self._failures.pop(role, None)
            self.errors.pop(role, None)
            self._measured[spec.key] = entry.memory_bytes
            if self.store is not None:
                self.store.put(MEASURED_KEY, self._measured)
            duration = time.monotonic() - t0
            self.policy.observe_load(role, duration)
            self._record(SwapEvent(evicted[0] if evicted else '', role, reason, duration, True,
                                   time.time(), '', tuple(evicted), entry.memory_bytes,
                                   entry.bytes_read, unload_s, read_s, spec.key))
        self._notify()
        return entry

    def _evict(self, victim: str, target: ModelSpec, why: str, for_memory: bool) -> None:
        """Unload `victim` to make room for `target`; say so when it is not a plain chat swap."""
        gone = self._loaded.get(victim)
        self._unload_locked(victim)
        if gone is not None and (for_memory or gone.kind != KIND_CHAT
                                 or target.kind != KIND_CHAT):
            self._note('info', f'evicted role {victim!r} ({gib(gone.memory_bytes)}) to load '
                               f'{target.role!r}' + (f': {why}' if why else ''))

    def _unload_stale(self, roles: Sequence[str]) -> None:
        """Unload the models of `roles` whose entries changed (lock held)."""
        for role in roles:
            entry = self._loaded.get(role)
            if role != self.default_role and entry is not None \
                    and entry.key != self.specs[role].key:
                self._unload_locked(role)
