"""A bounded FIFO of accepted goals for rclpy action servers: only running goals hold a thread.

rclpy runs every accepted goal's execute callback at once, each blocking an executor thread
while it waits (for a model, a lock, another action), and a lock does not keep them in order.
`GoalQueue` takes over `handle_accepted_callback`: an accepted goal waits in a deque, holding
no thread, and the queue starts the next one (`goal_handle.execute()`) when a running one ends.
Several action servers may share one queue (the model manager's generate and swap run in one
FIFO); they must then share one MutuallyExclusiveCallbackGroup, which also makes the goal cap
exact (a goal's acceptance and its entry into the queue happen in one callback).

A queued goal that is cancelled, or dropped (`drop_queued`, e.g. on deactivate), is executed
at once out of turn and answered by the `dropped` callback, without waiting for the running one.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Optional, Set, Tuple

from rclpy.action import CancelResponse
from rclpy.action.server import ServerGoalHandle

ExecuteFn = Callable[[ServerGoalHandle], Any]
# (goal handle, reason): answer a goal that will not run; reason None = it was cancelled.
# It must set the goal's terminal state (canceled() or abort()) and return its result.
DroppedFn = Callable[[ServerGoalHandle, Optional[str]], Any]

CANCELLED = None


def _key(gh: ServerGoalHandle) -> bytes:
    return bytes(gh.goal_id.uuid)


def answer_dropped(gh: ServerGoalHandle, result: Any, reason: Optional[str],
                   closed_code: int) -> Any:
    """The answer to a goal taken out of the queue (a `DroppedFn` body): cancelled while it
    waited (`reason` None), or closed with `reason` under the result's `closed_code`."""
    if reason is None:
        result.error_code, result.error_msg = result.CANCELLED, 'cancelled while waiting'
        if gh.is_cancel_requested:
            gh.canceled()
        else:   # the cancel was accepted but is not on the goal yet: end it anyway
            gh.abort()
    else:
        result.error_code, result.error_msg = closed_code, reason or 'not answered'
        gh.abort()
    return result


class GoalQueue:
    """FIFO of goals for one or more action servers; runs `concurrency` of them at a time."""

    def __init__(self, label: str, max_goals: Callable[[], int], dropped: DroppedFn,
                 concurrency: int = 1, on_change: Optional[Callable[[], None]] = None) -> None:
        if concurrency < 1:
            raise ValueError('concurrency must be at least 1')
        self.label = label
        self.concurrency = concurrency
        self._max_goals = max_goals
        self._dropped = dropped
        self._on_change = on_change
        self._lock = threading.Condition()
        self._queue: Deque[ServerGoalHandle] = deque()
        self._running: Set[bytes] = set()       # goal ids executing in turn
        self._out_of_turn: Dict[bytes, Optional[str]] = {}  # goal id -> drop reason (None = cancel)
        self._closed = ''

    # ---- counts --------------------------------------------------------------------------
    def counts(self) -> Tuple[int, int]:
        """(goals running, goals waiting), for heartbeats and logs."""
        with self._lock:
            return len(self._running), len(self._queue)

    def __len__(self) -> int:
        with self._lock:
            return len(self._running) + len(self._queue)

    def idle(self) -> bool:
        with self._lock:
            return not self._running and not self._queue and not self._out_of_turn

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no goal runs in turn (True), at most `timeout_s`. Goals answered out of
        turn are not waited for: after an executor shutdown they never run."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._running, timeout=timeout_s)

    # ---- server callbacks ------------------------------------------------------------------
    def refusal(self) -> str:
        """Why a new goal must be refused now ('' = accept it): the queue is closed or full."""
        with self._lock:
            if self._closed:
                return self._closed
            n, cap = len(self._running) + len(self._queue), self._max_goals()
            if n >= cap:
                return (f'{len(self._running)} goals running and {len(self._queue)} waiting '
                        f'(max_goals {cap})')
            return ''

    def handle_accepted(self, gh: ServerGoalHandle) -> None:
        """`handle_accepted_callback`: start the goal now if a slot is free, else queue it."""
        with self._lock:
            start = len(self._running) < self.concurrency and not self._queue
            if start:
                self._running.add(_key(gh))
            else:
                self._queue.append(gh)
        if start:
            try:
                gh.execute()
            except Exception:  # noqa: BLE001 - the executor is gone (shutdown)
                with self._lock:
                    self._running.discard(_key(gh))
                    self._lock.notify_all()
        self._changed()

    def cancel_callback(self, gh: ServerGoalHandle) -> CancelResponse:
        """`cancel_callback`: a queued goal leaves the queue and is answered at once; a running
        one sees `is_cancel_requested`."""
        self._take_out(gh, CANCELLED)
        return CancelResponse.ACCEPT

    def wrap(self, execute: ExecuteFn) -> ExecuteFn:
        """The server's `execute_callback`: runs `execute` for goals in turn, `dropped` for goals
        taken out of the queue, and starts the next goal when one ends."""
        def run(gh: ServerGoalHandle) -> Any:
            key = _key(gh)
            with self._lock:
                out_of_turn = key in self._out_of_turn
                reason = self._out_of_turn.get(key)
            if out_of_turn:
                try:
                    if reason is CANCELLED:
                        # The cancel is recorded on the goal just after cancel_callback returns.
                        deadline = time.monotonic() + 2.0
                        while not gh.is_cancel_requested and time.monotonic() < deadline:
                            time.sleep(0.005)
                    return self._dropped(gh, reason)
                finally:
                    with self._lock:
                        self._out_of_turn.pop(key, None)
                        self._lock.notify_all()
                    self._changed()
            try:
                return execute(gh)
            finally:
                self._finish(key)
        return run

    # ---- control -------------------------------------------------------------------------
    def drop_queued(self, reason: str) -> int:
        """Answer every waiting goal with `reason` at once (deactivate, shutdown); returns how
        many. Running goals are the caller's to stop."""
        return self.drop_waiting(lambda _: True, reason)

    def drop_waiting(self, which: Callable[[ServerGoalHandle], bool], reason: str) -> int:
        """Answer the waiting goals `which` selects with `reason` at once; returns how many."""
        with self._lock:
            waiting = [gh for gh in self._queue if which(gh)]
        for gh in waiting:
            self._take_out(gh, reason)
        return len(waiting)

    def close(self, reason: str) -> None:
        """Refuse new goals with `reason` (the node is stopping or inactive); '' reopens."""
        with self._lock:
            self._closed = reason

    # ---- internals -----------------------------------------------------------------------
    def _take_out(self, gh: ServerGoalHandle, reason: Optional[str]) -> None:
        with self._lock:
            try:
                self._queue.remove(gh)
            except ValueError:
                return        # running (it sees the cancel itself) or already answered
            self._out_of_turn[_key(gh)] = reason
        try:
            gh.execute()      # runs `dropped` out of turn
        except Exception:     # noqa: BLE001 - the executor is gone (shutdown): nothing to answer
            with self._lock:
                self._out_of_turn.pop(_key(gh), None)
                self._lock.notify_all()
        self._changed()

    def _finish(self, key: bytes) -> None:
        nxt: Optional[ServerGoalHandle] = None
        with self._lock:
            self._running.discard(key)
            if self._queue and len(self._running) < self.concurrency:
                nxt = self._queue.popleft()
                self._running.add(_key(nxt))
            self._lock.notify_all()
        if nxt is not None:
            try:
                nxt.execute()
            except Exception:  # noqa: BLE001 - the executor is gone (shutdown)
                with self._lock:
                    self._running.discard(_key(nxt))
                    self._lock.notify_all()
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

