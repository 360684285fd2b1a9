"""Stopping the graph during a generation: every mode ends within 10 s, exit code 0, no trace.

`ros2 launch` sends one SIGINT to each node (then SIGTERM after 5 s); a terminal's Ctrl-C
signals the whole process group, so under launch a node gets two SIGINTs at once, and the second
used to land in the middle of its shutdown ("process has died ... exit code -2"). Real processes,
real signals, a tiny model generating 4000 tokens when the signal comes.
"""

from __future__ import annotations

import os
import sys
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict

import pytest
import yaml

from graph_support import (Output, Probe, domain, expected_nodes, kill_group, long_answer_params,
                           start_up)
from sage_ros import names

__all__ = ['domain']  # a fixture, used by name

pytestmark = pytest.mark.graph

STOP_S = 10.0   # the bound: signal -> every process of the graph gone


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.mark.parametrize('how', ['SIGINT', 'SIGTERM', 'terminal'])
@pytest.mark.parametrize('mode', ['one-process', 'processes'])
def test_a_signal_during_a_generation_stops_the_graph(how: str, mode: str, tmp_path: Path,
                                                      tiny_models: Dict[str, Path],
                                                      domain: int) -> None:
    params = tmp_path / 'long.yaml'
    params.write_text(yaml.safe_dump(long_answer_params(tiny_models)))
    proc = start_up(params, domain, *(['--processes'] if mode == 'processes' else []))
    output = Output(proc)
    probe = Probe(domain)
    try:
        probe.wait_ready(120)
        probe.wait(lambda: all(probe.alive(names.qualify(n)) for n, _ in expected_nodes()), 30,
                   'every node beating')
        oid = probe.send('hello there')
        lb = names.qualify(names.LANGUAGE_BLOCK)
        probe.wait(lambda: lb in probe.beats and probe.beats[lb].goals_active > 0, 60,
                   'the language block generating')
        probe.spin(1.0)
        assert probe.response_to(oid) is None, 'the answer came first: make it longer'
        signalled = time.monotonic()
        if how == 'terminal':
            # Ctrl-C in a terminal: SIGINT to the whole group, and the launcher forwards one.
            os.killpg(proc.pid, signal.SIGINT)
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)   # ignored ("already stopping"), or exited by now
        else:
            proc.send_signal(getattr(signal, how))
        try:
            proc.wait(STOP_S + 5)
        except subprocess.TimeoutExpired:
            pass
        took = time.monotonic() - signalled
        while group_alive(proc.pid) and time.monotonic() - signalled < STOP_S + 5:
            time.sleep(0.05)
        group_took = time.monotonic() - signalled
    finally:
        probe.close()
        left = group_alive(proc.pid)
        kill_group(proc)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        out = output.join()
    assert proc.returncode == 0, out
    assert took < STOP_S and group_took < STOP_S and not left, (took, group_took, out)
    assert 'Traceback' not in out and 'RCLError' not in out, out
    assert 'killed by SIGINT' not in out and 'exit code -2' not in out, out


def test_a_node_executable_stops_on_sigint_with_code_0(tmp_path: Path, domain: int,
                                                       tiny_params_file: Path) -> None:
    """A node as `ros2 run` / `ros2 launch` starts it: one SIGINT, exit 0, its own log line."""
    from graph_support import graph_env
    proc = subprocess.Popen(
        [sys.executable, '-m', 'sage_ros.nodes.kernel', '--ros-args', '-r', '__ns:=/sage',
         '--params-file', str(tiny_params_file)], env=graph_env(domain),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    output = Output(proc)
    probe = Probe(domain)
    try:
        probe.wait(lambda: probe.alive(names.qualify(names.KERNEL)), 60, 'the kernel beating')
        proc.send_signal(signal.SIGINT)
        proc.wait(STOP_S)
    finally:
        probe.close()
        kill_group(proc)
        proc.wait()
    out = output.join()
    assert proc.returncode == 0, out
    assert 'SIGINT: stopping' in out and 'Traceback' not in out, out


def test_stop_signals_take_the_first_signal_and_ignore_the_rest(
        capfd: pytest.CaptureFixture[str]) -> None:
    """In this process: no KeyboardInterrupt, ever; the first signal asks to stop."""
    from sage_ros.nodes.common import StopSignals
    stop = StopSignals('test').install()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 5
        while not stop.requested.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.requested.is_set() and stop.signal_name == 'SIGINT'
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        assert stop.signal_name == 'SIGINT'
    finally:
        stop.restore()
    err = capfd.readouterr().err
    assert '[test] SIGTERM: already stopping' in err or '[test] SIGINT: already stopping' in err
