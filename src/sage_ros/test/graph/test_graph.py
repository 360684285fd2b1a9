"""The graph as separate processes on its own ROS domain: contract, console, one-process parity."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
import yaml
from rclpy.action import get_action_names_and_types

from conftest import params_for
from graph_support import SAGE, Probe, domain, expected_nodes, graph_env, start_up, stop
from sage_ros import names

__all__ = ['domain']  # a fixture, used by name

pytestmark = pytest.mark.graph


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
    # The console waits for the graph to be ready (a conversation block serves); the complex
    # turn below needs the reasoning block serving too.
    probe.wait(lambda: probe.state is not None and 'reasoning' in probe.state.blocks, 120,
               'the reasoning block serving')
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
        # Hidden nodes (a leading underscore, left out by `ros2 node list`): `sage up`'s own
        # lifecycle driver.
        assert {n for n in probe.node_names() if n[1] == '/robot1'
                and not n[0].startswith('_')} == expected_nodes('/robot1')
    finally:
        probe.close()
        out = stop(proc)
    assert proc.returncode == 0 and 'Traceback' not in out, out


@pytest.mark.parametrize('text, expected', [
    ('a: [1,\n', 'is not valid YAML (line 2, column 1)'),
    ('- 1\n- 2\n', 'must map node names to their parameters'),
    ('/**/kernel: 5\n', "entry '/**/kernel' must be a mapping"),
])
@pytest.mark.parametrize('mode', [[], ['--processes']])
def test_a_bad_parameters_file_is_one_line_before_anything_starts(
        text: str, expected: str, mode: List[str], tmp_path: Path, domain: int) -> None:
    bad = tmp_path / 'bad.yaml'
    bad.write_text(text)
    p = subprocess.run([*SAGE, 'up', '--params-file', str(bad), *mode], env=graph_env(domain),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'sage: error: parameters file {bad}'), lines
    assert expected in lines[0]


def test_text_sensor_on_a_pipe_nobody_writes_says_so_and_publishes_typed_observations(
        tiny_params_file: Path, domain: int) -> None:
    """As under `ros2 launch`: stdin is a pipe that stays open and silent. The sensor says once
    how to talk to SAGE instead, keeps beating, publishes what does arrive as TextObservation
    with its own ids and source, and stops on SIGINT with code 0."""
    from sage_interfaces.msg import TextObservation

    from graph_support import RELIABLE, Output, kill_group
    proc = subprocess.Popen(
        [sys.executable, '-m', 'sage_ros.nodes.text_sensor', '--ros-args', '-r', '__ns:=/sage',
         '--params-file', str(tiny_params_file)], env=graph_env(domain),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    output = Output(proc)
    probe = Probe(domain)
    seen: List[TextObservation] = []
    probe.node.create_subscription(TextObservation, names.qualify(names.OBSERVATIONS_TEXT),
                                   seen.append, RELIABLE)
    fqn = names.qualify(names.TEXT_SENSOR)
    try:
        probe.wait(lambda: probe.alive(fqn), 60, 'the text sensor beating')
        probe.wait(lambda: 'nothing arrived on it' in output.text(), 30, 'the notice')
        assert 'sage chat --attach' in output.text()
        assert probe.alive(fqn)   # reading stdin blocks nothing
        assert proc.stdin is not None
        proc.stdin.write('hello robot\n\nsecond line\n')
        proc.stdin.flush()
        probe.wait(lambda: len(seen) == 2, 30, 'two observations')
        assert [o.text for o in seen] == ['hello robot', 'second line']
        assert {o.source for o in seen} == {'text_sensor'}
        ids = [o.observation_id for o in seen]
        assert len(set(ids)) == 2 and all(i.startswith('text_sensor/') for i in ids)
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
    finally:
        probe.close()
        kill_group(proc)
        proc.wait()
    out = output.join()
    assert proc.returncode == 0, out
    assert out.count('nothing arrived on it') == 1 and 'Traceback' not in out, out
