"""The model pool: residency (`Residency`) plus serving. `generate` answers chat requests,
`infer` serves the other kinds (speech, vision, omni, embedding); both pick the resident model
or load it (evicting by policy) under the residency lock, fall back to the entry's fallback roles
when its model cannot be used, and then run it under that model's own run lock: an embedding or
a transcription does not wait for a generation of the large model (see `residency`)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, List, Optional, Sequence, Tuple

from ..conversation import ChatTurn
from ..inference import KIND_CHAT, TASK_KINDS, InferRequest, MediaError
from ..swap_policy import Action
from .chat import Summarizer
from .events import GenerationResult, InferResult, LoadedModel, ProgressFn
from .residency import Residency
from .specs import CHAT_ROLES, LoadError, ModelError, ModelSpec, StopFn, TextFn, \
    first_line

Accept = Callable[[ModelSpec], bool]


def _same_kind(kind: str) -> Accept:
    return lambda spec: spec.kind == kind


class ModelPool(Residency):
    """Loads models by role within a memory budget, picks per request which resident model
    answers (`SwapPolicy`), falls back to other roles when one cannot be used, generates (chat
    roles) and infers (the other kinds).

    Settings (`max_resident`, `memory_budget_bytes`, `memory_reserve_bytes`, `preread_weights`,
    `preread_chunk_bytes`, `retry_failed_s`, `policy.config`) are plain attributes that may be
    changed between calls. `malloc_mmap_threshold` (bytes, 0 = leave glibc alone) is applied to
    the process once, at construction: see `pin_malloc_mmap_threshold`. `runners` replaces the
    runner of a kind (else the registry's).
    """

    def import_libraries(self) -> List[str]:
        """Import what each configured kind's runner needs (transformers, faster-whisper,
        OpenCV) now: an import holds the interpreter for seconds, and later, during a first
        transcription, it would stall every thread of the process (heartbeats included).
        Returns one problem per kind that cannot be used; its roles fail when loaded."""
        problems = []
        for kind in dict.fromkeys(spec.kind for spec in self.specs.values()):
            try:
                runner = self.runners.get(kind)
                prepare = getattr(runner, 'import_libraries', None)
                if callable(prepare):
                    prepare()
            except Exception as exc:  # noqa: BLE001 - any failure only disables the kind
                problems.append(f'kind {kind!r}: {exc}')
        return problems

    def reload(self, roles: Sequence[str], reason: str = 'configuration changed',
               should_stop: Optional[StopFn] = None) -> None:
        """Unload the stale models of `roles`; load the default role again at once if it was
        one of them (the others load at their next use)."""
        with self._locked(should_stop):
            self._unload_stale(roles)
        self._notify()
        if self.default_role in roles:  # load() replaces it and records it as evicted
            # A broken new entry must not leave nothing resident: its fallback serves instead.
            self.load_or_fall_back(self.default_role, reason=reason, should_stop=should_stop)

    def load_or_fall_back(self, role: str, reason: str = '', progress: Optional[ProgressFn] = None,
                          should_stop: Optional[StopFn] = None) -> Tuple[LoadedModel, str]:
        """`load(role)`, or else the first of its fallback roles of the same kind that loads;
        returns the model and why another role is serving ('' if `role` loaded)."""
        spec = self.spec(role)
        try:
            return self.load(spec.role, reason, progress, should_stop, retry_failed=True), ''
        except LoadError as exc:
            entry, _, _, why = self._fall_back(spec.role, exc, should_stop, _same_kind(spec.kind))
            return entry, why

    def _fall_back(self, requested: str, error: LoadError, should_stop: Optional[StopFn],
                   accept: Accept) -> Tuple[LoadedModel, bool, str, str]:
        failures = []
        for role in self.specs[requested].fallback:
            if role == requested or role not in self.specs or not accept(self.specs[role]):
                continue
            swapped = not self.is_loaded(role)
            try:
                entry = self.load(role, reason=f'fallback for role {requested}',
                                  should_stop=should_stop)
            except LoadError as exc:
                failures.append(str(exc))
                continue
            return (entry, swapped, 'fallback',
                    f'role {requested!r} unavailable ({error}); answered with {role!r}')
        if not failures:
            raise error
        raise LoadError(f'{error}; every fallback failed too: {"; ".join(failures)}') from error

    # ---- chat ----------------------------------------------------------------------------------
    def generate(self, role: str, messages: Sequence[ChatTurn], max_new_tokens: int = 0,
                 temperature: float = 0.0, on_text: Optional[TextFn] = None,
                 should_stop: Optional[StopFn] = None,
                 complexity: Optional[str] = None, preamble: str = '',
                 memory: Sequence[str] = ()) -> GenerationResult:
        """Answer `messages` for `role`: the policy picks the resident model that answers or
        swaps (`swapped`); a role that cannot be loaded falls back to its `fallback` roles.
        `requested_role`, `fallback` and `decision` in the result say what happened. The
        awakening `preamble` and recalled `memory` (best first) join the system message as far
        as `memory_share` of the serving model's window allows (`memory_used`)."""
        if not messages:
            raise ValueError('no messages to answer')
        bad = [m.role for m in messages if m.role not in CHAT_ROLES]
        if bad:
            raise ValueError(f'unknown chat role(s) {bad}; expected system, user or assistant')
        spec = self.spec(role)
        if spec.kind != KIND_CHAT:
            raise ModelError(f'role {spec.role!r} is a {spec.kind} model, not a chat model: '
                             'use infer')
        requested = spec.role
        t0 = time.monotonic()
        with self._busy():
            with self._locked(should_stop):
                entry, swapped, decision, fallback = self._serve(requested, complexity,
                                                                 should_stop)
                helper = self._summary_model(entry)
                self._use(entry)
                if helper is not None:
                    self._use(helper)
            try:
                with self._running(entry, should_stop):
                    entry.uses += 1
                    entry.last_used = time.monotonic()
                    t_generate = time.monotonic()
                    # The role's cap bounds every answer; a caller (an ATP budget) may ask for
                    # fewer.
                    cap = entry.spec.max_new_tokens
                    budget = min(max_new_tokens, cap) or cap
                    with self._summary_lock:
                        fitted = self.runners.chat.fit(
                            entry, messages, budget, self._summarizer(entry, helper, should_stop),
                            self._summaries, preamble, memory, self.memory_share)
                    result = self.runners.chat.generate(entry, fitted.messages, budget,
                                                        temperature, on_text, should_stop,
                                                        swapped, t0, fitted)
                    self.policy.observe_generation(entry.spec.role,
                                                   time.monotonic() - t_generate)
            finally:
                if helper is not None:
                    self._done_using(helper)
        return replace(result, requested_role=requested, fallback=fallback, decision=decision)

    def _serve(self, requested: str, complexity: Optional[str], should_stop: Optional[StopFn]
               ) -> Tuple[LoadedModel, bool, str, str]:
        """(model that answers, whether it was loaded now, policy action, fallback reason)."""
        decision = self.decide(requested, complexity)
        if decision.action in (Action.USE, Action.SUBSTITUTE):
            entry = self._loaded[decision.role]
            self._loaded.move_to_end(decision.role)  # most recent
            why = decision.reason if decision.action is Action.SUBSTITUTE else ''
            failed = self._failures.get(requested)
            if failed is not None and entry.spec.role != requested:
                # Say the real reason: the requested role is broken, not merely not chosen.
                why = f'role {requested!r} unavailable ({failed[1]}); answered with ' \
                      f'{entry.spec.role!r}'
            return entry, False, decision.action.value, why
        try:  # LOAD, SWAP, or REFUSE (the load then raises OverBudget with the reason)
            entry = self.load(requested, reason=f'generate request for role {requested}',
                              should_stop=should_stop)
            return entry, True, decision.action.value, ''
        except LoadError as exc:
            return self._fall_back(requested, exc, should_stop, _same_kind(KIND_CHAT))

    def _summary_model(self, serving: LoadedModel) -> Optional[LoadedModel]:
        """The least capable RESIDENT chat model, when it is not `serving` (residency lock held;
        the caller becomes its user so that it stays resident during the generation)."""
        if self.summary_tokens < 1:
            return None
        current = [e for e in self._loaded.values() if e.kind == KIND_CHAT and not e.evicting
                   and e.key == self.specs[e.spec.role].key]
        entry = min(current, key=lambda e: e.spec.priority) if current else serving
        return None if entry is serving else entry

    def _summarizer(self, serving: LoadedModel, helper: Optional[LoadedModel],
                    should_stop: Optional[StopFn]) -> Optional[Summarizer]:
        """Summaries of older turns by the least capable resident chat model (`helper`, never a
        swap for a summary), or by the serving model when `helper` is running for someone else
        (never waited for: the serving model's run lock is held); None = extractive only."""
        if self.summary_tokens < 1:
            return None
        chat = self.runners.chat

        def summarize(turns: Sequence[ChatTurn]) -> str:
            from ..context import summary_request
            entry = serving
            if helper is not None and helper.run_lock.acquire(blocking=False):
                entry = helper
            try:
                window = entry.spec.context_window
                request = summary_request(turns)
                # Keep the transcript's end (the facts are kept verbatim anyway) within the
                # window.
                keep = max(200, 2 * (window - self.summary_tokens))
                if len(request[1].content) > keep:
                    request[1] = ChatTurn('user', request[1].content[-keep:])
                result = chat.generate(entry, request, self.summary_tokens, 0.0, None,
                                       should_stop, False, time.monotonic())
                return result.text
            finally:
                if entry is not serving:
                    entry.run_lock.release()
        return summarize

    # ---- other kinds ---------------------------------------------------------------------------
    def infer(self, role: str, request: InferRequest, should_stop: Optional[StopFn] = None
              ) -> InferResult:
        """Serve one non-chat request with `role`'s model: resident, or loaded now (evicting by
        memory, said through `note_listeners` and the SwapEvent), or one of its fallback roles
        whose kind serves the task. A bad input raises MediaError, a model failure ModelError."""
        spec = self.spec(role)
        kinds = TASK_KINDS.get(request.task)
        if kinds is None:
            raise ModelError(f'unknown task {request.task!r}; expected one of '
                             f'{", ".join(TASK_KINDS)}')
        if spec.kind == KIND_CHAT:
            raise ModelError(f'role {spec.role!r} is a chat model: use generate')
        if spec.kind not in kinds:
            raise ModelError(f'role {spec.role!r} is a {spec.kind} model and cannot do task '
                             f'{request.task!r} (served by {", ".join(kinds)} models)')
        requested = spec.role
        with self._busy():
            t0 = time.monotonic()
            resident = self._use_resident(requested)   # resident: no wait for other loads
            evicted: Tuple[str, ...] = ()
            if resident is not None:
                entry, swapped, decision, fallback = resident, False, Action.USE.value, ''
            else:
                with self._locked(should_stop):
                    entry, swapped, decision, fallback = self._serve_infer(
                        requested, should_stop, lambda s: s.kind in kinds)
                    evicted = self.history[-1].evicted if swapped and self.history else ()
                    self._use(entry)
            load_s = time.monotonic() - t0 if swapped else 0.0
            with self._running(entry, should_stop):
                entry.uses += 1
                entry.last_used = time.monotonic()
                runner = self.runners.get(entry.kind)
                t_run = time.monotonic()
                try:
                    output = runner.run(entry, request, should_stop)
                except (MediaError, ModelError):  # the caller's input, a cancel, a model failure
                    raise
                except Exception as exc:
                    raise ModelError(f'role {entry.spec.role!r}: {request.task} failed: '
                                     f'{first_line(exc)}') from exc
                run_s = output.run_s or (time.monotonic() - t_run)
        return InferResult(output=output, role=entry.spec.role, requested_role=requested,
                           model_id=entry.spec.model_id, kind=entry.kind, swapped=swapped,
                           evicted=tuple(r for r in evicted if r != entry.spec.role),
                           fallback=fallback, load_s=load_s, run_s=run_s, decision=decision,
                           memory_bytes=entry.memory_bytes)

    def _serve_infer(self, requested: str, should_stop: Optional[StopFn], accept: Accept
                     ) -> Tuple[LoadedModel, bool, str, str]:
        if self.is_loaded(requested):
            self._loaded.move_to_end(requested)  # most recent
            return self._loaded[requested], False, Action.USE.value, ''
        try:
            entry = self.load(requested, reason=f'infer request for role {requested}',
                              should_stop=should_stop)
        except LoadError as exc:
            return self._fall_back(requested, exc, should_stop, accept)
        last = self.history[-1] if self.history else None
        action = Action.SWAP if last is not None and last.evicted else Action.LOAD
        return entry, True, action.value, ''

