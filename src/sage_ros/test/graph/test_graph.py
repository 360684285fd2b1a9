"""The graph as separate processes on its own ROS domain: contract, console, launch parity."""

from __future__ import annotations

import json
import os
import runpy
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Set, Tuple

import pytest
import yaml
import rclpy
from rclpy.action import get_action_names_and_types
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node

from conftest import params_for
from sage_ros import graph, names

pytestmark = pytest.mark.graph
SAGE = [sys.executable, '-m', 'sage_ros.cli.main']


def graph_env(domain: int) -> Dict[str, str]:
    env = dict(os.environ, ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')
    return env


@pytest.fixture
def domain() -> int:
    return 10 + (os.getpid() + int(time.time())) % 90


class Probe:
    def __init__(self, domain: int) -> None:
        os.environ['ROS_DOMAIN_ID'] = str(domain)
        os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
        self.context = Context()
        rclpy.init(context=self.context)
        self.node = Node('graph_probe', context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)

    def wait(self, cond: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f'timed out waiting for {what}')
            self.executor.spin_once(timeout_sec=0.1)

    def node_names(self) -> Set[Tuple[str, str]]:
        return set(self.node.get_node_names_and_namespaces())

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'OFF'
        os.environ.pop('ROS_DOMAIN_ID', None)


def start_up(params: Path, domain: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([*SAGE, 'up', '--params-file', str(params), *extra],
                            env=graph_env(domain), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop(proc: subprocess.Popen) -> str:
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


def expected_nodes(ns: str = names.DEFAULT_NAMESPACE) -> Set[Tuple[str, str]]:
    return {(s.name, ns) for s in graph.PROFILES['demo'].nodes}


@pytest.fixture
def graph_processes(tmp_path: Path, tiny_models: Dict[str, Path],
                    domain: int) -> Iterator[Tuple[Probe, subprocess.Popen]]:
    # Every complex request goes to the reasoning block, whatever its salience.
    params = tmp_path / 'graph.yaml'
    params.write_text(yaml.safe_dump(params_for(
        tiny_models, **{'kernel:routing.reasoning_min_salience': 0.0})))
    proc = start_up(params, domain, '--processes')
    probe = Probe(domain)
    try:
        yield probe, proc
    finally:
        probe.close()
        out = stop(proc)
        assert 'Traceback' not in out, out


def test_processes_expose_the_whole_contract(graph_processes: Tuple[Probe, subprocess.Popen]) -> None:
    probe, proc = graph_processes
    probe.wait(lambda: expected_nodes() <= probe.node_names(), 60, 'all nodes')
    tables: Dict[str, Dict[str, List[str]]] = {}

    def contract_visible() -> bool:
        tables.update(topic=dict(probe.node.get_topic_names_and_types()),
                      service=dict(probe.node.get_service_names_and_types()),
                      action=dict(get_action_names_and_types(probe.node)))
        return all(names.qualify(n) in tables[k] for k, n, _ in names.CONTRACT)
    probe.wait(contract_visible, 30, 'every contract name')
    for kind, rel, type_name in names.CONTRACT:
        assert tables[kind][names.qualify(rel)] == [type_name], (kind, rel)
    # The model manager is a lifecycle node.
    assert '/sage/model_manager/get_state' in tables['service']
    assert proc.poll() is None


def test_console_attaches_and_answers_a_script(graph_processes: Tuple[Probe, subprocess.Popen],
                                               domain: int) -> None:
    probe, _ = graph_processes
    probe.wait(lambda: expected_nodes() <= probe.node_names(), 60, 'all nodes')
    out = subprocess.run([*SAGE, 'chat', '--attach', '--script', '-', '--json'],
                         input='hello\nDesign a home for a robot\n', env=graph_env(domain),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    turns = [json.loads(line) for line in out.stdout.splitlines()]
    assert [t['input'] for t in turns] == ['hello', 'Design a home for a robot']
    for t in turns:
        assert {'input', 'response', 'model', 'complexity', 'latency_s', 'swapped'} <= t.keys()
        assert t['status'] == 'ok' and t['latency_s'] > 0
    # A simple turn goes to the language block; a complex one to the reasoning block, whose
    # steps run through the language block (the integration step on the large model).
    assert [(t['block'], t['model'], t['complexity'], t['swapped']) for t in turns] == [
        ('language', 'tiny-small', 'simple', False), ('reasoning', 'tiny-large', 'complex', True)]
    assert 'attached to the SAGE graph' in out.stderr


def test_sage_up_in_one_process_runs_the_same_node_set(tiny_params_file: Path, domain: int) -> None:
    proc = start_up(tiny_params_file, domain, '--namespace', '/robot1')
    probe = Probe(domain)
    try:
        probe.wait(lambda: expected_nodes('/robot1') <= probe.node_names(), 60, 'all nodes')
        assert {n for n in probe.node_names() if n[1] == '/robot1'} == expected_nodes('/robot1')
    finally:
        probe.close()
        out = stop(proc)
    assert proc.returncode == 0 and 'Traceback' not in out, out


class _Recorded:
    """Stands in for a launch_ros action class and records how the launch file built it."""

    made: List[Tuple[str, Dict[str, object]]] = []

    def __init__(self, *args: object, **kwargs: object) -> None:
        if args:  # DeclareLaunchArgument(name, ...)
            kwargs['name'] = args[0]
        _Recorded.made.append((type(self).__name__, kwargs))


def _launch_stand_ins() -> Dict[str, types.ModuleType]:
    """`launch` and `launch_ros` are not installable from PyPI: record what the files build."""
    mods = {n: types.ModuleType(n) for n in ('launch', 'launch.actions', 'launch.substitutions',
                                             'launch_ros', 'launch_ros.actions')}
    mods['launch'].LaunchDescription = lambda actions: list(actions)  # type: ignore[attr-defined]
    mods['launch.actions'].DeclareLaunchArgument = type('DeclareLaunchArgument', (_Recorded,), {})  # type: ignore[attr-defined]
    mods['launch.substitutions'].LaunchConfiguration = lambda name: f'$({name})'  # type: ignore[attr-defined]
    mods['launch_ros.actions'].Node = type('Node', (_Recorded,), {})  # type: ignore[attr-defined]
    mods['launch_ros.actions'].LifecycleNode = type('LifecycleNode', (_Recorded,), {})  # type: ignore[attr-defined]
    return mods


@pytest.mark.parametrize('profile', sorted(graph.PROFILES))
def test_launch_files_start_the_profile_node_set(profile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, mod in _launch_stand_ins().items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, 'sage_ros.launch_description', raising=False)
    _Recorded.made = []
    launch_file = graph.share_dir() / 'launch' / f'{profile}.launch.py'
    runpy.run_path(str(launch_file))['generate_launch_description']()
    nodes = {(kw['name'], kw['executable'], cls == 'LifecycleNode')
             for cls, kw in _Recorded.made if cls != 'DeclareLaunchArgument'}
    assert nodes == {(s.name, s.executable, s.lifecycle) for s in graph.PROFILES[profile].nodes}
    args = {kw['name']: kw['default_value'] for cls, kw in _Recorded.made
            if cls == 'DeclareLaunchArgument'}
    assert args['namespace'] == names.DEFAULT_NAMESPACE
    assert Path(str(args['params_file'])) == graph.params_path(graph.PROFILES[profile])
    for cls, kw in _Recorded.made:
        if cls != 'DeclareLaunchArgument':
            assert kw['namespace'] == '$(namespace)' and kw['parameters'] == ['$(params_file)']
            # the executable exists as a console script of the package
            assert str(kw['executable']) in (graph.share_dir() / 'setup.py').read_text()
