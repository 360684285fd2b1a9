"""Readiness of a block that works through the model manager (language, perception).

Such a block serves only while its model manager is alive (heartbeat), active on
`models/status` (with a model loaded, for a block that needs one) and its action server is
reachable; its heartbeat and BlockDescription say so, so the kernel waits rather than sending
goals that would fail.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional, Tuple

from rclpy.exceptions import InvalidHandle
from rclpy.node import Node
from sage_interfaces.msg import ModelStatus

from .action_call import Dependency


class ManagerReadiness:
    """Follows the model manager for one block. `check()` (a timer, heartbeats,
    `models/status`) logs a change once and calls `on_change` (republish the description and
    the heartbeat); one check at a time, so the last one out is never stale."""

    def __init__(self, node: Node, block: str, manager: Dependency,
                 server_ready: Callable[[], bool], action: str, on_change: Callable[[], None],
                 stopping: threading.Event, needs_loaded: bool = False) -> None:
        self._node = node
        self._block = block
        self._manager = manager
        self._server_ready = server_ready
        self._action = action
        self._on_change = on_change
        self._stopping = stopping
        self._needs_loaded = needs_loaded
        self.models: Optional[ModelStatus] = None   # the latest models/status
        self._ready: Tuple[bool, str] = (False, 'starting')
        self._lock = threading.Lock()
        self._check_lock = threading.Lock()

    def on_models(self, msg: ModelStatus) -> None:
        self.models = msg
        self.check()

    def evaluate(self) -> Tuple[bool, str]:
        """Whether the block can serve now, and why not in words."""
        ok, why = self._manager.state()
        if not ok:
            return False, why
        models = self.models
        if models is None:
            return False, 'no models/status from the model manager yet'
        if models.lifecycle_state != 'active':
            return False, f'model manager {models.lifecycle_state}'
        if self._needs_loaded and not models.loaded and not models.loading_role:
            return False, f'no model loaded ({models.error or "unknown"})'
        if not self._server_ready():
            return False, (f'model manager {self._action.rsplit("/", 1)[-1]} server not '
                           f'reachable on {self._node.resolve_topic_name(self._action)}')
        return True, ''

    @property
    def state(self) -> Tuple[bool, str]:
        """The last checked readiness ('shutting down' once the node stops)."""
        if self._stopping.is_set():
            return False, 'shutting down'
        with self._lock:
            return self._ready

    def check(self) -> None:
        try:
            self._check()
        except InvalidHandle:
            # A check that started just before destroy_node: the node's handles are going.
            if not self._stopping.is_set():
                raise

    def _check(self) -> None:
        with self._check_lock:
            if self._stopping.is_set():
                return
            ready = self.evaluate()
            with self._lock:
                changed, self._ready = ready != self._ready, ready
            if not changed:
                return
            if ready[0]:
                self._node.get_logger().info(f'model manager ready: {self._block} block serving')
            else:
                self._node.get_logger().warning(f'{self._block} block not ready: {ready[1]}')
            self._on_change()
