"""The console and the kernel with real processes: answers matched by observation id, two
consoles side by side, a console fed from a live pipe, an attached console across a kernel
kill -9 and restart, and a burst of 1,000 observations that loses none without a response.

The graph runs as one process per node (as `ros2 launch` starts it), so the test can kill the
kernel alone and start it again.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Optional

import pytest
import yaml
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from conftest import params_for
from graph_support import SAGE, Probe, domain, graph_env
from sage_ros import graph

__all__ = ['domain']  # a fixture, used by name

pytestmark = pytest.mark.graph

# A burst publisher and reader: reliable, keep the last 1,000, as the kernel's input is.
DEEP = QoSProfile(depth=1000, history=HistoryPolicy.KEEP_LAST,
                  reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)
NODES = (graph.MODEL_MANAGER, graph.LANGUAGE_BLOCK, graph.KERNEL)


class NodeProcesses:
    """The text path, one process per node, each in its own process group, logs to files."""

    def __init__(self, params: Path, domain: int, logs: Path) -> None:
        self.params, self.domain, self.logs = params, domain, logs
        self.procs: Dict[str, subprocess.Popen] = {}
        self.starts: Dict[str, int] = {}
        for spec in NODES:
            self.start(spec)

    def start(self, spec: graph.NodeSpec) -> subprocess.Popen:
        n = self.starts[spec.name] = self.starts.get(spec.name, 0) + 1
        log = open(self.logs / f'{spec.name}.{n}.log', 'w')
        cmd = [sys.executable, '-m', 'sage_ros.nodes.launcher', spec.executable,
               *graph.ros_args(spec, '/sage', [self.params])]
        proc = subprocess.Popen(cmd, env=graph_env(self.domain), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs[spec.name] = proc
        return proc

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def log(self, name: str) -> str:
        return '\n'.join(p.read_text() for p in sorted(self.logs.glob(f'{name}.*.log')))

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + 15.0
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


class Console:
    """`sage chat --attach --script - --json` fed line by line through a pipe."""

    def __init__(self, domain: int) -> None:
        self.proc = subprocess.Popen([*SAGE, 'chat', '--attach', '--script', '-', '--json',
                                      '--ready-timeout', '120', '--turn-timeout', '120'],
                                     env=graph_env(domain), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.lines: 'queue.Queue[str]' = queue.Queue()
        self.err: List[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        threading.Thread(target=self._read, args=(self.proc.stdout, self.lines.put),
                         daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.err.append),
                         daemon=True).start()

    @staticmethod
    def _read(stream: IO[str], put: Any) -> None:
        for line in stream:
            put(line)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + '\n')
        self.proc.stdin.flush()

    def answer(self, timeout: float = 90.0) -> Dict[str, Any]:
        try:
            return json.loads(self.lines.get(timeout=timeout))
        except queue.Empty:
            raise AssertionError(f'no answer within {timeout:.0f} s; console said: '
                                 f'{"".join(self.err)}') from None

    def close(self, timeout: float = 30.0) -> int:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f'the console did not end: {"".join(self.err)}') from None


@pytest.fixture
def text_path(tmp_path: Path, tiny_models: Dict[str, Path],
              domain: int) -> Iterator[NodeProcesses]:
    params = tmp_path / 'graph.yaml'
    params.write_text(yaml.safe_dump(params_for(tiny_models, **{'kernel:max_pending': 16})))
    logs = tmp_path / 'logs'
    logs.mkdir()
    nodes = NodeProcesses(params, domain, logs)
    try:
        yield nodes
    finally:
        nodes.stop()
        for name in nodes.procs:
            assert 'Traceback' not in nodes.log(name), nodes.log(name)


def ready_probe(domain: int, timeout: float = 120.0) -> Probe:
    probe = Probe(domain)
    probe.wait_ready(timeout)
    return probe


def test_two_consoles_each_get_only_their_own_answers(text_path: NodeProcesses,
                                                      domain: int) -> None:
    ready_probe(domain).close()
    a, b = Console(domain), Console(domain)
    try:
        for c in (a, b):
            c.send('hello robot')                      # the same words from both
        got = [a.answer(), b.answer()]
        for c in (a, b):
            c.send('where is the red cup?')
        got += [a.answer(), b.answer()]
        assert [a.close(), b.close()] == [0, 0]
    finally:
        for c in (a, b):
            if c.proc.poll() is None:
                os.killpg(c.proc.pid, signal.SIGKILL)
    ids = [t['observation_id'] for t in got]
    assert len(set(ids)) == 4
    prefix_a, prefix_b = ids[0].split('/')[0], ids[1].split('/')[0]
    assert prefix_a != prefix_b
    assert [i.split('/')[0] for i in ids] == [prefix_a, prefix_b, prefix_a, prefix_b]
    assert [t['input'] for t in got] == ['hello robot'] * 2 + ['where is the red cup?'] * 2
    assert all(t['status'] == 'ok' and t['source'] == 'console' for t in got)
    assert all({'truncated', 'observation_id', 'source'} <= t.keys() for t in got)


def test_a_console_fed_by_a_live_pipe_answers_each_line_as_it_comes(
        text_path: NodeProcesses, domain: int) -> None:
    c = Console(domain)
    try:
        c.send('hello')
        first = c.answer(120)             # answered while the pipe is still open
        assert first['input'] == 'hello' and first['status'] == 'ok'
        c.send('and how are you?')
        second = c.answer()
        assert second['input'] == 'and how are you?' and second['turn_id'] > first['turn_id']
        assert c.close() == 0
    finally:
        if c.proc.poll() is None:
            os.killpg(c.proc.pid, signal.SIGKILL)


def test_an_attached_console_keeps_working_across_a_kernel_kill_and_restart(
        text_path: NodeProcesses, domain: int) -> None:
    c = Console(domain)
    try:
        c.send('hello')
        before = c.answer(120)
        assert before['status'] == 'ok'
        text_path.kill('kernel')
        c.send('are you still there?')        # sent while no kernel runs: sent again later
        time.sleep(1.0)
        text_path.start(graph.KERNEL)
        after = c.answer(120)
        assert after['input'] == 'are you still there?' and after['status'] == 'ok'
        assert after['observation_id'] != before['observation_id']
        # Turn ids of the new kernel continue above the old one's.
        assert after['turn_id'] > before['turn_id']
        c.send('good')
        assert c.answer()['status'] == 'ok'
        assert c.close() == 0
        # Whether the console saw the kernel silent before the new one answered depends on
        # timing; either way it said the turn was sent again.
        err = ''.join(c.err)
        assert ('the turn goes again when it is back' in err
                or 'the kernel restarted; sending the turn again' in err), err
    finally:
        if c.proc.poll() is None:
            os.killpg(c.proc.pid, signal.SIGKILL)


def test_a_burst_of_1000_observations_gets_1000_responses(text_path: NodeProcesses,
                                                          domain: int) -> None:
    from sage_interfaces.msg import Response, TextObservation
    probe = ready_probe(domain)
    try:
        got: Dict[str, Response] = {}

        def on_response(r: Response) -> None:
            got.setdefault(r.observation_id, r)
        probe.node.create_subscription(Response, probe.fqn('response'), on_response, DEEP)
        pub = probe.node.create_publisher(TextObservation, probe.fqn('observations/text'), DEEP)
        probe.wait(lambda: pub.get_subscription_count() > 0, 30, 'the kernel hears the burst')
        probe.spin(1.0)       # the kernel's response publisher matched to the new reader
        ids = [f'burst/{i}' for i in range(1000)]
        for i, oid in enumerate(ids):
            pub.publish(TextObservation(observation_id=oid, source='burst',
                                        text=f'reading number {i}'))
        try:
            probe.wait(lambda: set(ids) <= set(got), 300, 'a response to every observation')
        except AssertionError:
            missing = [i for i in ids if i not in got]
            state = probe.state
            raise AssertionError(
                f'{len(missing)} of 1000 unanswered (first {missing[:5]}); kernel state: '
                f'observations {state.observations_total if state else "?"}, rejected '
                f'{state.rejected_total if state else "?"}, running '
                f'{state.active_dispatches if state else "?"}; log tail: '
                f'{text_path.log("kernel")[-3000:]}') from None
        answered = [got[i] for i in ids if got[i].status == Response.STATUS_OK]
        rejected = [got[i] for i in ids if got[i].status == Response.STATUS_REJECTED]
        # The queue holds 16: the rest is rejected, but for the turns served while the burst
        # was still arriving (a few dozen, depending on the machine's speed).
        assert len(answered) >= 16 and len(rejected) >= 1000 - 100
        # Every one not served says why: most were dropped from the full queue of 16. (A goal
        # can also fail, e.g. when a loaded machine delays the block's heartbeat; it says why.)
        assert all(got[i].error for i in ids if got[i].status != Response.STATUS_OK)
        assert all(r.error.startswith('dropped: 16 observations already waiting')
                   or r.error.startswith('expired after waiting') for r in rejected)
        assert all(got[i].source == 'burst' for i in ids)
    finally:
        probe.close()
