"""One blocking action call from inside another goal: the language block's call to the model
manager's `generate`, the reasoning block's calls to the language block.

`call_action` waits for the server, sends the goal, streams feedback and waits for the result,
checking every `poll_s` whether to stop (the caller's goal was cancelled, or its node is going
away) and whether the server's node is gone (`gone`, from its heartbeat: a killed process
answers nothing, so without it the call would wait out `timeout_s`). Each way out is a typed
error with the reason in words.

`ThreadSafeActionClient` is the client to call it with from a worker thread: rclpy's
`ActionClient` sends a request before it registers the request's future, so an executor thread
that takes the response in between drops it ("Ignoring unexpected goal response") and the call
waits out its timeout.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional, Tuple

from action_msgs.msg import GoalStatus
from rclpy.action import ActionClient
from rclpy.node import Node
from rclpy.task import Future

from ..core.liveness import RESTARTED, Beat
from .liveness import LivenessWatch

StopFn = Callable[[], bool]
GoneFn = Callable[[], Optional[str]]     # the reason the server's node stopped, or None


class CallError(RuntimeError):
    """The call failed; the message says why in words."""


class ServerUnavailable(CallError):
    """The server is not reachable, or refused the goal."""


class ServerGone(CallError):
    """The server's node stopped (no heartbeat) or restarted while the goal ran."""


class CallTimeout(CallError):
    """The goal ran longer than the call's `timeout_s`; it was cancelled."""


class CallCancelled(CallError):
    """The caller stopped the call (`should_stop`); the goal was cancelled."""


class ThreadSafeActionClient(ActionClient):
    """An `ActionClient` whose requests can be sent from any thread: one lock holds across
    sending a request and registering its future, and across taking responses, so a response
    is only taken once its future is registered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Before the base class adds this waitable to its node: an executor may take data then.
        self._request_lock = threading.RLock()
        super().__init__(*args, **kwargs)

    def take_data(self) -> Any:
        with self._request_lock:
            return super().take_data()

    def send_goal_async(self, goal: Any, feedback_callback: Optional[Callable[[Any], None]] = None,
                        goal_uuid: Any = None) -> Future:
        with self._request_lock:
            return super().send_goal_async(goal, feedback_callback=feedback_callback,
                                           goal_uuid=goal_uuid)

    def _get_result_async(self, goal_handle: Any) -> Future:
        with self._request_lock:
            return super()._get_result_async(goal_handle)

    def _cancel_goal_async(self, goal_handle: Any) -> Future:
        with self._request_lock:
            return super()._cancel_goal_async(goal_handle)


def _cancel_if_accepted(sent: Future) -> None:
    """Done callback for a goal request the call gave up on: a late acceptance would leave the
    goal running with nobody to own it, so cancel it."""
    try:
        handle = sent.result()
        if handle is not None and handle.accepted:
            handle.cancel_goal_async()
    except Exception:  # noqa: BLE001 - the request failed or the client is gone: nothing runs
        pass


def _never() -> bool:
    return False


def _alive() -> Optional[str]:
    return None


def call_action(client: ActionClient, goal: Any, *, what: str, server_wait_s: float,
                timeout_s: float, should_stop: StopFn = _never,
                on_feedback: Optional[Callable[[Any], None]] = None, gone: GoneFn = _alive,
                abandon: StopFn = _never, cancel_wait_s: float = 2.0,
                poll_s: float = 0.05) -> Any:
    """Send `goal` and return its wrapped result (`.status`, `.result`) once it ends.

    `what` names the server in messages ("model manager"). `should_stop` cancels the goal and
    raises CallCancelled after waiting up to `cancel_wait_s` for the server to confirm;
    `abandon` (this node is going away) skips that wait. A result with status CANCELED also
    raises CallCancelled.
    """
    def check_gone() -> None:
        reason = gone()
        if reason:
            raise ServerGone(reason)

    deadline = time.monotonic() + server_wait_s
    while not client.server_is_ready():
        check_gone()
        if should_stop():
            raise CallCancelled('cancelled while waiting for the ' + what)
        if time.monotonic() >= deadline:
            raise ServerUnavailable(f'{what} not reachable (waited {server_wait_s:.0f} s)')
        time.sleep(poll_s)

    done = threading.Event()
    sent = client.send_goal_async(goal, feedback_callback=on_feedback)
    sent.add_done_callback(lambda _: done.set())
    deadline = time.monotonic() + max(server_wait_s, 1.0)
    try:
        while not done.wait(poll_s):
            check_gone()
            if should_stop():
                raise CallCancelled('cancelled while the goal was being sent to the ' + what)
            if time.monotonic() >= deadline:
                raise ServerUnavailable(f'{what} did not answer the goal request')
    except CallError:
        sent.add_done_callback(_cancel_if_accepted)   # nobody owns the goal if it comes late
        raise
    handle = sent.result()
    if handle is None or not handle.accepted:
        raise ServerUnavailable(f'{what} refused the goal (see its log for why)')

    done.clear()
    result = handle.get_result_async()
    result.add_done_callback(lambda _: done.set())
    deadline = time.monotonic() + timeout_s

    def stop(error: CallError, wait: bool) -> CallError:
        handle.cancel_goal_async()
        if wait:
            until = time.monotonic() + cancel_wait_s
            while not done.wait(poll_s) and time.monotonic() < until:
                if abandon() or gone():
                    break
        return error

    while not done.wait(poll_s):
        reason = gone()
        if reason:
            raise stop(ServerGone(reason), wait=False)
        if should_stop():
            raise stop(CallCancelled(f'{what} goal cancelled'), wait=not abandon())
        if time.monotonic() >= deadline:
            raise stop(CallTimeout(f'the {what} took longer than {timeout_s:g} s'),
                       wait=not abandon())
    wrapped = result.result()
    if wrapped is None:
        raise ServerUnavailable(f'{what} sent no result')
    if wrapped.status == GoalStatus.STATUS_CANCELED:
        raise CallCancelled(f'{what} goal cancelled')
    return wrapped


class Dependency:
    """A node this node's goals depend on (the model manager, the language block), followed by
    its heartbeat: whether it is alive and ready, and `guard()` for `call_action(gone=...)`."""

    def __init__(self, node: Node, watched: str, what: str, timeout_s: float,
                 on_change: Optional[Callable[[], None]] = None) -> None:
        self.watched = watched          # fully qualified node name
        self.what = what                # in messages: "model manager"
        self.timeout_s = timeout_s
        self._on_change = on_change
        self._lock = threading.Lock()
        self._beat: Optional[Beat] = None
        self._gone_reason = ''
        self._restarts = 0
        self.watch = LivenessWatch(node, timeout_s, on_gone=self._on_gone, on_event=self._on_event)

    def _on_gone(self, beat: Beat) -> None:
        if beat.node != self.watched:
            return
        with self._lock:
            self._beat = None
            self._gone_reason = f'{self.what} stopped (no heartbeat for {self.timeout_s:.1f} s)'
        self._changed()

    def _on_event(self, event: str, beat: Beat) -> None:
        if beat.node != self.watched:
            return
        with self._lock:
            if event == RESTARTED:
                self._restarts += 1
            self._beat = beat
            self._gone_reason = ''
        self._changed()

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()

    @property
    def gone_reason(self) -> str:
        """Why the node counts as gone now ('' while alive or never seen)."""
        with self._lock:
            return self._gone_reason

    @property
    def restarts(self) -> int:
        """Restarts seen (a new instance id under the node's name)."""
        with self._lock:
            return self._restarts

    def state(self) -> Tuple[bool, str]:
        """(alive and ready, why not in words)."""
        beat = self.watch.alive(self.watched)
        with self._lock:
            gone = self._gone_reason
        if beat is None:
            return False, gone or f'no heartbeat from the {self.what} ({self.watched}) yet'
        if not beat.ready:
            return False, f'{self.what} not ready: {beat.not_ready_reason or "no reason given"}'
        return True, ''

    def guard(self) -> GoneFn:
        """For one call: the reason the node stopped or restarted since now, else None."""
        with self._lock:
            restarts = self._restarts

        def gone() -> Optional[str]:
            with self._lock:
                if self._gone_reason:
                    return self._gone_reason
                if self._restarts != restarts:
                    return f'{self.what} restarted (the goal it was working on is lost)'
            return None
        return gone
