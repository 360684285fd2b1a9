"""Graph tests' helpers: the graph as real processes on a ROS domain of its own, and a probe.

Importable as `graph_support` from every test tier (like `node_harness`). The `domain` fixture
holds a lock file per domain id for the test's lifetime, so tests running at the same time on
one machine (several pytest sessions) never share a domain.
"""

from __future__ import annotations

import fcntl
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Set, Tuple

import pytest
import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from sage_ros import graph, names

SAGE = [sys.executable, '-m', 'sage_ros.cli.main']
DOMAINS = range(10, 100)


def graph_env(domain: int) -> Dict[str, str]:
    """The environment of a graph process: its own domain, discovery on localhost only."""
    return dict(os.environ, ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')


def claim_domain() -> Tuple[int, IO[str]]:
    """A ROS domain id no other test on this machine holds; keep the returned file open while
    using it (closing it releases the domain)."""
    lock_dir = Path(tempfile.gettempdir()) / 'sage_ros_test_domains'
    lock_dir.mkdir(exist_ok=True)
    ids = list(DOMAINS)
    random.shuffle(ids)
    for d in ids:
        f = open(lock_dir / f'{d}.lock', 'w')
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        return d, f
    raise RuntimeError('every test ROS domain id is in use')


@pytest.fixture
def domain() -> Iterator[int]:
    d, lock = claim_domain()
    try:
        yield d
    finally:
        lock.close()


LATCHED = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST,
                     reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
RELIABLE = QoSProfile(depth=100, history=HistoryPolicy.KEEP_LAST,
                      reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.VOLATILE)
BEST_EFFORT = QoSProfile(depth=50, history=HistoryPolicy.KEEP_LAST,
                         reliability=ReliabilityPolicy.BEST_EFFORT,
                         durability=DurabilityPolicy.VOLATILE)


class Probe:
    """A node of the test on the graph's domain: sees the graph, its responses, kernel state and
    heartbeats, and sends typed observations. Call `wait` (it spins) or `spin` to take them in."""

    def __init__(self, domain: int, namespace: str = names.DEFAULT_NAMESPACE) -> None:
        from sage_interfaces.msg import Heartbeat, KernelState, Response, TextObservation
        os.environ['ROS_DOMAIN_ID'] = str(domain)
        os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
        self.namespace = namespace
        self.context = Context()
        rclpy.init(context=self.context)
        self.node = Node('graph_probe', context=self.context)   # outside the graph's namespace
        q = self.fqn
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.responses: List[Response] = []
        self.state: Optional[KernelState] = None
        self.beats: Dict[str, Heartbeat] = {}        # latest heartbeat per node
        self.beat_seen: Dict[str, float] = {}        # monotonic time of it
        self.node.create_subscription(Response, q(names.RESPONSE), self.responses.append, RELIABLE)
        self.node.create_subscription(KernelState, q(names.STATE), self._on_state, LATCHED)
        self.node.create_subscription(Heartbeat, q(names.HEARTBEAT), self._on_beat, BEST_EFFORT)
        self._obs = self.node.create_publisher(TextObservation, q(names.OBSERVATIONS_TEXT), RELIABLE)
        self._sent = 0

    def _on_state(self, msg: object) -> None:
        self.state = msg

    def _on_beat(self, msg: object) -> None:
        self.beats[msg.node] = msg  # type: ignore[attr-defined]
        self.beat_seen[msg.node] = time.monotonic()  # type: ignore[attr-defined]

    def spin(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.executor.spin_once(timeout_sec=min(0.1, max(0.0, deadline - time.monotonic())))

    def wait(self, cond: Callable[[], object], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f'timed out waiting for {what}')
            self.executor.spin_once(timeout_sec=0.1)

    def node_names(self) -> Set[Tuple[str, str]]:
        return set(self.node.get_node_names_and_namespaces())

    def ready(self) -> bool:
        """The kernel says the graph answers (KernelState.ready)."""
        return self.state is not None and bool(self.state.ready)

    def wait_ready(self, timeout: float = 120.0) -> None:
        self.wait(self.ready, timeout, 'KernelState.ready (last reason: '
                  f'{self.state.ready_reason if self.state is not None else "no state yet"})')

    def alive(self, node: str, within_s: float = 2.0) -> bool:
        """A heartbeat from `node` (fully qualified) within the last `within_s` seconds."""
        seen = self.beat_seen.get(node)
        return seen is not None and time.monotonic() - seen < within_s

    def fqn(self, name: str) -> str:
        return names.qualify(name, self.namespace)

    def send(self, text: str, source: str = 'graph_probe') -> str:
        """Publish a TextObservation; returns its observation id."""
        from sage_interfaces.msg import TextObservation
        self._sent += 1
        oid = f'probe-{os.getpid()}/{self._sent}'
        msg = TextObservation(observation_id=oid, source=source, text=text)
        msg.header.stamp = self.node.get_clock().now().to_msg()
        self._obs.publish(msg)
        return oid

    def response_to(self, observation_id: str) -> Optional[Any]:
        for r in self.responses:
            if r.observation_id == observation_id:
                return r
        return None

    def wait_response(self, observation_id: str, timeout: float) -> Any:
        self.wait(lambda: self.response_to(observation_id) is not None, timeout,
                  f'a response to {observation_id}')
        r = self.response_to(observation_id)
        assert r is not None
        return r

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'OFF'
        os.environ.pop('ROS_DOMAIN_ID', None)


class Output:
    """Collects a process's merged stdout/stderr on a thread, so the pipe never fills and the
    test can look at what it printed so far (`text`) while it runs."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: List[str] = []
        self._lock = threading.Lock()
        assert proc.stdout is not None
        self._thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._lock:
                self.lines.append(line)

    def text(self) -> str:
        with self._lock:
            return ''.join(self.lines)

    def join(self, timeout: float = 5.0) -> str:
        self._thread.join(timeout)
        return self.text()


def child_pid(output: Output, name: str) -> int:
    """The pid of node `name` as `sage up --processes` last reported starting it."""
    pid = 0
    for line in output.text().splitlines():
        m = re.search(rf'\[sage up\] started {re.escape(name)}(?: again)? \(pid (\d+)\)', line)
        if m:
            pid = int(m.group(1))
    if not pid:
        raise AssertionError(f'sage up never said it started {name}')
    return pid


def start_up(params: Path, domain: int, *extra: str,
             env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
    """`sage up --params-file PARAMS EXTRA...` on `domain`, in a process group of its own (so a
    test can signal the whole group, as a terminal does), stdout and stderr merged."""
    return subprocess.Popen([*SAGE, 'up', '--params-file', str(params), *extra],
                            env={**graph_env(domain), **(env or {})}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group `start_up` made (the graph and every child), if still there."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def stop(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 30.0,
         output: Optional[Output] = None) -> str:
    """Send `sig` to the graph's main process, wait for it to exit (killing its whole group after
    `timeout`), and return what it printed."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        if output is not None:
            proc.wait(timeout=timeout)
        else:
            out, _ = proc.communicate(timeout=timeout)
            return out
    except subprocess.TimeoutExpired:
        kill_group(proc)
        if output is None:
            out, _ = proc.communicate()
            return out
        proc.wait()
    kill_group(proc)   # children left behind, if any, never outlive the test
    return output.join() if output is not None else ''


def long_answer_params(models: Dict[str, Path], tokens: int = 4000,
                       overrides: Optional[Dict[str, object]] = None) -> dict:
    """`conftest.params_for` with answers as long as `tokens` (the tiny models never stop
    early): enough ATP and context for them, so a test can act in the middle of a generation."""
    from conftest import params_for
    params = params_for(models, **{
        'kernel:atp.capacity': float(tokens),
        'kernel:atp.answer_tokens': tokens,
        'kernel:routing.reasoning_grant': float(tokens) / 2,
        'reasoning_block:tokens.decompose': max(96, tokens // 8),
        'reasoning_block:tokens.solve': max(64, tokens // 8),
        'reasoning_block:tokens.integrate': max(160, tokens // 4),
        **(overrides or {})})
    mm = params['/**/model_manager']['ros__parameters']
    for role in models:
        mm['models'][role].update(max_new_tokens=tokens, context_window=tokens + 1024)
    return params


def expected_nodes(ns: str = names.DEFAULT_NAMESPACE,
                   profile: str = 'demo') -> Set[Tuple[str, str]]:
    return {(s.name, ns) for s in graph.PROFILES[profile].nodes}
