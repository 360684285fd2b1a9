"""The robot's memory: sessions, the turn journal, observations, memories and dreams in one
SQLite file (ROS-free).

Several processes open the same file at once (the kernel journals turns, the memory block
writes memories and dreams, the `sage memory` CLI reads); SQLite's WAL and busy timeout
serialise their writes and every write is committed before its method returns (synchronous=
FULL: durable against kill -9 and power loss). Within a process one lock guards the connection,
so a store may be shared by threads.

Search goes through an in-RAM vector index (core/memory/index.py) derived from the embeddings
in the file: built at the first search, then caught up before each search from the rows whose
change sequence number (`memories.changed`, set by triggers) is newer than what it has seen, so
memories written by another process are found. Every candidate is re-read from SQL with the
filters, so an index entry can never bring back a forgotten, superseded or deleted memory.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..context import extractive_summary
from ..conversation import ChatTurn
from ..salience import TextEmbedder
from .index import (HNSW_THRESHOLD, ExactIndex, VectorIndex, index_name, make_index, normalise,
                    usearch_available)
from .schema import KINDS, SCHEMA_VERSION, StoreError, connect

_log = logging.getLogger('sage_ros.memory')

RECOVERED_REASON = 'ended without shutdown (recovered at next start)'
TURN_STATUSES = ('ok', 'rejected', 'failed', 'expired', 'cancelled')
KIND_EPISODE, KIND_FACT, KIND_PINNED, KIND_NOTE, KIND_SUMMARY = KINDS


@dataclass(frozen=True)
class Session:
    """One run of the robot, from start to shutdown (or to the next start after a kill -9).
    `number` is the session's ordinal (1 = the first); in this store it equals `id`."""

    id: int
    number: int
    started: float          # [s since the epoch]
    ended: Optional[float]  # [s since the epoch]; None while open
    end_reason: str
    summary: str
    note: str               # "remember next time"
    turns: int              # journalled turns
    dreamed: bool


@dataclass(frozen=True)
class TurnRecord:
    """What the kernel journals for one observation it answered (or failed to)."""

    turn_id: int            # the kernel's turn counter
    observation_id: str
    source: str
    text: str
    answer: str
    status: str             # 'ok' | 'rejected' | 'failed' | 'expired' | 'cancelled'
    error: str
    salience: float
    role: str
    model: str
    received: float         # [s since the epoch]
    answered: float         # [s since the epoch]


@dataclass(frozen=True)
class Turn(TurnRecord):
    """A journalled turn as stored; `id` is its row (what `mark_indexed` and
    `Memory.turn_id` of an episode refer to)."""

    id: int
    session: int
    indexed: bool


@dataclass(frozen=True)
class Memory:
    """One memory. `session` is the session id (= number) it was stored in, 0 if none;
    `turn_id` the journal row (`Turn.id`) it came from, 0 if none."""

    id: int
    kind: str
    text: str
    source: str
    person: str
    session: int
    turn_id: int
    created: float          # [s since the epoch]
    updated: float          # [s since the epoch]; recency counts from here
    salience: float         # [0, 1]
    importance: float       # [0, 1]
    mentions: int
    pinned: bool
    superseded_by: Optional[int]
    forgotten: bool


@dataclass(frozen=True)
class Hit:
    memory: Memory
    score: float            # [0, 1] the weighted recall score
    similarity: float       # [-1, 1] cosine of the query and the memory


@dataclass(frozen=True)
class RecallWeights:
    """score = similarity*w_sim + recency*w_recency + salience*w_sal + importance*w_imp, with
    recency = 0.5 ** (age / half_life_s); hits below `min_similarity` are dropped."""

    similarity: float = 0.7
    recency: float = 0.1
    salience: float = 0.1
    importance: float = 0.1
    half_life_s: float = 7 * 86400.0   # [s]
    min_similarity: float = 0.2        # [-1, 1]


@dataclass(frozen=True)
class DreamRecord:
    """One consolidation (finished or interrupted) and what it changed."""

    session: int
    started: float
    ended: float
    interrupted: bool
    stage: str
    merged: int
    facts: int
    updated: int
    pruned: int
    bundle_path: str
    summary: str


_MEMORY_COLS = ('id, kind, text, source, person, session, turn_id, created, updated, salience, '
                'importance, mentions, pinned, superseded_by, forgotten')
_TURN_COLS = ('turn_id, observation_id, source, text, answer, status, error, salience, role, '
              'model, received, answered, id, session, indexed')
_SESSION_COLS = ('s.id, s.started, s.ended, s.end_reason, s.summary, s.note, s.dreamed, '
                 '(SELECT COUNT(*) FROM turns t WHERE t.session = s.id)')
_DREAM_COLS = ('session, started, ended, interrupted, stage, merged, facts, updated, pruned, '
               'bundle_path, summary')
_LIVE = 'superseded_by IS NULL AND forgotten = 0'


def _memory(row: Sequence[Any]) -> Memory:
    return Memory(id=int(row[0]), kind=str(row[1]), text=str(row[2]), source=str(row[3]),
                  person=str(row[4]), session=int(row[5]), turn_id=int(row[6]),
                  created=float(row[7]), updated=float(row[8]), salience=float(row[9]),
                  importance=float(row[10]), mentions=int(row[11]), pinned=bool(row[12]),
                  superseded_by=None if row[13] is None else int(row[13]),
                  forgotten=bool(row[14]))


def _turn(row: Sequence[Any]) -> Turn:
    return Turn(turn_id=int(row[0]), observation_id=str(row[1]), source=str(row[2]),
                text=str(row[3]), answer=str(row[4]), status=str(row[5]), error=str(row[6]),
                salience=float(row[7]), role=str(row[8]), model=str(row[9]),
                received=float(row[10]), answered=float(row[11]), id=int(row[12]),
                session=int(row[13]), indexed=bool(row[14]))


def _session(row: Sequence[Any]) -> Session:
    return Session(id=int(row[0]), number=int(row[0]), started=float(row[1]),
                   ended=None if row[2] is None else float(row[2]), end_reason=str(row[3]),
                   summary=str(row[4]), note=str(row[5]), dreamed=bool(row[6]),
                   turns=int(row[7]))


def _dream(row: Sequence[Any]) -> DreamRecord:
    return DreamRecord(session=int(row[0]), started=float(row[1]), ended=float(row[2]),
                       interrupted=bool(row[3]), stage=str(row[4]), merged=int(row[5]),
                       facts=int(row[6]), updated=int(row[7]), pruned=int(row[8]),
                       bundle_path=str(row[9]), summary=str(row[10]))


def _blob(vector: np.ndarray) -> bytes:
    return normalise(vector)[0].tobytes()


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f'unknown memory kind {kind!r} (one of {", ".join(KINDS)})')


def summarise_turns(turns: Sequence[Turn], max_chars: int = 600) -> str:
    """An extractive summary of what the user said in answered turns ('' if nothing)."""
    said = [ChatTurn('user', t.text) for t in turns if t.status == 'ok' and t.text.strip()]
    return extractive_summary(said, max_chars)


class MemoryStore:
    """Sessions, turns, observations, memories with embeddings, and dreams (see module doc).

    `embedder` embeds memory texts and queries (MiniLM in the graph: 384-d unit vectors); a store
    without one can journal, list and forget, not search. `read_only` opens without migrating
    and refuses writes (for the CLI's read commands). `index` forces 'exact' or 'hnsw'; by
    default exact, or HNSW (usearch) from `hnsw_threshold` live vectors if that is set.
    """

    def __init__(self, path: Path | str, embedder: Optional[TextEmbedder] = None,
                 read_only: bool = False, *, index: Optional[str] = None,
                 hnsw_threshold: Optional[int] = HNSW_THRESHOLD) -> None:
        if index not in (None, 'exact', 'hnsw'):
            raise ValueError(f'unknown index {index!r} (exact or hnsw)')
        self.path = Path(path)
        self.read_only = read_only
        self._embedder = embedder
        self._db, self.migration_messages = connect(self.path, read_only)
        self.schema_version = SCHEMA_VERSION
        self._lock = threading.RLock()
        self._depth = 0                          # transaction nesting
        self._index: Optional[VectorIndex] = None
        self._index_seen = -1                    # memory_gen value the index is caught up to
        self._index_pref = index
        self._hnsw_threshold = hnsw_threshold
        self._warned: set[str] = set()
        for message in self.migration_messages:
            _log.info(message)

    # -- plumbing -------------------------------------------------------------------------

    @property
    def has_embedder(self) -> bool:
        return self._embedder is not None

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            _log.warning(message)

    def _writable(self) -> None:
        if self.read_only:
            raise StoreError(f'{self.path} is open read-only')

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic unit: everything inside commits together or not at all (a dream item).
        Nests (inner blocks join the outer one). Holds the store's lock throughout, so keep it
        short; embed before entering. Searches inside see the index as of the last search
        outside a transaction, re-checked against the transaction's rows."""
        self._writable()
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self._db.execute('BEGIN IMMEDIATE')
            self._depth = 1
            try:
                yield
            except BaseException:
                self._depth = 0
                self._db.execute('ROLLBACK')
                raise
            self._depth = 0
            try:
                self._db.execute('COMMIT')
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute('ROLLBACK')
                raise

    def _query(self, sql: str, args: Sequence[Any] = ()) -> List[Tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._embedder is None:
            raise StoreError('this memory store has no embedder: it can list, not search')
        return normalise(np.asarray(self._embedder(list(texts))))

    def integrity_check(self) -> str:
        """'ok', or what sqlite's integrity check found."""
        rows = self._query('PRAGMA integrity_check')
        return '; '.join(str(r[0]) for r in rows)

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self._index = None

    def __enter__(self) -> 'MemoryStore':
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sessions -------------------------------------------------------------------------

    def session(self, session_id: int) -> Optional[Session]:
        rows = self._query(f'SELECT {_SESSION_COLS} FROM sessions s WHERE s.id = ?',
                           (session_id,))
        return _session(rows[0]) if rows else None

    def open_session(self, now: float) -> Session:
        """A new session (number = previous + 1). Call `recover` first."""
        self._writable()
        with self.transaction():
            cur = self._db.execute('INSERT INTO sessions (started) VALUES (?)', (now,))
            session_id = int(cur.lastrowid or 0)
        found = self.session(session_id)
        assert found is not None
        return found

    def recover(self, now: float) -> List[Session]:
        """Close every session left open (the process was killed): end_reason RECOVERED_REASON,
        an extractive summary of its turns, ended at its last journalled activity."""
        self._writable()
        closed: List[Session] = []
        with self.transaction():
            open_ids = [int(r[0]) for r in self._db.execute(
                'SELECT id FROM sessions WHERE ended IS NULL ORDER BY id').fetchall()]
            for session_id in open_ids:
                session = self.session(session_id)
                assert session is not None
                turns = self.turns(session_id, limit=100_000)
                last = max([session.started] + [max(t.received, t.answered) for t in turns])
                self._db.execute('UPDATE sessions SET ended = ?, end_reason = ?, summary = ? '
                                 'WHERE id = ?', (min(now, last), RECOVERED_REASON,
                                                  summarise_turns(turns), session_id))
        for session_id in open_ids:
            found = self.session(session_id)
            assert found is not None
            closed.append(found)
        return closed

    def close_session(self, session_id: int, reason: str, now: float, summary: str = '',
                      note: str = '') -> Session:
        """Close a session (idempotent: an already closed one is returned unchanged). An empty
        `summary` becomes an extractive summary of its turns."""
        self._writable()
        with self.transaction():
            session = self.session(session_id)
            if session is None:
                raise KeyError(f'no session {session_id}')
            if session.ended is not None:
                return session
            if not summary.strip():
                summary = summarise_turns(self.turns(session_id, limit=100_000))
            self._db.execute('UPDATE sessions SET ended = ?, end_reason = ?, summary = ?, '
                             'note = ? WHERE id = ?', (now, reason, summary, note, session_id))
        found = self.session(session_id)
        assert found is not None
        return found

    def current_session(self) -> Optional[Session]:
        """The newest open session, if any."""
        rows = self._query(f'SELECT {_SESSION_COLS} FROM sessions s WHERE s.ended IS NULL '
                           'ORDER BY s.id DESC LIMIT 1')
        return _session(rows[0]) if rows else None

    def sessions(self, limit: int = 50) -> List[Session]:
        """Newest first."""
        return [_session(r) for r in self._query(
            f'SELECT {_SESSION_COLS} FROM sessions s ORDER BY s.id DESC LIMIT ?', (limit,))]

    def completed_sessions(self) -> int:
        return int(self._query('SELECT COUNT(*) FROM sessions WHERE ended IS NOT NULL')[0][0])

    def undreamed_sessions(self) -> List[Session]:
        """Closed and not yet dreamed, oldest first."""
        return [_session(r) for r in self._query(
            f'SELECT {_SESSION_COLS} FROM sessions s WHERE s.ended IS NOT NULL AND s.dreamed = 0 '
            'ORDER BY s.id')]

    def mark_dreamed(self, session_id: int) -> None:
        self._writable()
        with self.transaction():
            self._db.execute('UPDATE sessions SET dreamed = 1 WHERE id = ?', (session_id,))

    # -- turns ----------------------------------------------------------------------------

    def record_turn(self, session_id: int, turn: TurnRecord) -> Turn:
        """Journal a turn; committed (on disk) when this returns."""
        self._writable()
        if turn.status not in TURN_STATUSES:
            raise ValueError(f'unknown turn status {turn.status!r} (one of '
                             f'{", ".join(TURN_STATUSES)})')
        with self.transaction():
            if self._db.execute('SELECT 1 FROM sessions WHERE id = ?',
                                (session_id,)).fetchone() is None:
                raise KeyError(f'no session {session_id}')
            cur = self._db.execute(
                'INSERT INTO turns (session, turn_id, observation_id, source, text, answer, '
                'status, error, salience, role, model, received, answered) '
                'VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
                (session_id, turn.turn_id, turn.observation_id, turn.source, turn.text,
                 turn.answer, turn.status, turn.error, float(turn.salience), turn.role,
                 turn.model, float(turn.received), float(turn.answered)))
            row_id = int(cur.lastrowid or 0)
        return Turn(**{f: getattr(turn, f) for f in TurnRecord.__dataclass_fields__},
                    id=row_id, session=session_id, indexed=False)

    def turns(self, session_id: Optional[int] = None, limit: int = 1000) -> List[Turn]:
        """The newest `limit` turns (of one session, or all), oldest first."""
        if session_id is None:
            rows = self._query(f'SELECT {_TURN_COLS} FROM turns ORDER BY id DESC LIMIT ?',
                               (limit,))
        else:
            rows = self._query(f'SELECT {_TURN_COLS} FROM turns WHERE session = ? '
                               'ORDER BY id DESC LIMIT ?', (session_id, limit))
        return [_turn(r) for r in reversed(rows)]

    def unindexed_turns(self, limit: int = 64) -> List[Turn]:
        """Answered ('ok') turns not yet marked indexed, oldest first."""
        return [_turn(r) for r in self._query(
            f"SELECT {_TURN_COLS} FROM turns WHERE indexed = 0 AND status = 'ok' ORDER BY id "
            'LIMIT ?', (limit,))]

    def unindexed_count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM turns WHERE indexed = 0 AND status = 'ok'")
                   [0][0])

    def mark_indexed(self, turn_ids: Sequence[int]) -> None:
        """Mark journal rows (`Turn.id`) as embedded into memories."""
        self._writable()
        with self.transaction():
            self._db.executemany('UPDATE turns SET indexed = 1 WHERE id = ?',
                                 [(int(i),) for i in turn_ids])

    def record_observation(self, session_id: int, source: str, kind: str, text: str,
                           salience: float, t: float,
                           data: Optional[Dict[str, Any]] = None) -> int:
        """Keep an observation worth remembering (the caller applies the salience threshold)."""
        self._writable()
        with self.transaction():
            cur = self._db.execute(
                'INSERT INTO observations (session, source, kind, text, salience, t, data) '
                'VALUES (?, ?, ?, ?, ?, ?, ?)',
                (session_id, source, kind, text, float(salience), float(t),
                 json.dumps(data or {})))
            return int(cur.lastrowid or 0)

    def observations(self, session_id: int, limit: int = 1000) -> List[Dict[str, Any]]:
        """A session's kept observations, oldest first, as dicts."""
        rows = self._query('SELECT id, source, kind, text, salience, t, data FROM observations '
                           'WHERE session = ? ORDER BY id LIMIT ?', (session_id, limit))
        return [{'id': r[0], 'source': r[1], 'kind': r[2], 'text': r[3], 'salience': r[4],
                 't': r[5], 'data': json.loads(r[6])} for r in rows]

    # -- memories -------------------------------------------------------------------------

    def add_memory(self, kind: str, text: str, *, source: str = '', person: str = '',
                   session: int = 0, turn_id: int = 0, salience: float = 0.0,
                   importance: float = 0.0, pinned: bool = False,
                   embedding: Optional[np.ndarray] = None, now: Optional[float] = None) -> Memory:
        """Store a memory; `text` is embedded with the store's embedder unless `embedding` is
        given (without either the memory is listed but not searchable). Call it off the
        response path: embedding takes milliseconds to tens of milliseconds."""
        self._writable()
        _check_kind(kind)
        if embedding is None and self._embedder is not None:
            embedding = self._embed([text])[0]
        t = time.time() if now is None else now
        blob = None if embedding is None else _blob(embedding)
        with self.transaction():
            cur = self._db.execute(
                'INSERT INTO memories (kind, text, source, person, session, turn_id, created, '
                'updated, salience, importance, mentions, pinned, embedding) '
                'VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)',
                (kind, text, source, person, session, turn_id, t, t, float(salience),
                 float(importance), int(pinned or kind == KIND_PINNED), blob))
            memory_id = int(cur.lastrowid or 0)
            found = self._get(memory_id)
        assert found is not None
        return found

    def update_memory(self, memory_id: int, *, text: Optional[str] = None,
                      importance: Optional[float] = None, mentions: Optional[int] = None,
                      embedding: Optional[np.ndarray] = None,
                      now: Optional[float] = None) -> Memory:
        """Change a memory in place (a fact that changed). New text is re-embedded with the
        store's embedder unless `embedding` is given (without an embedder the old vector
        stays)."""
        self._writable()
        if text is not None and embedding is None and self._embedder is not None:
            embedding = self._embed([text])[0]
        sets: List[str] = ['updated = ?']
        args: List[Any] = [time.time() if now is None else now]
        if text is not None:
            sets.append('text = ?')
            args.append(text)
        if importance is not None:
            sets.append('importance = ?')
            args.append(float(importance))
        if mentions is not None:
            sets.append('mentions = ?')
            args.append(int(mentions))
        if embedding is not None:
            sets.append('embedding = ?')
            args.append(_blob(embedding))
        with self.transaction():
            if self._get(memory_id) is None:
                raise KeyError(f'no memory {memory_id}')
            self._db.execute(f'UPDATE memories SET {", ".join(sets)} WHERE id = ?',
                             (*args, memory_id))
            found = self._get(memory_id)
        assert found is not None
        return found

    def supersede(self, old_id: int, new_id: int) -> None:
        """`old_id` is replaced by `new_id` (kept for history; excluded from search and list)."""
        self._writable()
        if old_id == new_id:
            raise ValueError('a memory cannot supersede itself')
        with self.transaction():
            for memory_id in (old_id, new_id):
                if self._get(memory_id) is None:
                    raise KeyError(f'no memory {memory_id}')
            self._db.execute('UPDATE memories SET superseded_by = ? WHERE id = ?',
                             (new_id, old_id))

    def merge(self, into_id: int, from_ids: Sequence[int]) -> Memory:
        """Fold duplicates into one: mentions add up, salience and importance take the highest,
        a pin carries over, and every `from_ids` memory is superseded by `into_id`."""
        self._writable()
        others = [int(i) for i in dict.fromkeys(from_ids) if int(i) != into_id]
        with self.transaction():
            into = self._get(into_id)
            if into is None:
                raise KeyError(f'no memory {into_id}')
            merged = [m for m in (self._get(i) for i in others) if m is not None]
            if len(merged) != len(others):
                raise KeyError(f'no memory among {others}')
            live = [m for m in merged if m.superseded_by is None]
            self._db.execute(
                'UPDATE memories SET mentions = ?, salience = ?, importance = ?, pinned = ?, '
                'updated = ? WHERE id = ?',
                (into.mentions + sum(m.mentions for m in live),
                 max([into.salience] + [m.salience for m in live]),
                 max([into.importance] + [m.importance for m in live]),
                 int(into.pinned or any(m.pinned for m in live)),
                 max([into.updated] + [m.updated for m in live]), into_id))
            self._db.executemany('UPDATE memories SET superseded_by = ? WHERE id = ?',
                                 [(into_id, m.id) for m in merged])
            found = self._get(into_id)
        assert found is not None
        return found

    def forget(self, memory_id: int) -> bool:
        """Forget a memory and those merged into it: text and vector are erased, the row stays
        as a tombstone (ids are never reused). False if there was nothing to forget."""
        self._writable()
        with self.transaction():
            todo, done = [memory_id], []
            while todo:
                current = todo.pop()
                cur = self._db.execute("UPDATE memories SET forgotten = 1, text = '', "
                                       'embedding = NULL WHERE id = ? AND forgotten = 0',
                                       (current,))
                if cur.rowcount:
                    done.append(current)
                    todo.extend(int(r[0]) for r in self._db.execute(
                        'SELECT id FROM memories WHERE superseded_by = ? AND forgotten = 0',
                        (current,)).fetchall())
        return memory_id in done

    def _get(self, memory_id: int) -> Optional[Memory]:
        rows = self._query(f'SELECT {_MEMORY_COLS} FROM memories WHERE id = ? AND forgotten = 0',
                           (memory_id,))
        return _memory(rows[0]) if rows else None

    def get(self, memory_id: int) -> Optional[Memory]:
        """A memory by id (superseded ones too, with `superseded_by`); None if forgotten."""
        return self._get(memory_id)

    def list_memories(self, kind: Optional[str] = None, session: Optional[int] = None,
                      include_superseded: bool = False, limit: int = 100,
                      offset: int = 0) -> List[Memory]:
        """Newest first; forgotten ones never, superseded ones on request."""
        where = ['forgotten = 0']
        args: List[Any] = []
        if not include_superseded:
            where.append('superseded_by IS NULL')
        if kind is not None:
            _check_kind(kind)
            where.append('kind = ?')
            args.append(kind)
        if session is not None:
            where.append('session = ?')
            args.append(session)
        return [_memory(r) for r in self._query(
            f'SELECT {_MEMORY_COLS} FROM memories WHERE {" AND ".join(where)} '
            'ORDER BY id DESC LIMIT ? OFFSET ?', (*args, limit, offset))]

    def embedding(self, memory_id: int) -> Optional[np.ndarray]:
        """The stored unit vector (float32), None if none or forgotten."""
        rows = self._query('SELECT embedding FROM memories WHERE id = ? AND forgotten = 0',
                           (memory_id,))
        if not rows or rows[0][0] is None:
            return None
        return np.frombuffer(rows[0][0], dtype=np.float32).copy()

    def pinned(self) -> List[Memory]:
        """Live pinned memories, oldest first (all of them are considered for every prompt)."""
        return [_memory(r) for r in self._query(
            f'SELECT {_MEMORY_COLS} FROM memories WHERE pinned = 1 AND {_LIVE} ORDER BY id')]

    def count(self, kind: Optional[str] = None) -> int:
        """Live memories (not superseded, not forgotten), of one kind or all."""
        if kind is None:
            return int(self._query(f'SELECT COUNT(*) FROM memories WHERE {_LIVE}')[0][0])
        _check_kind(kind)
        return int(self._query(f'SELECT COUNT(*) FROM memories WHERE kind = ? AND {_LIVE}',
                               (kind,))[0][0])

    # -- search ---------------------------------------------------------------------------

    def _sync_index(self) -> Optional[VectorIndex]:
        """Build the index at first use, then take in rows changed since (by any process).
        Inside a transaction the index is left as it is (a rollback must not leave it ahead
        of the file)."""
        with self._lock:
            if self._depth:
                return self._index
            self._db.execute('BEGIN')            # one snapshot for the counter and the rows
            try:
                gen = int(self._db.execute('SELECT value FROM memory_gen WHERE id = 1')
                          .fetchone()[0])
                if self._index is not None and gen == self._index_seen:
                    return self._index
                if self._index is None:
                    rows = self._db.execute(
                        f'SELECT id, embedding, 1 FROM memories WHERE {_LIVE} '
                        'AND embedding IS NOT NULL').fetchall()
                else:
                    rows = self._db.execute(
                        f'SELECT id, embedding, {_LIVE} AND embedding IS NOT NULL FROM memories '
                        'WHERE changed > ?', (self._index_seen,)).fetchall()
            finally:
                self._db.execute('COMMIT')
            self._apply(rows)
            self._index_seen = gen
            return self._index

    def _apply(self, rows: Sequence[Tuple[Any, ...]]) -> None:
        live = [(int(r[0]), r[1]) for r in rows if r[2] and r[1] is not None]
        dead = [int(r[0]) for r in rows if not (r[2] and r[1] is not None)]
        if self._index is None:
            if not live:
                return
            dim = len(live[0][1]) // 4
            self._index = make_index(dim, len(live), self._hnsw_threshold, self._index_pref)
            wanted_hnsw = self._index_pref == 'hnsw' or (
                self._index_pref is None and self._hnsw_threshold is not None
                and len(live) >= self._hnsw_threshold)
            if wanted_hnsw and not usearch_available():
                self._warn_once('usearch', 'memory: usearch is not installed; searching '
                                f'{len(live)} memories with the exact index instead of HNSW')
        index = self._index
        if dead:
            index.remove(dead)
        good = [(i, b) for i, b in live if len(b) == index.dim * 4]
        if len(good) != len(live):
            self._warn_once('dim', f'memory: {len(live) - len(good)} memories have embeddings '
                            f'of another size than {index.dim} (another embedder); skipped')
        if good:
            ids = [i for i, _ in good]
            vecs = np.frombuffer(b''.join(b for _, b in good), dtype=np.float32)
            index.add(ids, vecs.reshape(len(good), index.dim))
        if (isinstance(index, ExactIndex) and self._index_pref is None
                and self._hnsw_threshold is not None and len(index) >= self._hnsw_threshold
                and usearch_available()):
            self._index = None                   # grew past the threshold: rebuild as HNSW
            self._index_seen = -1
            self._sync_index_rebuild()

    def _sync_index_rebuild(self) -> None:
        rows = self._db.execute(f'SELECT id, embedding, 1 FROM memories WHERE {_LIVE} '
                                'AND embedding IS NOT NULL').fetchall()
        self._apply(rows)

    def index_info(self) -> Dict[str, Any]:
        """Which index is in use and how many vectors it holds (for status and benchmarks)."""
        index = self._sync_index()
        return {'index': index_name(index) if index is not None else 'none',
                'vectors': len(index) if index is not None else 0}

    def _filter_sql(self, kinds: Optional[Sequence[str]], source: Optional[str],
                    person: Optional[str], since: Optional[float],
                    until: Optional[float]) -> Tuple[str, List[Any]]:
        where = [_LIVE]
        args: List[Any] = []
        if kinds is not None:
            for k in kinds:
                _check_kind(k)
            where.append(f'kind IN ({", ".join("?" * len(kinds))})' if kinds else '0')
            args.extend(kinds)
        if source is not None:
            where.append('source = ?')
            args.append(source)
        if person is not None:
            where.append('person = ?')
            args.append(person)
        if since is not None:
            where.append('created >= ?')
            args.append(float(since))
        if until is not None:
            where.append('created <= ?')
            args.append(float(until))
        return ' AND '.join(where), args

    def _candidates(self, query: np.ndarray, k: int, where: str, args: List[Any],
                    filtered: bool) -> List[Tuple[Memory, float]]:
        """Memories near `query` that pass `where`, with their similarity: the index's nearest
        (oversampled), each re-read from SQL; when a filter leaves too few of them, an exact
        scan of the filtered set."""
        with self._lock:                         # the index changes under another thread's sync
            index = self._sync_index()
            if index is None or len(index) == 0:
                return []
            if query.shape[-1] != index.dim:
                raise ValueError(f'query embedding has {query.shape[-1]} dimensions, the '
                                 f'stored memories {index.dim} (another embedder?)')
            wanted = max(k * 32, 256) if filtered else max(k * 8, 64)
            ids, sims = index.search(query, wanted)
            found = self._fetch(ids, sims, where, args)
            if filtered and len(found) < k and len(index) > len(ids):
                pool = [int(r[0]) for r in self._query(
                    f'SELECT id FROM memories WHERE {where} AND embedding IS NOT NULL', args)]
                ids, sims = index.similarities(query, pool)
                top = np.argsort(-sims, kind='stable')[:wanted]   # fetch only the nearest
                found = self._fetch(ids[top], sims[top], where, args)
            return found

    def _fetch(self, ids: np.ndarray, sims: np.ndarray, where: str,
               args: List[Any]) -> List[Tuple[Memory, float]]:
        if len(ids) == 0:
            return []
        sim_of = {int(i): float(s) for i, s in zip(ids, sims)}
        out: List[Tuple[Memory, float]] = []
        keys = list(sim_of)
        for start in range(0, len(keys), 900):   # stay under sqlite's variable limit
            chunk = keys[start:start + 900]
            rows = self._query(f'SELECT {_MEMORY_COLS} FROM memories WHERE id IN '
                               f'({", ".join("?" * len(chunk))}) AND {where}', (*chunk, *args))
            out.extend((m, sim_of[m.id]) for m in map(_memory, rows))
        return out

    def search(self, query: str, k: int = 5, *, kinds: Optional[Sequence[str]] = None,
               source: Optional[str] = None, person: Optional[str] = None,
               since: Optional[float] = None, until: Optional[float] = None,
               weights: Optional[RecallWeights] = None, now: Optional[float] = None,
               query_embedding: Optional[np.ndarray] = None) -> List[Hit]:
        """The `k` best live memories for `query` by the weighted recall score, best first.
        Filters: kinds, exact source and person, created within [since, until]."""
        if k <= 0:
            return []
        w = weights or RecallWeights()
        q = normalise(query_embedding if query_embedding is not None
                      else self._embed([query]))[0]
        where, args = self._filter_sql(kinds, source, person, since, until)
        filtered = len(args) > 0 or kinds is not None
        t = time.time() if now is None else now
        hits: List[Hit] = []
        for memory, sim in self._candidates(q, k, where, args, filtered):
            if sim < w.min_similarity:
                continue
            age = max(0.0, t - memory.updated)
            recency = math.pow(0.5, age / w.half_life_s) if w.half_life_s > 0 else 0.0
            score = (w.similarity * sim + w.recency * recency + w.salience * memory.salience
                     + w.importance * memory.importance)
            hits.append(Hit(memory, min(1.0, max(0.0, score)), sim))
        hits.sort(key=lambda h: (-h.score, -h.similarity, -h.memory.id))
        return hits[:k]

    def similar(self, embedding: np.ndarray, k: int = 10,
                kinds: Optional[Sequence[str]] = None) -> List[Hit]:
        """The `k` live memories most similar to `embedding`, by cosine alone (for dreaming:
        duplicates and paraphrases); score = similarity."""
        if k <= 0:
            return []
        q = normalise(embedding)[0]
        where, args = self._filter_sql(kinds, None, None, None, None)
        found = self._candidates(q, k, where, args, kinds is not None)
        found.sort(key=lambda ms: (-ms[1], ms[0].id))
        return [Hit(m, s, s) for m, s in found[:k]]

    # -- dreams ---------------------------------------------------------------------------

    def record_dream(self, record: DreamRecord) -> int:
        self._writable()
        with self.transaction():
            cur = self._db.execute(
                f'INSERT INTO dreams ({_DREAM_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)',
                (record.session, record.started, record.ended, int(record.interrupted),
                 record.stage, record.merged, record.facts, record.updated, record.pruned,
                 record.bundle_path, record.summary))
            return int(cur.lastrowid or 0)

    def dreams(self, limit: int = 20) -> List[DreamRecord]:
        """Newest first."""
        return [_dream(r) for r in self._query(
            f'SELECT {_DREAM_COLS} FROM dreams ORDER BY id DESC LIMIT ?', (limit,))]

    def dream_count(self) -> int:
        return int(self._query('SELECT COUNT(*) FROM dreams')[0][0])


__all__ = ['DreamRecord', 'Hit', 'KINDS', 'KIND_EPISODE', 'KIND_FACT', 'KIND_NOTE',
           'KIND_PINNED', 'KIND_SUMMARY', 'Memory', 'MemoryStore', 'RECOVERED_REASON',
           'RecallWeights', 'Session', 'StoreError', 'Turn', 'TurnRecord', 'TURN_STATUSES',
           'summarise_turns']
