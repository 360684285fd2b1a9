"""Heartbeats on the graph: every node sends one; nodes that depend on others watch them.

`HeartbeatPublisher` sends this node's `Heartbeat` every `heartbeat_period_s` from its own
callback group, so a node busy with goals still beats, and a killed or stopped process stops.
`LivenessWatch` keeps `core.liveness.LivenessMonitor` up to date and calls back when a node
goes silent for `liveness_timeout_s`, restarts, or comes back.
"""

from __future__ import annotations

import threading
import time
import uuid
import weakref
from typing import Callable, List, Optional, Tuple

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.clock import Clock, ClockType
from rclpy.exceptions import InvalidHandle
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sage_interfaces.msg import Heartbeat

from .. import names
from ..core.liveness import Beat, LivenessMonitor
from .common import declare

# Reliable, so a loaded machine does not drop beats and make a live node look dead.
HEARTBEAT_QOS = QoSProfile(depth=20, history=HistoryPolicy.KEEP_LAST,
                           reliability=ReliabilityPolicy.RELIABLE,
                           durability=DurabilityPolicy.VOLATILE)

# (ready, not_ready_reason, goals_active, goals_queued)
StatusFn = Callable[[], Tuple[bool, str, int, int]]


def steady_clock() -> Clock:
    """Liveness runs on steady time: a paused or replayed `/clock` must not stop heartbeats."""
    return Clock(clock_type=ClockType.STEADY_TIME)


def _always_ready() -> Tuple[bool, str, int, int]:
    return True, '', 0, 0


def declare_liveness_timeout(node: Node) -> float:
    return float(declare(node, 'liveness_timeout_s', 2.0,
                         'A node whose heartbeat is silent this long counts as gone (killed or '
                         'hung): its goals fail over [s]', read_only=True, min_value=0.2,
                         max_value=3600.0))


_INSTANCES: 'weakref.WeakKeyDictionary[Node, str]' = weakref.WeakKeyDictionary()
_INSTANCES_LOCK = threading.Lock()


def instance_id(node: Node) -> str:
    """This node object's heartbeat instance id: random, made once per node (a restarted node
    is a new object in a new process, so it has a new one)."""
    with _INSTANCES_LOCK:
        return _INSTANCES.setdefault(node, uuid.uuid4().hex[:12])


def requester(node: Node) -> Tuple[str, str]:
    """(fully qualified name, instance id) that `node` puts in the goals it sends, so the
    server can stop them when this node stops or restarts (Generate.requester, ...)."""
    return node.get_fully_qualified_name(), instance_id(node)


class HeartbeatPublisher:
    """Publishes this node's heartbeat; `status` says whether it serves, and its goal counts."""

    def __init__(self, node: Node, block: str = '', status: StatusFn = _always_ready) -> None:
        self._node = node
        self._block = block
        self._status = status
        self.instance_id = instance_id(node)
        self.period_s = float(declare(node, 'heartbeat_period_s', 0.5,
                                      'Period of this node\'s heartbeat on `heartbeat` [s]',
                                      read_only=True, min_value=0.05, max_value=60.0))
        self._pub = node.create_publisher(Heartbeat, names.HEARTBEAT, HEARTBEAT_QOS)
        self._fqn = node.get_fully_qualified_name()
        node.create_timer(self.period_s, self.publish,
                          callback_group=MutuallyExclusiveCallbackGroup(), clock=steady_clock())

    def publish_last(self) -> None:
        """A last heartbeat on the way out (its status says not ready), so dependants react now
        rather than after liveness_timeout_s; nothing if the context is already shut down."""
        try:
            self.publish()
        except Exception:  # noqa: BLE001 - the context may be gone: nothing to say
            pass

    def publish(self) -> None:
        """Send a heartbeat now (also on every change of readiness, so it shows at once)."""
        ready, reason, active, queued = self._status()
        try:
            self._pub.publish(Heartbeat(
                stamp=self._node.get_clock().now().to_msg(), node=self._fqn,
                instance_id=self.instance_id, block=self._block, ready=ready,
                not_ready_reason=reason, goals_active=active, goals_queued=queued,
                period_s=self.period_s))
        except InvalidHandle:  # a goal that ended while the node was being destroyed
            pass


GoneFn = Callable[[Beat], None]
EventFn = Callable[[str, Beat], None]   # (core.liveness NEW | RESTARTED | BACK, beat)


class LivenessWatch:
    """Watches heartbeats; `on_gone` for a node gone silent, `on_event` for new, restarted, back.

    Callbacks run in the watch's own callback group; take your node's lock inside them.
    """

    def __init__(self, node: Node, timeout_s: float, on_gone: Optional[GoneFn] = None,
                 on_event: Optional[EventFn] = None) -> None:
        period = min(0.25, timeout_s / 4)
        self.monitor = LivenessMonitor(timeout_s, confirm_s=period)
        self._lock = threading.Lock()   # the monitor is read from other callback groups
        self._on_gone: List[GoneFn] = [on_gone] if on_gone else []
        self._on_event: List[EventFn] = [on_event] if on_event else []
        group = MutuallyExclusiveCallbackGroup()
        node.create_subscription(Heartbeat, names.HEARTBEAT, self._on_beat, HEARTBEAT_QOS,
                                 callback_group=group)
        node.create_timer(period, self._check, callback_group=group, clock=steady_clock())

    def _on_beat(self, msg: Heartbeat) -> None:
        beat = Beat(node=msg.node, instance_id=msg.instance_id, block=msg.block,
                    ready=msg.ready, not_ready_reason=msg.not_ready_reason,
                    goals_active=msg.goals_active, goals_queued=msg.goals_queued,
                    period_s=msg.period_s)
        with self._lock:
            event = self.monitor.beat(beat, time.monotonic())
        if event is not None:
            for fn in self._on_event:
                fn(event, beat)

    def _check(self) -> None:
        with self._lock:
            gone = self.monitor.expire(time.monotonic())
        for beat in gone:
            for fn in self._on_gone:
                fn(beat)

    def alive(self, node: str) -> Optional[Beat]:
        with self._lock:
            return self.monitor.alive(node)

    def block(self, name: str) -> Optional[Beat]:
        with self._lock:
            return self.monitor.block(name)

    def stopped(self, node: str, instance_id: str) -> str:
        """Why that instance of `node` stopped ('' = it runs or was never seen)."""
        with self._lock:
            return self.monitor.stopped(node, instance_id)

    def seen_at(self, node: str) -> float:
        """Monotonic time of the node's latest heartbeat."""
        with self._lock:
            return self.monitor.seen_at(node)
