"""The robot tier's helpers: SAGE built with colcon and driven with the real ROS 2 tools.

What a robot user types (`colcon build`, `source install/setup.bash`, `ros2 launch sage_ros
demo.launch.py`, `ros2 topic|param|lifecycle|action ...`), run against a workspace built once per
session in a temporary directory. The tools come from the venv (`make ros2-tools`) or a ROS 2
install on PATH; without either every test here skips, saying so.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Set

import pytest
import yaml

from graph_support import Output, claim_domain, graph_env, kill_group

ROOT = Path(__file__).resolve().parents[4]
VENV = Path(sys.prefix)
BUILD_TIMEOUT_S = 900.0


def tools_prefix() -> Optional[Path]:
    """Where `ros2` and `colcon` are: the venv's bin (`make ros2-tools`), else PATH; None if not."""
    if (VENV / 'bin' / 'ros2').is_file() and (VENV / 'bin' / 'colcon').is_file():
        return VENV / 'bin'
    ros2, colcon = shutil.which('ros2'), shutil.which('colcon')
    if ros2 and colcon:
        return Path(ros2).parent
    return None


def tools_env(domain: Optional[int] = None) -> Dict[str, str]:
    """The environment for `colcon` and `ros2`: the venv's ROS on the ament/cmake paths."""
    prefix = tools_prefix()
    assert prefix is not None
    env = dict(graph_env(domain)) if domain is not None else dict(os.environ)
    env['PATH'] = f'{prefix}{os.pathsep}{env.get("PATH", "")}'
    for var in ('AMENT_PREFIX_PATH', 'CMAKE_PREFIX_PATH'):
        env[var] = os.pathsep.join(p for p in (str(VENV), env.get(var, '')) if p)
    env.setdefault('HF_HUB_OFFLINE', '1')
    env.setdefault('TRANSFORMERS_OFFLINE', '1')
    env['PYTHONUNBUFFERED'] = '1'
    env['RCUTILS_COLORIZED_OUTPUT'] = '0'
    return env


def _default_sigint() -> None:
    """A background child of a non-interactive shell inherits SIGINT ignored: undo that, so
    the launch stops on Ctrl-C as it does in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope='session')
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`colcon build` of sage_interfaces and sage_ros into a temporary workspace, once per
    session ($SAGE_ROBOT_WS: a workspace kept between sessions, rebuilt incrementally)."""
    if tools_prefix() is None:
        pytest.skip('no ROS 2 tools: run `make ros2-tools` (or source a ROS 2 Jazzy install)')
    kept = os.environ.get('SAGE_ROBOT_WS')
    ws = Path(kept) if kept else tmp_path_factory.mktemp('robot_ws')
    (ws / 'src').mkdir(parents=True, exist_ok=True)
    for pkg in ('sage_interfaces', 'sage_ros'):
        if not (ws / 'src' / pkg).exists():
            (ws / 'src' / pkg).symlink_to(ROOT / 'src' / pkg)
    cmd = ['colcon', 'build', '--event-handlers', 'console_cohesion+', '--cmake-args',
           f'-DPython3_EXECUTABLE={sys.executable}', '-DBUILD_TESTING=OFF']
    proc = subprocess.run(cmd, cwd=ws, env=tools_env(), stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=BUILD_TIMEOUT_S)
    if proc.returncode != 0:
        pytest.fail(f'colcon build failed ({proc.returncode}):\n{proc.stdout[-4000:]}')
    assert (ws / 'install' / 'setup.bash').is_file()
    return ws


class RobotShell:
    """Commands run as after `source install/setup.bash`, on the test's own ROS domain."""

    def __init__(self, ws: Path, domain: int) -> None:
        self.ws, self.domain = ws, domain
        self.env = tools_env(domain)
        self.env['SAGE_STATE_DIR'] = os.environ.get('SAGE_STATE_DIR', str(ws / 'state'))

    def argv(self, args: Sequence[str]) -> List[str]:
        return ['bash', '-c', 'source "$0/install/setup.bash" && exec "$@"', str(self.ws), *args]

    def run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """One command (e.g. `ros2 param get ...`) to completion; stdout and stderr merged."""
        return subprocess.run(self.argv(args), env=self.env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)

    def param_set(self, node: str, name: str, value: str, tries: int = 3) -> str:
        """`ros2 param set` with 10 s for the CLI to find the node's parameter services, run
        again (as a user would) while its own discovery did not find them in time, which a
        busy 2-core machine was seen to cause; returns what the last run printed."""
        out = ''
        for _ in range(tries):
            out = self.run('ros2', 'param', 'set', '--timeout', '10', node, name, value).stdout
            if 'Wait for service timed out' not in out:
                break
        return out

    def start(self, *args: str) -> subprocess.Popen:
        """A long-running command in a process group of its own (signalled as a terminal would)."""
        return subprocess.Popen(self.argv(args), env=self.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, preexec_fn=_default_sigint)

    def node_list(self, expected: Set[str], timeout: float = 30.0) -> Set[str]:
        """`ros2 node list`, asked again until it shows `expected` (the daemon it starts on
        first use discovers the graph over a few seconds) or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while True:
            nodes = set(self.run('ros2', 'node', 'list').stdout.split())
            if expected <= nodes or time.monotonic() > deadline:
                return nodes
            time.sleep(0.5)

    def stop_daemon(self) -> None:
        """`ros2` commands start a daemon on the domain; it is ours, so it ends with the test."""
        try:
            self.run('ros2', 'daemon', 'stop', timeout=30.0)
        except subprocess.TimeoutExpired:
            pass


class Launch:
    """`ros2 launch sage_ros <file> ARGS...` and what it printed."""

    def __init__(self, shell: RobotShell, launch_file: str, *args: str) -> None:
        self.shell = shell
        self.proc = shell.start('ros2', 'launch', 'sage_ros', launch_file, *args)
        self.output = Output(self.proc)

    def text(self) -> str:
        return self.output.text()

    def pids(self, executable: str) -> List[int]:
        """Every pid launch reported starting `executable` with (respawns included), in order."""
        return [int(m) for m in re.findall(
            rf'\[INFO\] \[{re.escape(executable)}-\d+\]: process started with pid \[(\d+)\]',
            self.text())]

    def wait_started(self, executable: str, count: int, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while len(self.pids(executable)) < count:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f'{executable} was not started {count} time(s) within '
                                     f'{timeout:.0f} s:\n{self.text()[-3000:]}')
            time.sleep(0.1)
        return self.pids(executable)[count - 1]

    def kill_node(self, executable: str) -> int:
        """kill -9 the running `executable`, checking it is a process of this launch's group."""
        pid = self.pids(executable)[-1]
        assert os.getpgid(pid) == self.proc.pid, f'pid {pid} is not in the launch group'
        os.kill(pid, signal.SIGKILL)
        return pid

    def interrupt(self, timeout: float) -> float:
        """Ctrl-C as in a terminal (SIGINT to the whole group); seconds until launch exited."""
        start = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        return time.monotonic() - start

    def close(self) -> str:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout=15.0)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        kill_group(self.proc)
        self.proc.wait()
        return self.output.join()


@pytest.fixture
def robot_domain() -> Iterator[int]:
    d, lock = claim_domain()
    try:
        yield d
    finally:
        lock.close()


@pytest.fixture
def shell(workspace: Path, robot_domain: int) -> Iterator[RobotShell]:
    s = RobotShell(workspace, robot_domain)
    yield s
    s.stop_daemon()


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params))
    return path


def cpu_override(models: Dict[str, Path], roles: Sequence[str]) -> dict:
    """What a CPU-only machine changes in a robot profile: tiny models on the CPU, the keyword
    router and n-gram embedder (no MiniLM), text from the `text_in` topic only. Only the chat
    roles among `roles` get a tiny model; the hearing and seeing entries keep their real ones
    (prepared whisper, OpenCV's cascade, MiniLM), moved to the CPU."""
    entries: Dict[str, Dict[str, object]] = {
        r: {'model_id': f'tiny-{r}', 'path': str(models[r]), 'device': 'cpu',
            'max_new_tokens': 8, 'context_window': 512} for r in roles if r in models}
    entries.update({r: {'device': 'cpu', 'dtype': 'int8' if r == 'speech' else 'float32'}
                    for r in roles if r not in models and r in ('speech', 'embedder')})
    return {
        '/**/text_sensor': {'ros__parameters': {'source': 'topic'}},
        '/**/kernel': {'ros__parameters': {'router': 'keyword',
                                           'salience': {'text_embedder': 'ngram'}}},
        '/**/language_block': {'ros__parameters': {'router': 'keyword'}},
        '/**/model_manager': {'ros__parameters': {'models': entries, 'memory_budget_gib': 0.0,
                                                  'memory_reserve_gib': 0.0}},
    }
