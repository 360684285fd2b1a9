"""GoalQueue with stand-in goal handles (the executor's create_task is a thread here): FIFO
order, one at a time, the goal cap, cancel and drop of waiting goals."""

from __future__ import annotations

import threading
import uuid
from typing import Any, Callable, List, Optional

from rclpy.action import CancelResponse

from sage_ros.nodes.goal_queue import GoalQueue


class FakeHandle:
    """What the queue uses of a ServerGoalHandle; execute() runs the callback in a thread, as
    the executor would run its task."""

    def __init__(self, name: str, run: Callable[['FakeHandle'], Any]) -> None:
        self.name = name
        self.goal_id = type('GoalId', (), {'uuid': uuid.uuid4().bytes})()
        self.is_cancel_requested = False
        self.state = 'accepted'
        self._run = run
        self.done = threading.Event()

    def execute(self) -> None:
        def task() -> None:
            self._run(self)
            self.done.set()
        threading.Thread(target=task, daemon=True).start()


class Work:
    """Execute callbacks that hold until released, recording the order they ran in."""

    def __init__(self) -> None:
        self.started: List[str] = []
        self.dropped: List[tuple] = []
        self.release = {n: threading.Event() for n in 'abcdef'}
        self.running = threading.Semaphore(0)

    def execute(self, gh: Any) -> str:
        self.started.append(gh.name)
        self.running.release()
        self.release[gh.name].wait(10.0)
        gh.state = 'succeeded'
        return gh.name

    def drop(self, gh: Any, reason: Optional[str]) -> str:
        self.dropped.append((gh.name, reason))
        gh.state = 'canceled' if reason is None else 'aborted'
        return gh.name


def make(cap: int = 4) -> tuple:
    work = Work()
    q = GoalQueue('test', lambda: cap, work.drop)
    run = q.wrap(work.execute)
    return q, work, run


def test_goals_run_one_at_a_time_in_the_order_they_came() -> None:
    q, work, run = make()
    handles = [FakeHandle(n, run) for n in 'abc']
    for gh in handles:
        assert q.refusal() == ''
        q.handle_accepted(gh)
    assert work.running.acquire(timeout=5.0)
    assert work.started == ['a'] and q.counts() == (1, 2)
    for n in 'abc':
        work.release[n].set()
        assert handles['abc'.index(n)].done.wait(5.0)
    assert work.started == ['a', 'b', 'c'] and q.idle()


def test_beyond_max_goals_a_goal_is_refused_with_the_reason() -> None:
    q, work, run = make(cap=2)
    for n in 'ab':
        q.handle_accepted(FakeHandle(n, run))
    assert q.refusal() == '1 goals running and 1 waiting (max_goals 2)'
    q.close('model manager is not active')
    assert q.refusal() == 'model manager is not active'
    for n in 'ab':
        work.release[n].set()


def test_a_waiting_goal_cancelled_is_answered_at_once_and_skipped() -> None:
    q, work, run = make()
    a, b, c = (FakeHandle(n, run) for n in 'abc')
    for gh in (a, b, c):
        q.handle_accepted(gh)
    assert work.running.acquire(timeout=5.0)
    b.is_cancel_requested = True     # rclpy records the cancel after the callback accepts it
    assert q.cancel_callback(b) == CancelResponse.ACCEPT
    assert b.done.wait(5.0) and work.dropped == [('b', None)] and b.state == 'canceled'
    assert q.counts() == (1, 1), 'a still runs'
    work.release['a'].set()
    work.release['c'].set()
    assert c.done.wait(5.0) and work.started == ['a', 'c']
    # a cancel of the running goal is left to it (it sees is_cancel_requested)
    assert q.cancel_callback(c) == CancelResponse.ACCEPT
    assert work.dropped == [('b', None)]


def test_drop_queued_answers_every_waiting_goal_with_the_reason() -> None:
    q, work, run = make()
    handles = [FakeHandle(n, run) for n in 'abc']
    for gh in handles:
        q.handle_accepted(gh)
    assert work.running.acquire(timeout=5.0)
    assert q.drop_queued('deactivated') == 2
    assert all(h.done.wait(5.0) for h in handles[1:])
    assert sorted(work.dropped) == [('b', 'deactivated'), ('c', 'deactivated')]
    assert not q.wait_idle(0.05), 'a still runs'
    work.release['a'].set()
    assert q.wait_idle(5.0) and work.started == ['a']
