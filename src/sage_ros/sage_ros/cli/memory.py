"""`sage memory search|list|forget` and `sage sessions`: the robot's memory, from its database.

They read the SQLite file directly (read-only, except `forget`), so they work with or without a
running graph: the file's WAL lets them read while the kernel and the memory block write.
`search` embeds the query with the offline MiniLM, as the memory block embeds memories.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import IO, Any, Dict, List, Optional

from ..core.memory.schema import KINDS, StoreError
from ..core.memory.store import Hit, Memory, MemoryStore, Session
from ..core.store import default_state_file, resolve_state_file


class MemoryCliError(RuntimeError):
    """A user mistake or an unusable database; one line that says what to do."""


def state_file(value: Optional[str]) -> Path:
    """`--state-file`, else the robot's database; it must exist (nothing is created here)."""
    path = resolve_state_file(value) if value else default_state_file()
    if path is None:
        raise MemoryCliError("--state-file none: there is no database to read")
    if path.is_dir():
        raise MemoryCliError(f'{path} is a directory, not the robot\'s database')
    if not path.is_file():
        raise MemoryCliError(f'no robot database at {path} (start the graph once, or pass '
                             '--state-file)')
    return path


def open_store(path: Path, read_only: bool = True, search: bool = False) -> MemoryStore:
    embedder = None
    if search:
        from ..core.embeddings import EmbeddingError, minilm_path, shared_embedder
        try:
            minilm_path()
        except EmbeddingError as exc:
            raise MemoryCliError(f'search needs the offline MiniLM: {exc}') from None
        embedder = shared_embedder().embed
    try:
        return MemoryStore(path, embedder=embedder, read_only=read_only)
    except StoreError as exc:
        raise MemoryCliError(str(exc)) from None


def _when(t: Optional[float]) -> str:
    if t is None:
        return '-'
    return datetime.datetime.fromtimestamp(t).strftime('%Y-%m-%d %H:%M')


def memory_record(m: Memory, hit: Optional[Hit] = None) -> Dict[str, Any]:
    record: Dict[str, Any] = {
        'id': m.id, 'kind': m.kind, 'text': m.text, 'session': m.session, 'source': m.source,
        'person': m.person, 'created': round(m.created, 3), 'mentions': m.mentions,
        'pinned': m.pinned, 'importance': round(m.importance, 3),
        'salience': round(m.salience, 3)}
    if hit is not None:
        record = {'score': round(hit.score, 4), 'similarity': round(hit.similarity, 4), **record}
    return record


def memory_line(m: Memory, score: Optional[float] = None) -> str:
    head = f'{m.id:>6}  {m.kind:<8}'
    if score is not None:
        head += f' {score:5.3f}'
    extra = f'  (told {m.mentions}x)' if m.mentions > 1 else ''
    return f'{head}  s{m.session:<4} {m.text}{extra}'


def session_record(s: Session) -> Dict[str, Any]:
    return {'number': s.number, 'id': s.id, 'started': round(s.started, 3),
            'ended': None if s.ended is None else round(s.ended, 3), 'end_reason': s.end_reason,
            'turns': s.turns, 'dreamed': s.dreamed, 'summary': s.summary, 'note': s.note}


def session_lines(s: Session) -> List[str]:
    if s.ended is None:
        span, state = f'{_when(s.started)} -> now', 'open'
    else:
        minutes = max(0.0, s.ended - s.started) / 60.0
        span = f'{_when(s.started)} -> {_when(s.ended)} ({minutes:.0f} min)'
        state = f'{s.end_reason}, {"dreamed" if s.dreamed else "not dreamed yet"}'
    lines = [f'session {s.number}  {span}  {s.turns} turn{"s" if s.turns != 1 else ""}  '
             f'[{state}]']
    if s.summary:
        lines.append(f'  summary: {s.summary}')
    if s.note:
        lines.append(f'  remember next time: {s.note}')
    return lines


def search(path: Path, text: str, k: int, as_json: bool, out: IO[str]) -> int:
    if not text.strip():
        raise MemoryCliError('search needs some text to look for')
    if k < 1:
        raise MemoryCliError('--k must be at least 1')
    store = open_store(path, search=True)
    try:
        hits = store.search(text, k=k)
    except (StoreError, ValueError) as exc:    # no embedder, or memories of another embedder
        raise MemoryCliError(f'cannot search {path}: {exc}') from None
    finally:
        store.close()
    for h in hits:
        print(json.dumps(memory_record(h.memory, h), ensure_ascii=False) if as_json
              else memory_line(h.memory, h.score), file=out)
    if not hits and not as_json:
        print('no memory matches', file=sys.stderr)
    return 0


def list_memories(path: Path, kind: Optional[str], limit: int, as_json: bool,
                  out: IO[str]) -> int:
    if kind is not None and kind not in KINDS:
        raise MemoryCliError(f'unknown kind {kind!r} (one of {", ".join(KINDS)})')
    if limit < 1:
        raise MemoryCliError('--limit must be at least 1')
    store = open_store(path)
    try:
        memories = store.list_memories(kind=kind, limit=limit)
    finally:
        store.close()
    for m in memories:
        print(json.dumps(memory_record(m), ensure_ascii=False) if as_json else memory_line(m),
              file=out)
    if not memories and not as_json:
        print('no memories' + (f' of kind {kind}' if kind else ''), file=sys.stderr)
    return 0


def forget(path: Path, memory_id: str, out: IO[str]) -> int:
    try:
        mid = int(memory_id)
    except ValueError:
        raise MemoryCliError(f'not a memory id: {memory_id!r} (ids are the numbers '
                             '`sage memory list` shows)') from None
    if mid < 1:
        raise MemoryCliError(f'not a memory id: {memory_id!r}')
    store = open_store(path, read_only=False)
    try:
        m = store.get(mid)
        if m is None or not store.forget(mid):
            raise MemoryCliError(f'no memory {mid} (already forgotten, or never stored)')
    finally:
        store.close()
    print(f'forgot memory {mid} ({m.kind}): {m.text}', file=out)
    return 0


def sessions(path: Path, limit: int, as_json: bool, out: IO[str]) -> int:
    if limit < 1:
        raise MemoryCliError('--limit must be at least 1')
    store = open_store(path)
    try:
        found = store.sessions(limit=limit)
    finally:
        store.close()
    for s in found:
        if as_json:
            print(json.dumps(session_record(s), ensure_ascii=False), file=out)
        else:
            print('\n'.join(session_lines(s)), file=out)
    if not found and not as_json:
        print('no sessions yet', file=sys.stderr)
    return 0
