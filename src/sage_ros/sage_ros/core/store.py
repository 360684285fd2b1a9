"""Durable state that must survive restarts and `kill -9`: trust, swap history, learned weights.

The robot's one sqlite file (`state_dir()/sage.db` by default; WAL, synchronous=FULL): a value
returned from `put` or `append` is on disk. Values are JSON. Keys are namespaced by the caller
(e.g. "trust/language"). The file is shared with the memory store (core/memory/store.py);
whichever opens it first runs the schema migrations (core/memory/schema.py).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from .memory.schema import DEFAULT_DB, StoreError, connect

__all__ = ['DEFAULT_DB', 'StateStore', 'StoreError', 'default_state_file', 'resolve_state_file',
           'state_dir']


def state_dir() -> Path:
    """`$SAGE_STATE_DIR`, else `$XDG_STATE_HOME/sage_ros`, else `~/.local/state/sage_ros`."""
    env = os.environ.get('SAGE_STATE_DIR')
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get('XDG_STATE_HOME') or os.path.join(os.path.expanduser('~'), '.local', 'state')
    return Path(xdg) / 'sage_ros'


def default_state_file() -> Path:
    """The robot's one state file, shared by every node: `state_dir()/sage.db`."""
    return state_dir() / DEFAULT_DB


def resolve_state_file(value: str, default_name: str = DEFAULT_DB) -> Optional[Path]:
    """A node's `state_file` parameter: '' = `state_dir()/default_name`, 'none' = no persistence."""
    if value.strip().lower() == 'none':
        return None
    if not value.strip():
        return state_dir() / default_name
    return Path(os.path.expandvars(os.path.expanduser(value)))


class StateStore:
    """A thread-safe key/value table and append-only logs in one sqlite file."""

    def __init__(self, path: Path | str) -> None:
        """Opens (creating and migrating) the file; raises StoreError with a one-line reason.
        `migration_messages` says what opening did (a migration, an import of the previous
        per-node kernel.db/model_manager.db into a new sage.db), for the caller to log."""
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db, self.migration_messages = connect(self.path)

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            self._db.execute('INSERT INTO kv (key, value, updated) VALUES (?, ?, ?) '
                             'ON CONFLICT(key) DO UPDATE SET value=excluded.value, '
                             'updated=excluded.updated', (key, json.dumps(value), time.time()))

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._db.execute('SELECT value FROM kv WHERE key = ?', (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def items(self, prefix: str) -> Dict[str, Any]:
        """Every key starting with `prefix`, with the prefix removed."""
        with self._lock:
            rows = self._db.execute("SELECT key, value FROM kv WHERE substr(key, 1, ?) = ?",
                                    (len(prefix), prefix)).fetchall()
        return {k[len(prefix):]: json.loads(v) for k, v in rows}

    def append(self, stream: str, value: Any, keep: int = 1000) -> None:
        """Append to a log, keeping its newest `keep` entries."""
        with self._lock:
            self._db.execute('INSERT INTO log (stream, value, t) VALUES (?, ?, ?)',
                             (stream, json.dumps(value), time.time()))
            self._db.execute('DELETE FROM log WHERE stream = ? AND id <= (SELECT id FROM log '
                             'WHERE stream = ? ORDER BY id DESC LIMIT 1 OFFSET ?)',
                             (stream, stream, keep))

    def recent(self, stream: str, limit: int = 20) -> List[Any]:
        """The newest `limit` entries of a log, newest first."""
        with self._lock:
            rows = self._db.execute('SELECT value FROM log WHERE stream = ? ORDER BY id DESC '
                                    'LIMIT ?', (stream, limit)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
