"""On the robot: the colcon-built packages under the real `ros2 launch`, driven with `ros2`.

Tiny random models (conftest.tiny_models), the keyword router and the n-gram embedder: the
structure of what the tools show is asserted, never the text of an answer.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator

import pytest

from graph_support import Probe
from robot_support import (Launch, RobotShell, cpu_override, robot_domain, shell,  # noqa: F401
                           workspace, write_params)
from sage_ros import graph

pytestmark = pytest.mark.robot

NS = '/robot1'
STOP_WITHIN_S = 10.0


def tiny_demo_params(models: Dict[str, Path], **overrides: object) -> dict:
    from conftest import params_for
    params = params_for(models, **overrides)
    params['/**/text_sensor']['ros__parameters']['source'] = 'topic'   # nobody types here
    return params


@pytest.fixture
def demo(shell: RobotShell, tiny_models: Dict[str, Path], tmp_path: Path) -> Iterator[Launch]:
    params = write_params(tmp_path / 'tiny.yaml', tiny_demo_params(tiny_models))
    launch = Launch(shell, 'demo.launch.py', f'namespace:={NS}', f'params_file:={params}')
    yield launch
    launch.close()


def wait_ready(shell: RobotShell, launch: Launch, namespace: str = NS,
               timeout: float = 120.0) -> None:
    probe = Probe(shell.domain, namespace)
    try:
        probe.wait_ready(timeout)
    except AssertionError as exc:
        raise AssertionError(f'{exc}\n{launch.text()[-3000:]}') from None
    finally:
        probe.close()


def assert_clean_stop(launch: Launch, executables: list[str]) -> None:
    took = launch.interrupt(timeout=STOP_WITHIN_S + 20.0)
    out = launch.output.join()
    assert launch.proc.returncode == 0, out[-3000:]
    assert took < STOP_WITHIN_S, f'ros2 launch took {took:.1f} s to stop:\n{out[-3000:]}'
    assert 'process has died' not in out, out[-3000:]
    for exe in executables:
        assert f'[{exe}-' in out and any(
            f'[INFO] [{exe}-' in line and 'process has finished cleanly' in line
            for line in out.splitlines()), f'{exe} did not exit with code 0:\n{out[-3000:]}'


def test_demo_launch_answers_and_obeys_the_ros2_tools(shell: RobotShell, demo: Launch) -> None:
    wait_ready(shell, demo)
    expected = {f'{NS}/{s.name}' for s in graph.PROFILES['demo'].nodes}
    nodes = shell.node_list(expected)
    assert expected <= nodes, nodes

    # A turn in on text_in, the answer out on response, as `ros2 topic` sees them.
    echo = shell.start('ros2', 'topic', 'echo', '--once', f'{NS}/response',
                       'sage_interfaces/msg/Response')
    try:
        deadline = time.monotonic() + 90.0
        while echo.poll() is None and time.monotonic() < deadline:
            shell.run('ros2', 'topic', 'pub', '--once', '-w', '1', f'{NS}/text_in',
                      'std_msgs/msg/String', '{data: hello robot}')
            try:
                echo.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                pass   # echo not matched yet when the turn went out: say it again
        out, _ = echo.communicate(timeout=5.0)
    finally:
        if echo.poll() is None:
            echo.kill()
            echo.communicate()
    assert 'input_text: hello robot' in out and 'status: 0' in out, out
    assert 'block: language' in out and 'model: tiny-' in out, out

    # The model manager's lifecycle, driven by hand after launch configured and activated it.
    mm = f'{NS}/model_manager'
    assert shell.run('ros2', 'lifecycle', 'get', mm).stdout.startswith('active')
    assert 'Transitioning successful' in shell.run('ros2', 'lifecycle', 'set', mm,
                                                   'deactivate').stdout
    time.sleep(1.0)   # launch must not activate it again behind the user's back
    assert shell.run('ros2', 'lifecycle', 'get', mm).stdout.startswith('inactive')
    assert 'Transitioning successful' in shell.run('ros2', 'lifecycle', 'set', mm,
                                                   'activate').stdout
    assert shell.run('ros2', 'lifecycle', 'get', mm).stdout.startswith('active')

    # A kernel parameter changed at run time takes effect; a bad value is refused.
    kernel = f'{NS}/kernel'
    name = 'metabolism.focus_exit'
    param = ('ros2', 'param')
    wait = ('--timeout', '10')       # the CLI's own discovery can take more than its 1 s default
    assert 'Set parameter successful' in shell.param_set(kernel, name, '0.3')
    assert 'Double value is: 0.3' in shell.run(*param, 'get', *wait, kernel, name).stdout
    refused = shell.param_set(kernel, name, '1.5')
    assert 'Setting parameter failed' in refused, refused
    assert 'Double value is: 0.3' in shell.run(*param, 'get', *wait, kernel, name).stdout

    # The language block's action streams feedback to `ros2 action send_goal --feedback`.
    goal = shell.run('ros2', 'action', 'send_goal', '--feedback', f'{NS}/blocks/language',
                     'sage_interfaces/action/Language',
                     "{turn_id: 7, text: 'hello there', atp_budget: 10.0, max_new_tokens: 8}",
                     timeout=90.0).stdout
    assert 'Goal accepted' in goal and 'Feedback:' in goal, goal
    assert 'completion_tokens:' in goal and 'SUCCEEDED' in goal, goal

    assert_clean_stop(demo, [s.executable for s in graph.PROFILES['demo'].nodes])


@pytest.mark.parametrize('profile', ['thor', 'sprout'])
def test_robot_profile_starts_under_launch_with_a_cpu_override(
        profile: str, shell: RobotShell, tiny_models: Dict[str, Path], tmp_path: Path) -> None:
    """The profile's own overlay plus a CPU override (tiny models) as `params_file`: every node
    of the profile comes up, the graph gets ready, nothing restarts, then it stops cleanly."""
    spec = graph.PROFILES[profile]
    roles = graph.load_params(spec)['/**/model_manager']['ros__parameters']['roles']
    cpu = write_params(tmp_path / 'cpu.yaml', cpu_override(tiny_models, roles))
    params = graph.load_params([graph.overlay_path(spec), cpu])   # what params_file gets
    launch = Launch(shell, f'{profile}.launch.py', f'namespace:={NS}',
                    f'params_file:={write_params(tmp_path / "params.yaml", params)}',
                    'respawn_delay:=1.0')
    try:
        wait_ready(shell, launch)
        expected = {f'{NS}/{s.name}' for s in spec.nodes}
        nodes = shell.node_list(expected)
        assert expected <= nodes, nodes
        if profile == 'sprout':
            assert f'{NS}/reasoning_block' not in nodes
        time.sleep(3.0)   # a node that crash-loops would be started again meanwhile
        for s in spec.nodes:
            assert len(launch.pids(s.executable)) == 1, f'{s.executable} restarted'
        assert_clean_stop(launch, [s.executable for s in spec.nodes])
    finally:
        launch.close()


def test_thor_says_once_what_it_cannot_load(shell: RobotShell, tiny_models: Dict[str, Path],
                                            tmp_path: Path) -> None:
    """Thor's large model missing on this machine: the graph still comes up and answers with
    the small model; the missing model is reported once, not retried and logged per turn."""
    spec = graph.PROFILES['thor']
    override = cpu_override(tiny_models, ['small'])
    missing = tmp_path / 'missing-qwen2.5-14b'
    override['/**/model_manager']['ros__parameters']['models']['large'] = {
        'path': str(missing), 'device': 'cpu'}
    cpu = write_params(tmp_path / 'cpu.yaml', override)
    params = write_params(tmp_path / 'params.yaml',
                          graph.load_params([graph.overlay_path(spec), cpu]))
    launch = Launch(shell, 'thor.launch.py', f'namespace:={NS}', f'params_file:={params}')
    probe = Probe(shell.domain, NS)
    try:
        probe.wait_ready(120.0)
        from sage_interfaces.msg import Response
        for _ in range(2):
            oid = probe.send('Design a plan to tidy the kitchen table, then explain each step.')
            answer = probe.wait_response(oid, 120.0)
            assert answer.status == Response.STATUS_OK, (answer.status, answer.error)
        out = launch.text()
        said = [line for line in out.splitlines()
                if missing.name in line and 'model_manager' in line]
        assert len(said) == 1, '\n'.join(said) or out[-3000:]
        assert 'process has died' not in out
    except AssertionError as exc:
        raise AssertionError(f'{exc}\n--- launch output ---\n{launch.text()[-4000:]}') from None
    finally:
        probe.close()
        launch.close()
