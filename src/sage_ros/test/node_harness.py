"""In-process node tests' harness: nodes under test plus a probe node on one executor."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, List, Tuple

import rclpy
import yaml
from rclpy.action import ActionClient
from rclpy.context import Context
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node

from sage_ros import graph, names
from sage_ros.core.models import LoadProgress
from sage_ros.cli.graph_runner import context_args, create_nodes
from sage_ros.nodes.common import RELIABLE, executor_threads
from sage_ros.nodes.model_manager import ModelManagerNode


def wait_for(cond: Callable[[], object], timeout: float = 30.0, what: str = 'condition') -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out waiting for {what}')
        time.sleep(0.01)


class Harness:
    """Nodes under test plus a probe node, spinning on one executor in a thread."""

    def __init__(self, params: dict, tmp: Path, specs: Tuple[graph.NodeSpec, ...]) -> None:
        pf = tmp / 'params.yaml'
        pf.write_text(yaml.safe_dump(params))
        self.context = Context()
        rclpy.init(args=context_args(names.DEFAULT_NAMESPACE, pf), context=self.context)
        self.nodes = create_nodes(specs, self.context)
        self.probe = Node('probe', context=self.context)
        self.executor = MultiThreadedExecutor(num_threads=executor_threads(len(specs) + 1),
                                              context=self.context)
        for n in [*self.nodes, self.probe]:
            self.executor.add_node(n)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def node(self, cls: type) -> Node:
        return next(n for n in self.nodes if isinstance(n, cls))

    def collect(self, msg_type: type, topic: str, qos: object = RELIABLE) -> List[Any]:
        got: List[Any] = []
        self.probe.create_subscription(msg_type, topic, got.append, qos)  # type: ignore[arg-type]
        return got

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=5.0)
        self.thread.join(timeout=5.0)
        for n in [*self.nodes, self.probe]:
            n.destroy_node()
        rclpy.try_shutdown(context=self.context)


def send_goal(client: ActionClient, goal: object, timeout: float = 60.0
              ) -> Tuple[bool, Any, List[Any]]:
    feedback: List[Any] = []
    assert client.wait_for_server(timeout_sec=10.0)
    sent = client.send_goal_async(goal, feedback_callback=lambda f: feedback.append(f.feedback))
    wait_for(sent.done, timeout, 'goal response')
    handle = sent.result()
    if not handle.accepted:
        return False, None, feedback
    res = handle.get_result_async()
    wait_for(res.done, timeout, 'result')
    # Feedback and result travel on separate channels: feedback published before the result
    # may still be on its way. Take the feedback once nothing new has come for a moment.
    settled_at, count = time.monotonic(), len(feedback)
    while time.monotonic() - settled_at < 0.3:
        time.sleep(0.02)
        if len(feedback) != count:
            settled_at, count = time.monotonic(), len(feedback)
    return True, res.result().result, feedback


class LoadGate:
    """Holds a load of `role` at its first weight read until `open()`: a load as long as the
    test wants, without a sleep in product code."""

    def __init__(self, node: ModelManagerNode, role: str) -> None:
        self.role = role
        self.held = threading.Event()
        self._open = threading.Event()
        node.load_listeners.append(self)

    def __call__(self, p: LoadProgress) -> None:
        if p.role == self.role and p.stage == 'weights' and not self._open.is_set():
            self.held.set()
            self._open.wait(30.0)

    def open(self) -> None:
        self._open.set()


def call(h: Harness, srv_type: Any, name: str, request: Any, timeout: float = 30.0) -> Any:
    """A service call from the probe node, waited for."""
    client = h.probe.create_client(srv_type, name)
    assert client.wait_for_service(timeout_sec=10.0)
    future = client.call_async(request)
    wait_for(future.done, timeout, f'{name} answer')
    return future.result()
