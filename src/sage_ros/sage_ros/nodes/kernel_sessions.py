"""The kernel's sessions: the robot's session store, the turn journal and `session/end`.

Separate from `kernel.KernelNode` because it is a concern of its own with its own rules, not
part of running the cognition engine: the node decides, publishes and logs turns; this keeps
them. `SessionKeeper` owns the `core.memory.store.MemoryStore` (on the same SQLite file as
trust and weights, which it opens first for the engine: `state_store`), the current `Session`,
the journal, the kept observations, the summary request to the language block, closing and
reopening, and the close at shutdown. The node constructs it with itself (logging, parameters,
the summary client), its lock and its state publisher, and calls into it.

Locks: `journal` and `keep_observation` run in the node's callbacks, under the node's lock,
and the journal is written before the node publishes the Response. `end_session` runs on its
own callback group: it waits for the summary outside the node's lock (the kernel goes on
serving turns, which join the old session until it is closed) and closes and reopens under it,
so no turn is journalled between the close and the open.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
from action_msgs.msg import GoalStatus
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node
from sage_interfaces.action import Language
from sage_interfaces.msg import MemoryItem, Response
from sage_interfaces.srv import EndSession

from .. import names
from ..core.memory.store import MemoryStore, Session, TurnRecord
from ..core.salience import SalienceScore
from ..core.sessions import INSTRUCTION, Ending, Exchange, ending, transcript
from ..core.store import StateStore
from .action_call import CallError, ThreadSafeActionClient, call_action
from .common import ConfigError, declare

# Response status -> the journal's words (`TurnRecord.status`)
STATUS_OK, STATUS_REJECTED, STATUS_FAILED = 'ok', 'rejected', 'failed'
STATUS_EXPIRED, STATUS_CANCELLED = 'expired', 'cancelled'
SHUTDOWN_REASON = 'shutdown (signal)'

Embedder = Callable[[Sequence[str]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class SessionParams:
    """The kernel's `session.*` parameters."""
    keep_salience: float
    summary_timeout_s: float
    summary_tokens: int


def declare_session_parameters(node: Node) -> SessionParams:
    """Declare the `session.*` parameters on the kernel node and return their values."""
    keep_salience = declare(
        node, 'session.keep_salience', 0.6,
        'Observations at or above this total salience are kept in the store with their '
        'SNARC scores (every turn is journalled anyway)', read_only=True, min_value=0.0,
        max_value=1.0)
    summary_timeout_s = declare(
        node, 'session.summary_timeout_s', 30.0,
        'session/end waits this long for the language block\'s summary and note, then '
        'closes the session with an extractive summary [s]', read_only=True,
        min_value=0.0, max_value=3600.0)
    summary_tokens = declare(
        node, 'session.summary_tokens', 96,
        'Token cap of the summary and note the language block writes at session/end '
        '[tokens]', read_only=True, min_value=1, max_value=4096)
    return SessionParams(keep_salience, summary_timeout_s, summary_tokens)


def _unkept_session(number: int, now: float) -> Session:
    """A session without a store (state_file none): numbered in this run only."""
    return Session(id=0, number=number, started=now, ended=None, end_reason='', summary='',
                   note='', turns=0, dreamed=False)


class SessionKeeper:
    """The robot's session on the kernel node: opened at start (after closing what a kill -9
    left open), journalled turn by turn, closed by `session/end` or at shutdown."""

    def __init__(self, node: Node, path: Optional[Path], params: SessionParams,
                 minilm: Callable[[], Optional[Embedder]], lock: threading.RLock,
                 publish_state: Callable[[], None]) -> None:
        """Open the state file (`path`, None = nothing kept) and this run's session.
        `minilm` gives MiniLM, or None when the kernel does not run it; `lock` is the node's
        lock; `publish_state` publishes the node's `state` (the session number is in it)."""
        self._node = node
        self._params = params
        self._minilm = minilm
        self._lock = lock
        self._publish_state = publish_state
        self.memory: Optional[MemoryStore] = None
        try:
            self.state_store: Optional[StateStore] = (StateStore(path) if path is not None
                                                      else None)
            # The first to open the file migrates it (and says so): log what either said.
            state_messages = (list(self.state_store.migration_messages) if self.state_store
                              else [])
            if path is not None:
                # Notes are embedded with MiniLM when the kernel runs it anyway (salience);
                # with hashed n-grams they are stored unembedded (listed, not searched) rather
                # than mixed into a MiniLM index.
                self.memory = MemoryStore(path, embedder=minilm())
        except (OSError, sqlite3.Error, ValueError, RuntimeError) as exc:
            # a directory, unwritable, not a database, a newer schema
            raise ConfigError(f'state_file {str(path)!r} cannot be used: {exc}') from None
        self._session_lock = threading.Lock()   # one session/end at a time
        self._shutting_down = False
        self._journal_error = ''
        self.session = self._start_session(state_messages)
        self._summary_client = ThreadSafeActionClient(node, Language, names.BLOCK_LANGUAGE,
                                                      callback_group=ReentrantCallbackGroup())

    def _start_session(self, state_messages: List[str]) -> Session:
        """Close what a kill -9 left open (saying what was kept), then open this run's session."""
        log = self._node.get_logger()
        now = time.time()
        if self.memory is None:
            log.info('sessions are not kept (state_file none): this is session 1')
            return _unkept_session(1, now)
        for message in state_messages + self.memory.migration_messages:
            log.info(message)
        for old in self.memory.recover(now):
            answered = sum(t.status == STATUS_OK
                           for t in self.memory.turns(old.id, limit=1_000_000))
            log.warning(f'recovered session {old.number} (ended without shutdown): {answered} '
                        f'answered turn{"s" if answered != 1 else ""} kept, {old.turns} '
                        'journalled in all')
        session = self.memory.open_session(now)
        log.info(f'session {session.number} begins ({self.memory.completed_sessions()} '
                 'completed before)')
        return session

    # ---- shutdown ----------------------------------------------------------------------------
    def begin_shutdown(self) -> None:
        """From now on nothing is journalled and a summary being waited for is abandoned."""
        self._shutting_down = True

    def close_on_shutdown(self) -> None:
        """Close the session extractively (the model manager is going down at the same moment)
        and the store; a failure is logged, the next start recovers the session."""
        if self.memory is None or self.session.ended is not None:
            return
        try:
            closed = self.memory.close_session(self.session.id, SHUTDOWN_REASON, time.time())
            self.session = closed
            self._node.get_logger().info(f'session {closed.number} closed ({SHUTDOWN_REASON}): '
                                         f'{closed.turns} turns; it dreams at the next start')
        except Exception as exc:  # the next start recovers it: say so, do not fail the exit
            self._node.get_logger().error(f'session {self.session.number} not closed ({exc}); '
                                          'the next start recovers it')
        finally:
            self.memory.close()

    # ---- turns -------------------------------------------------------------------------------
    def journal(self, msg: Response, status: str, received: Optional[float] = None) -> None:
        """Record the finished turn durably, then it may be published. A store that fails is
        logged (once per kind of failure) and the answer still goes out."""
        msg.session = self.session.number
        if self.memory is None or self._shutting_down:
            return
        now = time.time()
        record = TurnRecord(
            turn_id=int(msg.turn_id), observation_id=msg.observation_id, source=msg.source,
            text=msg.input_text, answer=msg.text, status=status, error=msg.error,
            salience=float(msg.salience), role=msg.role, model=msg.model,
            received=received if received is not None else now - float(msg.latency_s),
            answered=now)
        try:
            self.memory.record_turn(self.session.id, record)
        except Exception as exc:  # disk full, locked past busy_timeout: answer anyway
            why = f'{type(exc).__name__}: {exc}'
            if why != self._journal_error:
                self._journal_error = why
                self._node.get_logger().error(f'turn {msg.turn_id} not journalled ({why})')
            return
        self._journal_error = ''

    def keep_observation(self, turn_id: int, observation_id: str, source: str, text: str,
                         s: SalienceScore) -> None:
        """A salient observation, with its SNARC scores, for the dream to weigh."""
        if self.memory is None or s.total < self._params.keep_salience:
            return
        try:
            self.memory.record_observation(
                self.session.id, source, 'text', text, float(s.total), time.time(),
                {'turn_id': turn_id, 'observation_id': observation_id,
                 'surprise': s.surprise, 'novelty': s.novelty, 'arousal': s.arousal,
                 'reward': s.reward, 'conflict': s.conflict, 'stance': s.stance})
        except Exception as exc:  # kept observations are a bonus: never fail a turn for one
            self._node.get_logger().warning(f'observation of turn {turn_id} not kept: {exc}')

    # ---- session/end -------------------------------------------------------------------------
    def end_session(self, request: EndSession.Request, response: EndSession.Response,
                    sleep: Callable[[str], Tuple[bool, str]]) -> EndSession.Response:
        """Close the session with the small model's summary and note, open the next, and
        dream if asked (`sleep`, called under the node's lock). Runs on its own group: the
        language goal is waited for here while the kernel goes on serving turns (which join
        the old session until it is closed)."""
        reason = request.reason.strip() or 'session/end'
        if not self._session_lock.acquire(blocking=False):
            response.success, response.message = False, 'a session is already being closed'
            return response
        try:
            with self._lock:
                closing = self.session
            response.session = closing.number
            if self.memory is None:
                with self._lock:
                    self.session = _unkept_session(closing.number + 1, time.time())
                    self._publish_state()
                done = (f'session {closing.number} ended; not kept (state_file none); '
                        f'session {self.session.number} begins')
            else:
                end = self._ask_for_summary(closing)
                embedding = self._embed_note(end.note)     # MiniLM, never under the node lock
                with self._lock:
                    closed, note_id = self._close_and_reopen(closing, reason, end, embedding)
                response.summary, response.note = closed.summary, closed.note
                done = (f'session {closed.number} closed ({reason}; {closed.turns} turns; '
                        f'{end.why}'
                        f'{f"; note kept as memory {note_id}" if note_id else ""}); '
                        f'session {self.session.number} begins')
            if request.dream:
                with self._lock:
                    ok, slept = sleep(f'session {closing.number} ended: consolidating')
                done += f'; {"dreaming" if ok else "no dream"}: {slept}'
            response.success, response.message = True, done
            self._node.get_logger().info(done)
        except Exception as exc:  # the store failed: say so, the session stays open
            response.success = False
            response.message = f'session {response.session} not closed: {exc}'
            self._node.get_logger().error(response.message)
        finally:
            self._session_lock.release()
        return response

    def _ask_for_summary(self, session: Session) -> Ending:
        """One ephemeral Language goal over the session's transcript; extractive on failure."""
        assert self.memory is not None
        turns = [t for t in self.memory.turns(session.id) if t.status == STATUS_OK]
        users = [t.text for t in turns]
        if not turns:
            return ending(None, 'no answered turn to summarise', users)
        goal = Language.Goal(
            turn_id=0, text=INSTRUCTION, ephemeral=True,
            max_new_tokens=self._params.summary_tokens,
            context=transcript([Exchange(t.text, t.answer) for t in turns]))
        try:
            wrapped = call_action(
                self._summary_client, goal, what='language block', server_wait_s=2.0,
                timeout_s=self._params.summary_timeout_s,
                should_stop=lambda: self._shutting_down, abandon=lambda: self._shutting_down)
        except CallError as exc:
            return ending(None, str(exc), users)
        result = wrapped.result
        if wrapped.status != GoalStatus.STATUS_SUCCEEDED or result.error_code != result.NONE:
            return ending(None, result.error_msg or f'goal status {wrapped.status}', users)
        return ending(result.text, '', users)

    def _embed_note(self, note: str) -> Optional[np.ndarray]:
        embed = self._minilm()
        if not note or embed is None:
            return None
        try:
            return np.asarray(embed([note])[0], dtype=np.float32)
        except Exception as exc:  # stored unembedded: listed and given to awakening, not searched
            self._node.get_logger().warning(f'note not embedded: {exc}')
            return None

    def _close_and_reopen(self, closing: Session, reason: str, end: Ending,
                          embedding: Optional[np.ndarray]) -> Tuple[Session, int]:
        """Under the node lock: no turn is journalled between the close and the open. The
        note's embedding was computed before (never under the lock)."""
        assert self.memory is not None
        now = time.time()
        closed = self.memory.close_session(closing.id, reason, now, summary=end.summary,
                                           note=end.note)
        note_id = 0
        if closed.note:
            note_id = self.memory.add_memory(
                MemoryItem.KIND_NOTE, closed.note, source='kernel', session=closed.id,
                importance=1.0, embedding=embedding, now=now).id
        self.session = self.memory.open_session(now)
        self._publish_state()
        return closed, note_id
