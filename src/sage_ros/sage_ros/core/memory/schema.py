"""The robot's one SQLite file: connection settings and ordered schema migrations.

Every process that opens the file (kernel, model manager, memory block, the `sage memory` CLI)
calls `connect()`, which brings the file to `SCHEMA_VERSION` in one `BEGIN IMMEDIATE`
transaction and re-checks the version inside it, so two processes racing to open a new file
migrate it once. The version lives in `PRAGMA user_version`.

Version 1 is the key/value and log tables of `core/store.py` (the previous code made them with
user_version 0: a file with a `kv` table and user_version 0 is taken as version 1). Version 2
adds sessions, turns, observations, memories (with float32 embeddings) and dreams.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import List, Sequence, Tuple

SCHEMA_VERSION = 2
BUSY_TIMEOUT_S = 5.0
DEFAULT_DB = 'sage.db'
LEGACY_FILES = ('kernel.db', 'model_manager.db')   # the per-node files before version 2
KINDS = ('episode', 'fact', 'pinned', 'note', 'summary')


class StoreError(RuntimeError):
    """The state file cannot be used; the message is one line that says why."""


_V1 = """
CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS log (id INTEGER PRIMARY KEY AUTOINCREMENT, stream TEXT NOT NULL,
                                value TEXT NOT NULL, t REAL NOT NULL);
CREATE INDEX IF NOT EXISTS log_stream ON log (stream, id);
"""

# `memories.changed` is a store-wide sequence number set by triggers on every change that matters
# to the vector index (insert, new embedding, superseded, forgotten); `memory_gen` holds the
# newest one. A process's in-RAM index remembers the sequence number it has caught up to and
# reads only newer rows, so memories written by other processes are seen at the next search.
_V2 = f"""
CREATE TABLE sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started REAL NOT NULL,
    ended REAL,
    end_reason TEXT NOT NULL DEFAULT '',
    summary TEXT NOT NULL DEFAULT '',
    note TEXT NOT NULL DEFAULT '',
    dreamed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX sessions_open ON sessions (id) WHERE ended IS NULL;
CREATE TABLE turns (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session INTEGER NOT NULL REFERENCES sessions (id),
    turn_id INTEGER NOT NULL,
    observation_id TEXT NOT NULL,
    source TEXT NOT NULL,
    text TEXT NOT NULL,
    answer TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT NOT NULL,
    salience REAL NOT NULL,
    role TEXT NOT NULL,
    model TEXT NOT NULL,
    received REAL NOT NULL,
    answered REAL NOT NULL,
    indexed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX turns_session ON turns (session, id);
CREATE INDEX turns_unindexed ON turns (id) WHERE indexed = 0 AND status = 'ok';
CREATE TABLE observations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session INTEGER NOT NULL,
    source TEXT NOT NULL,
    kind TEXT NOT NULL,
    text TEXT NOT NULL,
    salience REAL NOT NULL,
    t REAL NOT NULL,
    data TEXT NOT NULL DEFAULT '{{}}'
);
CREATE INDEX observations_session ON observations (session, id);
CREATE TABLE memories (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL CHECK (kind IN ({', '.join(repr(k) for k in KINDS)})),
    text TEXT NOT NULL,
    source TEXT NOT NULL DEFAULT '',
    person TEXT NOT NULL DEFAULT '',
    session INTEGER NOT NULL DEFAULT 0,
    turn_id INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    salience REAL NOT NULL DEFAULT 0,
    importance REAL NOT NULL DEFAULT 0,
    mentions INTEGER NOT NULL DEFAULT 1,
    pinned INTEGER NOT NULL DEFAULT 0,
    superseded_by INTEGER,
    forgotten INTEGER NOT NULL DEFAULT 0,
    embedding BLOB,
    changed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX memories_live ON memories (kind, id) WHERE superseded_by IS NULL AND forgotten = 0;
CREATE INDEX memories_session ON memories (session, id);
CREATE INDEX memories_turn ON memories (turn_id) WHERE turn_id != 0;
CREATE INDEX memories_changed ON memories (changed);
CREATE INDEX memories_pinned ON memories (id) WHERE pinned = 1 AND superseded_by IS NULL
                                               AND forgotten = 0;
CREATE TABLE memory_gen (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL);
INSERT INTO memory_gen (id, value) VALUES (1, 0);
CREATE TRIGGER memories_inserted AFTER INSERT ON memories BEGIN
    UPDATE memory_gen SET value = value + 1 WHERE id = 1;
    UPDATE memories SET changed = (SELECT value FROM memory_gen WHERE id = 1) WHERE id = NEW.id;
END;
CREATE TRIGGER memories_changed AFTER UPDATE OF embedding, superseded_by, forgotten, kind
ON memories BEGIN
    UPDATE memory_gen SET value = value + 1 WHERE id = 1;
    UPDATE memories SET changed = (SELECT value FROM memory_gen WHERE id = 1) WHERE id = NEW.id;
END;
CREATE TRIGGER memories_deleted AFTER DELETE ON memories BEGIN
    UPDATE memory_gen SET value = value + 1 WHERE id = 1;
END;
CREATE TABLE dreams (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session INTEGER NOT NULL,
    started REAL NOT NULL,
    ended REAL NOT NULL,
    interrupted INTEGER NOT NULL,
    stage TEXT NOT NULL,
    merged INTEGER NOT NULL,
    facts INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    pruned INTEGER NOT NULL,
    bundle_path TEXT NOT NULL,
    summary TEXT NOT NULL
);
CREATE INDEX dreams_session ON dreams (session, id);
"""

# (version reached, script): applied in order, each inside the one migration transaction.
MIGRATIONS: Sequence[Tuple[int, str]] = ((1, _V1), (2, _V2))
assert [v for v, _ in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))


def _execute_script(db: sqlite3.Connection, script: str) -> None:
    """`executescript` commits first, which would break the migration transaction: split it."""
    statement = ''
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            db.execute(statement)
            statement = ''
    if statement.strip():
        raise ValueError(f'incomplete SQL statement in migration: {statement[:60]!r}')


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                      (name,)).fetchone() is not None


def current_version(db: sqlite3.Connection) -> int:
    """The file's schema version; a previous-code file (user_version 0 with kv) counts as 1."""
    version = int(db.execute('PRAGMA user_version').fetchone()[0])
    if version == 0 and _has_table(db, 'kv'):
        return 1
    return version


def _import_legacy(db: sqlite3.Connection, directory: Path) -> List[str]:
    """Copy the kv/log rows of the previous per-node files into a new sage.db (once: only a
    file being created calls this, inside its creating transaction)."""
    messages: List[str] = []
    for name in LEGACY_FILES:
        legacy = directory / name
        if not legacy.is_file():
            continue
        try:
            src = sqlite3.connect(f'file:{legacy}?mode=ro', uri=True, timeout=BUSY_TIMEOUT_S)
            try:
                kv = src.execute('SELECT key, value, updated FROM kv').fetchall() \
                    if _has_table(src, 'kv') else []
                log = src.execute('SELECT stream, value, t FROM log ORDER BY id').fetchall() \
                    if _has_table(src, 'log') else []
            finally:
                src.close()
        except sqlite3.Error as exc:
            messages.append(f'state: could not import {legacy}: {exc}')
            continue
        db.executemany('INSERT OR IGNORE INTO kv (key, value, updated) VALUES (?, ?, ?)', kv)
        db.executemany('INSERT INTO log (stream, value, t) VALUES (?, ?, ?)', log)
        messages.append(f'state: imported {len(kv)} values and {len(log)} log entries from '
                        f'{legacy} (the previous per-node file; it is no longer used)')
    if messages:
        db.execute('INSERT OR REPLACE INTO kv (key, value, updated) VALUES (?, ?, ?)',
                   ('store/imported', json.dumps(messages), time.time()))
    return messages


def migrate(db: sqlite3.Connection, path: Path) -> List[str]:
    """Bring `db` to SCHEMA_VERSION; returns what was done, in words (for the caller's log).

    Refuses a file from a newer version of the code: writing to it could break what that code
    expects.
    """
    version = current_version(db)
    if version == SCHEMA_VERSION:
        return []
    if version > SCHEMA_VERSION:
        raise StoreError(f'{path} has schema version {version}, newer than this code '
                         f'understands ({SCHEMA_VERSION}); use a newer sage_ros or another '
                         'state_file')
    db.execute('BEGIN IMMEDIATE')
    try:
        version = current_version(db)   # another process may have migrated meanwhile
        if version > SCHEMA_VERSION:
            raise StoreError(f'{path} has schema version {version}, newer than this code '
                             f'understands ({SCHEMA_VERSION})')
        fresh = version == 0
        messages: List[str] = []
        for target, script in MIGRATIONS:
            if target > version:
                _execute_script(db, script)
        if version < SCHEMA_VERSION:
            db.execute(f'PRAGMA user_version = {SCHEMA_VERSION}')
            if not fresh:
                messages.append(f'state: migrated {path} from schema version {version} to '
                                f'{SCHEMA_VERSION}')
        if fresh and path.name == DEFAULT_DB:
            messages.extend(_import_legacy(db, path.parent))
        db.execute('COMMIT')
    except BaseException:
        db.execute('ROLLBACK')
        raise
    return messages


def _set_wal(db: sqlite3.Connection) -> None:
    """Switch to WAL. On a new file that several processes open at once, the switch can fail
    with 'database is locked' at once, without the busy handler (SQLite does not wait there):
    retry until the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            db.execute('PRAGMA journal_mode = WAL')
            return
        except sqlite3.OperationalError as exc:
            if 'locked' not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def connect(path: Path, read_only: bool = False) -> Tuple[sqlite3.Connection, List[str]]:
    """An autocommit connection usable from any thread (the caller serialises with a lock), in
    WAL mode with synchronous=FULL (a committed write survives power loss and kill -9), a busy
    timeout for the other processes, foreign keys on, and the schema brought up to date.

    Returns the connection and the migration messages. A read-only open never migrates: a file
    older than this code is refused with a clear error.
    """
    try:
        if read_only:
            if not path.is_file():
                raise StoreError(f'{path} does not exist (nothing has been stored yet)')
            db = sqlite3.connect(f'file:{path}?mode=ro', uri=True, timeout=BUSY_TIMEOUT_S,
                                 check_same_thread=False, isolation_level=None)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, check_same_thread=False,
                                 isolation_level=None)
    except (sqlite3.Error, OSError) as exc:
        raise StoreError(f'cannot open {path}: {exc}') from None
    try:
        db.execute(f'PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}')
        if not read_only:
            _set_wal(db)
        db.execute('PRAGMA synchronous = FULL')
        db.execute('PRAGMA foreign_keys = ON')
        if read_only:
            version = current_version(db)
            if version != SCHEMA_VERSION:
                raise StoreError(f'{path} has schema version {version}, this code needs '
                                 f'{SCHEMA_VERSION}; open it read-write once (start the graph)')
            return db, []
        return db, migrate(db, path)
    except sqlite3.DatabaseError as exc:
        db.close()
        raise StoreError(f'{path} cannot be used: {exc}') from None
    except BaseException:
        db.close()
        raise
