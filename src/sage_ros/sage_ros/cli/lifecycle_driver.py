"""Drive a lifecycle node to `active` the ROS way, as the launch files do: `change_state`.

`sage up` starts the model manager with `autostart: false` and configures, then activates it
through its lifecycle services (after every restart, under `--processes`), so it runs through the
same transitions `ros2 lifecycle set` or launch_ros' lifecycle events use. A node restarted under
the same name may still be listed by discovery as its dead predecessor, so a request that gets
no answer is sent again rather than awaited forever.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Dict, List, Optional

from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.client import Client
from rclpy.node import Node
from rclpy.task import Future

LogFn = Callable[[str], None]
# How long a configure may take: it returns once the default model has loaded (a 14B model from
# a slow disk takes minutes).
CONFIGURE_TIMEOUT_S = 900.0
ANSWER_S = 2.0          # a lifecycle service that says nothing this long did not get the request
RESEND_AFTER_S = 4.0    # a transition request with no sign of the node acting on it is sent again
CLOSE_JOIN_S = 2.0      # close() waits this long, in all, for the driving threads to end
# The states a node passes through while a transition runs (a request that arrives meanwhile is
# refused, yet the transition under way may still reach the goal).
TRANSITION_STATES = frozenset((
    State.TRANSITION_STATE_CONFIGURING, State.TRANSITION_STATE_CLEANINGUP,
    State.TRANSITION_STATE_SHUTTINGDOWN, State.TRANSITION_STATE_ACTIVATING,
    State.TRANSITION_STATE_DEACTIVATING, State.TRANSITION_STATE_ERRORPROCESSING))


class _Target:
    def __init__(self, node: Node, fqn: str) -> None:
        group = ReentrantCallbackGroup()
        self.fqn = fqn
        self.get: Client = node.create_client(GetState, f'{fqn}/get_state', callback_group=group)
        self.change: Client = node.create_client(ChangeState, f'{fqn}/change_state',
                                                 callback_group=group)
        self.generation = 0   # bumped on every drive(): an older drive thread gives up


def _wait(future: Future, timeout_s: float, stopped: Callable[[], bool]) -> bool:
    done = threading.Event()
    future.add_done_callback(lambda _: done.set())
    deadline = time.monotonic() + timeout_s
    while not done.wait(0.05):
        if stopped() or time.monotonic() > deadline:
            return False
    return True


class LifecycleDriver:
    """Configures and activates lifecycle nodes through their services, each on its own thread.

    The `node` giving the clients must be spun by an executor on another thread. The threads
    end when `stop` is set (the process is stopping) or at `close()`, which waits for them: call
    it before destroying the node.
    """

    def __init__(self, node: Node, log: LogFn, stop: Optional[threading.Event] = None,
                 configure_timeout_s: float = CONFIGURE_TIMEOUT_S) -> None:
        self._node = node
        self._log = log
        self._stop = stop if stop is not None else threading.Event()
        self._closed = threading.Event()   # set by request_stop()/close(), not seen by others
        self._threads: List[threading.Thread] = []
        self._configure_timeout_s = configure_timeout_s
        self._targets: Dict[str, _Target] = {}
        self._lock = threading.Lock()

    def drive(self, fqn: str) -> None:
        """Bring the (new instance of the) node `fqn` to active, in the background."""
        with self._lock:
            target = self._targets.get(fqn)
            if target is None:
                target = self._targets[fqn] = _Target(self._node, fqn)
            target.generation += 1
            generation = target.generation
            if self._stopped():
                return
            thread = threading.Thread(target=self._guarded_run, args=(target, generation),
                                      daemon=True, name=f'lifecycle-{fqn}')
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
            thread.start()

    def request_stop(self) -> None:
        """Tell the driving threads to end (without waiting for them)."""
        self._closed.set()

    def close(self, timeout_s: float = CLOSE_JOIN_S) -> None:
        """Stop the driving threads and wait for them (`timeout_s` in all), so none is still
        using a client when the node is destroyed."""
        self._closed.set()
        with self._lock:
            threads, self._threads = self._threads, []
        deadline = time.monotonic() + timeout_s
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))

    def _stopped(self) -> bool:
        return self._closed.is_set() or self._stop.is_set()

    def _current(self, target: _Target, generation: int) -> bool:
        return not self._stopped() and target.generation == generation

    def _state(self, target: _Target, generation: int, patience_s: float) -> Optional[int]:
        """The node's state id, asking again until it answers; None when stopped or after
        `patience_s` without an answer."""
        deadline = time.monotonic() + patience_s
        while self._current(target, generation) and time.monotonic() < deadline:
            if not target.get.wait_for_service(timeout_sec=0.5):
                continue
            future = target.get.call_async(GetState.Request())
            if _wait(future, ANSWER_S, self._stopped):
                result = future.result()
                if result is not None:
                    return int(result.current_state.id)
            else:
                future.cancel()
        return None

    def _transition(self, target: _Target, generation: int, transition: int, label: str,
                    goal: int, timeout_s: float) -> bool:
        """Ask for `transition` (to state `goal`); while its answer is due, check the node is
        acting on it (its state moved) and send it again if the request was lost."""
        deadline = time.monotonic() + timeout_s
        start_state = self._state(target, generation, 30.0)
        while self._current(target, generation) and time.monotonic() < deadline:
            if not target.change.wait_for_service(timeout_sec=0.5):
                continue
            future = target.change.call_async(ChangeState.Request(
                transition=Transition(id=transition, label=label)))
            sent = time.monotonic()
            while self._current(target, generation) and time.monotonic() < deadline:
                if _wait(future, 0.5, self._stopped):
                    result = future.result()
                    if result is not None and result.success:
                        return True
                    # Refused: maybe a resend reaching a node already on its way (the first
                    # request was only slow to be picked up). What state is it in?
                    return self._settle(target, generation, goal, deadline)
                if time.monotonic() - sent > RESEND_AFTER_S:
                    # No answer yet: a long transition (the node is loading) or a lost request.
                    state = self._state(target, generation, ANSWER_S)
                    if state == goal:
                        return True   # done; its answer went astray
                    if state is not None and state == start_state:
                        future.cancel()
                        break   # nothing happened: send it again
                    sent = time.monotonic()
        return False

    def _settle(self, target: _Target, generation: int, goal: int, deadline: float) -> bool:
        """After a refused request: True when the node is in (or, from a transition state,
        reaches) `goal` before `deadline`; False when it is in another primary state."""
        while self._current(target, generation) and time.monotonic() < deadline:
            state = self._state(target, generation,
                                max(0.1, min(ANSWER_S, deadline - time.monotonic())))
            if state == goal:
                return True
            if state is not None and state not in TRANSITION_STATES:
                return False
            if self._closed.wait(0.2) or self._stop.is_set():
                break
        return False

    def _guarded_run(self, target: _Target, generation: int) -> None:
        """`_run`, reporting an error in one line (no traceback on a shutting-down process)."""
        try:
            self._run(target, generation)
        except Exception as exc:   # e.g. a client destroyed under the thread at shutdown
            if self._current(target, generation):
                self._finish(target.fqn, f'driving its lifecycle failed: '
                                         f'{type(exc).__name__}: {exc}')

    def _run(self, target: _Target, generation: int) -> None:
        fqn = target.fqn
        state = self._state(target, generation, 120.0)
        if state is None:
            if self._current(target, generation):
                self._finish(fqn, 'its lifecycle services did not answer within 120 s')
            return
        if state == State.PRIMARY_STATE_UNCONFIGURED:
            self._log(f'configuring {fqn}')
            t0 = time.monotonic()
            if not self._transition(target, generation, Transition.TRANSITION_CONFIGURE,
                                    'configure', State.PRIMARY_STATE_INACTIVE,
                                    self._configure_timeout_s):
                if self._current(target, generation):
                    self._finish(fqn, 'configure failed (its log says why)')
                return
            self._log(f'{fqn} configured in {time.monotonic() - t0:.1f} s')
            state = State.PRIMARY_STATE_INACTIVE
        if state == State.PRIMARY_STATE_INACTIVE:
            if not self._transition(target, generation, Transition.TRANSITION_ACTIVATE,
                                    'activate', State.PRIMARY_STATE_ACTIVE, 60.0):
                if self._current(target, generation):
                    self._finish(fqn, 'activate failed (its log says why)')
                return
            state = State.PRIMARY_STATE_ACTIVE
        if state == State.PRIMARY_STATE_ACTIVE:
            self._finish(fqn, 'active')
        elif self._current(target, generation):
            self._finish(fqn, f'left in lifecycle state {state}')

    def _finish(self, fqn: str, outcome: str) -> None:
        self._log(f'{fqn} {outcome}' if outcome == 'active' else f'{fqn}: {outcome}')
