"""DREAM consolidation: what a session's experiences leave in long-term memory.

`consolidate` runs on the memory block's background worker while the kernel dreams (and at
start, for sessions closed without a dream). For the given sessions it:
1. facts: takes the answered turns with salience >= `min_salience` and the pinned memories, and
   extracts facts (facts.py); a turn below `min_salience` but at or above `link_min_salience`
   is only linked (merged into or updating an earlier fact, nothing new added), because a repeat
   or an update is not novel and so scores low salience. Each fact is compared (facts.decide,
   MiniLM cosine plus values and topics) with the most similar earlier facts and pins: a
   paraphrase is merged into the earlier memory
   (mentions add up, the clearer text is kept), a changed value supersedes the earlier memory
   (recall shows the new value only), anything else is a new KIND_FACT memory with the turn's
   source, person and session.
2. prune: an episode whose content is now held by a fact taken from the same turn (cosine of
   the two >= `prune_similarity`) is superseded by that fact, and repeated episodes (the same
   text) are merged, so recall does not show the same thing twice. The journal keeps every turn.
   Every fact or pin an item changes gets an importance from its salience, mentions, recency
   and pin (`importance`; recall weighs it).
3. bundle: when a closed session is complete, its kept exchanges go to
   `bundle_dir/session-<n>-<ts>.jsonl` ({prompt, answer, salience, session, turn_id} per line,
   for offline or sleep training), written to a hidden temporary file and renamed.
Then the dream is recorded (store.record_dream, one record per session) and a closed session
whose every item was processed is marked dreamed.

Each item (one turn, one pin, one episode) is one store transaction, so a dream stopped by
`should_stop` (checked between items) or by a kill leaves the store consistent; running it again
continues where it stopped and never adds a fact twice: a turn counts as done when a fact
memory points at it (or, when the store offers `kv_get`/`kv_set`, by a per-session mark written
in the same transaction). CPU is bounded by `duty_cycle` (the worker sleeps between items) and
`max_items` per pass.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from ..params import check_ranges, tunable
from ..salience import TextEmbedder
from .facts import Candidate, Decision, Fact, FactThresholds, clarity, decide, extract, parse
from .store import (KIND_EPISODE, KIND_FACT, KIND_PINNED, DreamRecord, Memory, MemoryStore,
                    Session, Turn)


STAGE_FACTS = 'facts'
STAGE_PRUNE = 'prune'
STAGE_BUNDLE = 'bundle'
STAGE_DONE = 'done'
STAGE_PARTIAL = 'partial'          # max_items reached: call again to go on
LINK_KINDS = (KIND_FACT, KIND_PINNED)


@dataclass(frozen=True)
class DreamParams:
    """Everything a dream decides with; the memory block declares them as `dream.<field>`."""

    min_salience: float = tunable(
        0.2, 'Answered turns below this salience are not consolidated (they stay episodes and '
        'in the journal)', 0.0, 1.0)
    duty_cycle: float = tunable(
        0.5, 'Largest share of one CPU core the dream uses (it sleeps between items)', 0.01,
        1.0)
    max_items: int = tunable(
        500, 'Items (turns, pins, episodes) consolidated per pass; the next pass goes on', 1,
        1_000_000, unit='items')
    candidates: int = tunable(
        8, 'Earlier facts and pins each new fact is compared with (the most similar)', 1, 100,
        unit='memories')
    same_subject_floor: float = tunable(
        FactThresholds.same_subject_floor, 'Cosine above which two facts with the same '
        'recognised subject and value are one fact', -1.0, 1.0)
    merge_similarity: float = tunable(
        FactThresholds.merge_similarity, 'Cosine above which two facts whose subject is not '
        'recognised are paraphrases (when their values agree)', -1.0, 1.0)
    merge_similarity_other_subject: float = tunable(
        FactThresholds.merge_similarity_other_subject, 'Cosine above which facts whose subjects '
        'differ by added words are paraphrases (when their values agree)', -1.0, 1.0)
    merge_similarity_two_sided: float = tunable(
        FactThresholds.merge_similarity_two_sided, 'Cosine above which facts whose subjects '
        'each have words the other lacks are paraphrases (when their values agree)', -1.0, 1.0)
    change_similarity: float = tunable(
        FactThresholds.change_similarity, 'Cosine above which a fact of unrecognised subject '
        'with other values (a number, a time, a name) updates the other', -1.0, 1.0)
    topic_merge_similarity: float = tunable(
        FactThresholds.topic_merge_similarity, 'Cosine above which two facts about the same '
        'topic (head noun phrase, same owner) with agreeing values are paraphrases, when no '
        'pattern recognised one of them', -1.0, 1.0)
    change_cue_similarity: float = tunable(
        FactThresholds.change_cue_similarity, 'Cosine above which a later fact on the same topic '
        '(or naming the same person or thing) that says it changed ("moved", "now", "sold") '
        'updates the earlier one', -1.0, 1.0)
    link_min_salience: float = tunable(
        0.0, 'Turns below min_salience but at or above this are still compared with earlier '
        'facts (a repeat is merged, a change updates; nothing new is added): a repeat or an '
        'update is not novel, so its salience is low', 0.0, 1.0)
    prune_similarity: float = tunable(
        0.6, 'Cosine of an episode and the fact taken from its turn above which the fact holds '
        'the episode (the episode is superseded by it)', -1.0, 1.0)
    clarity_margin: float = tunable(
        0.5, 'How much clearer a paraphrase must be to replace the kept text of a fact', 0.0,
        10.0)
    importance_half_life_s: float = tunable(
        7 * 86400.0, 'Recency half-life in the importance score', 1.0, 1e9, unit='s')

    def __post_init__(self) -> None:
        check_ranges(self)

    def thresholds(self) -> FactThresholds:
        return FactThresholds(same_subject_floor=self.same_subject_floor,
                              merge_similarity=self.merge_similarity,
                              merge_similarity_other_subject=self.merge_similarity_other_subject,
                              merge_similarity_two_sided=self.merge_similarity_two_sided,
                              change_similarity=self.change_similarity,
                              topic_merge_similarity=self.topic_merge_similarity,
                              change_cue_similarity=self.change_cue_similarity)


def importance(m: Memory, now: float, half_life_s: float) -> float:
    """0.35 salience + 0.35 mentions (log, 8 mentions = full) + 0.15 recency + 0.15 pinned."""
    mentions = min(1.0, math.log2(1 + max(1, m.mentions)) / math.log2(9))
    recency = 0.5 ** (max(0.0, now - m.updated) / half_life_s)
    value = 0.35 * m.salience + 0.35 * mentions + 0.15 * recency + 0.15 * float(m.pinned)
    return round(max(0.0, min(1.0, value)), 4)


class _Stopped(Exception):
    """should_stop() said so, or max_items was reached (between items)."""


@dataclass
class _Counts:
    merged: int = 0
    facts: int = 0
    updated: int = 0
    pruned: int = 0
    items: int = 0


def _embedder_of(store: MemoryStore, embedder: Optional[TextEmbedder]) -> TextEmbedder:
    if embedder is not None:
        return embedder
    embed = getattr(store, 'embed', None)
    if callable(embed):
        return embed
    # Until the store exposes its embedder: the one it was built with.
    inner = getattr(store, '_embedder', None)
    if callable(inner):
        return inner
    raise ValueError('consolidate needs an embedder (the store has none)')


class _Dreamer:
    """One pass over some sessions (the state consolidate needs between items)."""

    def __init__(self, store: MemoryStore, params: DreamParams,
                 should_stop: Callable[[], bool], on_progress: Callable[[str, float], None],
                 embed: TextEmbedder, now: float, sleep: Callable[[float], None]) -> None:
        self.store = store
        self.params = params
        self.th = params.thresholds()
        self.should_stop = should_stop
        self.on_progress = on_progress
        self.embed = embed
        self.now = now
        self.sleep = sleep
        self.counts = _Counts()
        kv_get, kv_set = getattr(store, 'kv_get', None), getattr(store, 'kv_set', None)
        self._kv_get: Optional[Callable[..., Any]] = kv_get if callable(kv_get) else None
        self._kv_set: Optional[Callable[..., Any]] = kv_set if callable(kv_set) else None

    # -- pacing -----------------------------------------------------------------------------

    def item(self, started: float) -> None:
        """After an item: sleep for the duty cycle, then stop if asked or at max_items."""
        self.counts.items += 1
        busy = time.monotonic() - started
        if self.params.duty_cycle < 1.0 and busy > 0:
            self.sleep(busy * (1.0 - self.params.duty_cycle) / self.params.duty_cycle)
        self.check()

    def check(self) -> None:
        if self.should_stop():
            raise _Stopped('interrupted')
        if self.counts.items >= self.params.max_items:
            raise _Stopped('partial')

    # -- progress marks ---------------------------------------------------------------------

    def mark(self, session: int, what: str) -> int:
        """The last item row of `what` ('turn', 'pin') done in `session` (0: none, or no kv)."""
        if self._kv_get is None:
            return 0
        return int(self._kv_get(f'dream/{session}/{what}', 0) or 0)

    def set_mark(self, session: int, what: str, value: int) -> None:
        """Inside the item's transaction, when the store has a kv table API."""
        if self._kv_set is not None:
            self._kv_set(f'dream/{session}/{what}', int(value))

    def done_turns(self, session: int) -> Set[int]:
        """Turn rows that gave a fact or a pin already (superseded ones count: merged)."""
        return {m.turn_id for kind in LINK_KINDS for m in self.store.list_memories(
            kind=kind, session=session, include_superseded=True, limit=1_000_000)
            if m.turn_id}

    def score(self, memory_id: int) -> None:
        """Importance of a memory this item changed (inside the item's transaction)."""
        m = self.store.get(memory_id)
        if m is None or m.superseded_by is not None:
            return
        value = importance(m, self.now, self.params.importance_half_life_s)
        if abs(value - m.importance) > 1e-4:
            # `now=m.updated`: scoring is not news, recall's recency must not change.
            self.store.update_memory(m.id, importance=value, now=m.updated)

    # -- facts ------------------------------------------------------------------------------

    def candidates(self, vec: np.ndarray, exclude: int = 0) -> List[Candidate]:
        hits = self.store.similar(vec, k=self.params.candidates + 1, kinds=LINK_KINDS)
        return [Candidate(h.memory.id, parse(h.memory.text), h.similarity) for h in hits
                if h.memory.id != exclude][:self.params.candidates]

    def turn(self, turn: Turn, link_only: bool = False) -> None:
        """Facts of one turn: decided outside, written inside one transaction. `link_only` (a
        turn below min_salience): only merges into and updates of earlier facts are kept."""
        found = extract(turn.text)
        if not found:
            return
        vectors = np.asarray(self.embed([f.text for f in found]), dtype=np.float32)
        plans = [(f, vectors[i], decide(f, self.candidates(vectors[i]), self.th))
                 for i, f in enumerate(found)]
        if link_only:
            plans = [p for p in plans if p[2].action in ('merge', 'update')]
        with self.store.transaction():
            for fact, vec, decision in plans:
                self._apply(turn, fact, vec, decision)
            self.set_mark(turn.session, 'turn', turn.id)

    def _add(self, turn: Turn, fact: Fact, vec: np.ndarray, kind: str = KIND_FACT) -> Memory:
        return self.store.add_memory(kind, fact.text, source=turn.source, person=fact.person,
                                     session=turn.session, turn_id=turn.id,
                                     salience=float(turn.salience), embedding=vec,
                                     now=turn.received)

    def _apply(self, turn: Turn, fact: Fact, vec: np.ndarray, decision: Decision) -> None:
        target = self.store.get(decision.target) if decision.target else None
        if target is not None and target.superseded_by is not None:
            target = None                  # changed by someone else meanwhile: add instead
        if decision.action == 'merge' and target is not None:
            new = self._add(turn, fact, vec)
            kept = parse(target.text)
            if not target.pinned and (fact.subject or not kept.subject) and \
                    clarity(fact.text) > clarity(target.text) + self.params.clarity_margin:
                self.store.update_memory(target.id, text=fact.text, embedding=vec,
                                         now=max(target.updated, turn.received))
            self.store.merge(target.id, [new.id])
            self.score(target.id)
            self.counts.merged += 1
        elif decision.action == 'update' and target is not None:
            if target.created > turn.received:
                # An older statement met a newer value: keep it as history only.
                new = self._add(turn, fact, vec)
                self.store.supersede(new.id, target.id)
                return
            new = self._add(turn, fact, vec,
                            KIND_PINNED if target.kind == KIND_PINNED else KIND_FACT)
            self.store.supersede(target.id, new.id)
            self.score(new.id)
            self.counts.updated += 1
        else:
            new = self._add(turn, fact, vec)
            self.score(new.id)
            self.counts.facts += 1

    def pin(self, pin: Memory) -> None:
        """Link a pinned memory to earlier facts: it absorbs paraphrases, replaces old values."""
        fact = parse(pin.text)
        vec = self.store.embedding(pin.id)
        if vec is None:
            vec = np.asarray(self.embed([pin.text]), dtype=np.float32)[0]
        decision = decide(fact, self.candidates(vec, exclude=pin.id), self.th)
        with self.store.transaction():
            target = self.store.get(decision.target) if decision.target else None
            current = self.store.get(pin.id)
            if target is not None and target.superseded_by is None and current is not None \
                    and current.superseded_by is None:
                if decision.action == 'merge':
                    self.store.merge(pin.id, [target.id])
                    self.counts.merged += 1
                elif decision.action == 'update':
                    if target.created <= pin.created:
                        self.store.supersede(target.id, pin.id)
                    else:
                        self.store.supersede(pin.id, target.id)
                    self.counts.updated += 1
            self.score(pin.id)
            self.set_mark(pin.session, 'pin', pin.id)

    # -- prune ------------------------------------------------------------------------------

    def prune(self, session: int) -> None:
        """Episodes held by a fact of their turn are superseded by it; repeats are merged."""
        facts_by_turn: Dict[int, List[Memory]] = {}
        for kind in LINK_KINDS:
            for m in self.store.list_memories(kind=kind, session=session,
                                              include_superseded=True, limit=1_000_000):
                if m.turn_id:
                    facts_by_turn.setdefault(m.turn_id, []).append(m)
        episodes = sorted(self.store.list_memories(kind=KIND_EPISODE, session=session,
                                                   limit=1_000_000), key=lambda m: m.id)
        by_text: Dict[str, Memory] = {}
        for episode in episodes:
            started = time.monotonic()
            key = re.sub(r'\W+', ' ', episode.text.lower()).strip()
            holder = self._holder(episode, facts_by_turn.get(episode.turn_id, []))
            with self.store.transaction():
                if holder is not None:
                    self.store.supersede(episode.id, holder)
                    self.counts.pruned += 1
                elif key and key in by_text:
                    # The same words again: one episode with the mentions of both.
                    self.store.merge(episode.id, [by_text[key].id])
                    self.counts.pruned += 1
            if holder is None and key:
                by_text[key] = episode
            self.item(started)

    def _holder(self, episode: Memory, facts: Sequence[Memory]) -> Optional[int]:
        """The live memory holding the fact taken from this episode's turn, if it holds the
        episode's content."""
        ev = self.store.embedding(episode.id)
        if ev is None:
            return None
        for f in facts:
            fv = self.store.embedding(f.id)
            if fv is None or float(np.dot(ev, fv)) < self.params.prune_similarity:
                continue
            live: Optional[Memory] = f
            hops = 0
            while live is not None and live.superseded_by is not None and hops < 100:
                live = self.store.get(live.superseded_by)
                hops += 1
            if live is not None and live.superseded_by is None:
                return live.id
        return None


def write_bundle(store: MemoryStore, session: Session, bundle_dir: Path, min_salience: float,
                 now: float) -> Tuple[str, int]:
    """The session's kept exchanges as JSONL (tmp + rename: never half a file); ('', 0) when
    it has none."""
    records = [{'prompt': t.text, 'answer': t.answer, 'salience': round(float(t.salience), 4),
                'session': session.number, 'turn_id': t.id}
               for t in store.turns(session.id, limit=1_000_000)
               if t.status == 'ok' and t.answer.strip() and t.text.strip()
               and t.salience >= min_salience]
    if not records:
        return '', 0
    bundle_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))
    path = bundle_dir / f'session-{session.number}-{stamp}.jsonl'
    tmp = bundle_dir / f'.{path.name}.{os.getpid()}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + '\n')
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return str(path), len(records)


def consolidate(store: MemoryStore, sessions: Sequence[int], params: DreamParams,
                should_stop: Callable[[], bool], on_progress: Callable[[str, float], None],
                bundle_dir: Path, now: float, *, embedder: Optional[TextEmbedder] = None,
                sleep: Callable[[float], None] = time.sleep) -> DreamRecord:
    """Consolidate `sessions` (ids); see the module doc. Returns the combined record (session:
    the last one worked on; counts summed; `interrupted` if should_stop ended it; stage 'done'
    when every session was finished, 'partial' when max_items ended the pass: call again).
    Each session worked on also gets its own record in the store. `embedder` defaults to the
    store's own."""
    embed = _embedder_of(store, embedder)
    dreamer = _Dreamer(store, params, should_stop, on_progress, embed, now, sleep)
    wall = time.monotonic()
    stage = STAGE_FACTS
    stopped = ''
    results: List[Tuple[int, _Counts, str, str]] = []     # session, counts, stage, bundle
    todo = [s for s in (store.session(int(i)) for i in dict.fromkeys(sessions)) if s is not None]
    current: Optional[Session] = None
    before = _Counts()
    try:
        dreamer.check()
        for session in todo:
            current, before = session, _Counts(**vars(dreamer.counts))
            stage = STAGE_FACTS
            _facts_stage(dreamer, session)
            stage = STAGE_PRUNE
            on_progress(stage, 0.0)
            dreamer.prune(session.id)
            bundle = ''
            closed = store.session(session.id)
            if closed is not None and closed.ended is not None:
                stage = STAGE_BUNDLE
                on_progress(stage, 0.0)
                bundle, _ = write_bundle(store, closed, bundle_dir, params.min_salience, now)
                store.mark_dreamed(session.id)
            results.append((session.id, _delta(dreamer.counts, before), STAGE_DONE, bundle))
            current = None
        stage = STAGE_DONE
        on_progress(stage, 1.0)
    except _Stopped as why:
        stopped = str(why)
    interrupted = stopped == 'interrupted'
    if current is not None:
        results.append((current.id, _delta(dreamer.counts, before),
                        stage if interrupted else STAGE_PARTIAL, ''))
    ended = now + (time.monotonic() - wall)
    for session_id, counts, session_stage, bundle in results:
        store.record_dream(DreamRecord(
            session=session_id, started=now, ended=ended,
            interrupted=interrupted and session_stage != STAGE_DONE, stage=session_stage,
            merged=counts.merged, facts=counts.facts, updated=counts.updated,
            pruned=counts.pruned, bundle_path=bundle,
            summary=_summary(counts, store.session(session_id), session_stage)))
    c = dreamer.counts
    final_stage = STAGE_DONE if not stopped else (stage if interrupted else STAGE_PARTIAL)
    bundles = [b for *_, b in results if b]
    return DreamRecord(session=results[-1][0] if results else 0, started=now, ended=ended,
                       interrupted=interrupted, stage=final_stage, merged=c.merged,
                       facts=c.facts, updated=c.updated, pruned=c.pruned,
                       bundle_path=bundles[-1] if bundles else '',
                       summary=_summary(c, None, final_stage))


def _facts_stage(dreamer: _Dreamer, session: Session) -> None:
    """Pins first (a turn's fact may then merge into a pin), then the turns, oldest first."""
    store, params = dreamer.store, dreamer.params
    pin_mark, turn_mark = dreamer.mark(session.id, 'pin'), dreamer.mark(session.id, 'turn')
    pins = sorted((m for m in store.list_memories(kind=KIND_PINNED, session=session.id,
                                                  limit=1_000_000) if m.id > pin_mark),
                  key=lambda m: m.id)
    done = dreamer.done_turns(session.id)   # includes the turns pins were made from
    floor = min(params.min_salience, params.link_min_salience)
    turns = [t for t in store.turns(session.id, limit=1_000_000)
             if t.status == 'ok' and t.salience >= floor and t.id > turn_mark
             and t.id not in done]
    total = max(1, len(pins) + len(turns))
    dreamer.on_progress(STAGE_FACTS, 0.0)
    for i, pin in enumerate(pins):
        started = time.monotonic()
        dreamer.pin(pin)
        dreamer.on_progress(STAGE_FACTS, (i + 1) / total)
        dreamer.item(started)
    for i, turn in enumerate(turns):
        started = time.monotonic()
        dreamer.turn(turn, link_only=turn.salience < params.min_salience)
        dreamer.on_progress(STAGE_FACTS, (len(pins) + i + 1) / total)
        dreamer.item(started)


def _delta(after: _Counts, before: _Counts) -> _Counts:
    return _Counts(**{k: getattr(after, k) - getattr(before, k) for k in vars(after)})


def _summary(c: _Counts, session: Optional[Session], stage: str) -> str:
    where = f'session {session.number}: ' if session is not None else ''
    return (f'{where}{c.facts} new facts, {c.merged} merged, {c.updated} updated, '
            f'{c.pruned} pruned ({stage})')


__all__ = ['DreamParams', 'consolidate', 'importance', 'write_bundle', 'STAGE_DONE',
           'STAGE_PARTIAL']
