"""Run a profile's nodes: in this process on one executor, or one process per node.

With one process per node (`sage up --processes`) this module is a small supervisor, like
`ros2 launch` with `respawn`: a node that dies is started again after a delay (longer each time
it dies at once, and given up after too many restarts a minute), the rest of the graph keeps
running, and one SIGINT or SIGTERM stops every child. In both modes lifecycle nodes start with
`autostart: false` and are configured and activated through their lifecycle services
(`lifecycle_driver`), as the launch files do.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Deque, List, Optional, Sequence, Tuple, Union

import yaml
from rclpy.context import Context
from rclpy.node import Node

from .. import names
from ..graph import TEXT_SENSOR, NodeSpec, Profile, ros_args

if TYPE_CHECKING:
    from .lifecycle_driver import LifecycleDriver

PathArg = Union[str, 'os.PathLike[str]']
# The hidden node (leading underscore: `ros2 node list` leaves it out) that holds `sage up`'s
# lifecycle clients.
DRIVER_NODE = '_sage_up'


class GraphError(RuntimeError):
    """The graph could not be started; the message says why."""


def _kind(value: object) -> str:
    return {list: 'a list', str: 'a string', bool: 'true/false', int: 'a number',
            float: 'a number'}.get(type(value), type(value).__name__)


def check_params_file(path: PathArg) -> Path:
    """The parameters file, checked as ROS will read it: YAML, a mapping of node names to
    mappings. A mistake here is one clear error, before any node starts."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise GraphError(f'parameters file not found: {path}')
    try:
        data = yaml.safe_load(p.read_text(encoding='utf-8', errors='replace'))
    except yaml.YAMLError as exc:
        where = getattr(exc, 'problem_mark', None)
        at = f' (line {where.line + 1}, column {where.column + 1})' if where is not None else ''
        problem = getattr(exc, 'problem', None) or str(exc).splitlines()[0]
        raise GraphError(f'parameters file {path} is not valid YAML{at}: {problem}') from None
    if data is None:
        return p   # empty: sets nothing
    if not isinstance(data, dict):
        raise GraphError(f'parameters file {path} must map node names to their parameters '
                         f'(`/**/kernel: {{ros__parameters: ...}}`), not {_kind(data)}')
    for key, value in data.items():
        if not isinstance(value, dict):
            raise GraphError(f'parameters file {path}: entry {key!r} must be a mapping '
                             f'(`ros__parameters: ...`), not {_kind(value)}')
    return p


def _files(params: Union[None, PathArg, Sequence[PathArg]]) -> List[Path]:
    if params is None:
        return []
    if isinstance(params, (str, os.PathLike)):
        return [Path(params)]
    return [Path(p) for p in params]


def lifecycle_overrides(specs: Sequence[NodeSpec]) -> Optional[Path]:
    """A parameters file, last in the stack, turning off `autostart` of the lifecycle nodes
    `sage up` drives itself; None when there are none."""
    lifecycle = [s for s in specs if s.lifecycle]
    if not lifecycle:
        return None
    text = yaml.safe_dump({f'/**/{s.name}': {'ros__parameters': {'autostart': False}}
                           for s in lifecycle})
    out_dir = Path(tempfile.gettempdir()) / f'sage_ros-params-{os.getuid()}'
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f'lifecycle-{hashlib.sha1(text.encode()).hexdigest()[:12]}.yaml'
    if not path.is_file():
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix='.yaml')
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            f.write(text)
        os.replace(tmp, path)
    return path


def context_args(namespace: str, params_files: Union[None, PathArg, Sequence[PathArg]],
                 log_level: str = '') -> List[str]:
    """Process-wide ROS arguments: every node of the context gets the namespace and the
    parameters files (one `--params-file` each, later ones override)."""
    args = ['sage', '--ros-args', '-r', f'__ns:={namespace}']
    for f in _files(params_files):
        args += ['--params-file', str(f)]
    if log_level:
        args += ['--log-level', log_level]
    return args


def create_nodes(specs: Sequence[NodeSpec], context: Context) -> List[Node]:
    """Instantiate the node classes of `specs` in `context`, as their executables would."""
    nodes: List[Node] = []
    try:
        for spec in specs:
            cls = getattr(importlib.import_module(spec.module), spec.node_class)
            nodes.append(cls(context=context))
    except Exception as exc:
        for n in nodes:
            n.destroy_node()
        raise GraphError(f'cannot start node {spec.name!r}: {exc}') from exc
    return nodes


def _say(line: str) -> None:
    print(f'[sage up] {line}', file=sys.stderr, flush=True)


class DriverSession:
    """An rclpy context of `sage up`'s own with the hidden driver node spun on a thread, for
    driving the lifecycle of nodes in other processes. The driver stops when `stop` (the
    process's stop request) is set, or at `close()`."""

    def __init__(self, namespace: str, stop: Optional[threading.Event] = None) -> None:
        from rclpy.executors import SingleThreadedExecutor

        from ..nodes.common import init_context
        from .lifecycle_driver import LifecycleDriver
        self.context = Context()
        init_context(['sage', '--ros-args', '-r', f'__ns:={namespace}'], self.context)
        self.node = Node(DRIVER_NODE, context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._stop = threading.Event()   # ends the spin thread (at close())
        self.driver = LifecycleDriver(self.node, _say, stop)
        self._thread = threading.Thread(target=self._spin, daemon=True, name='sage-up-driver')
        self._thread.start()

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException
        try:
            while not self._stop.is_set() and self.context.ok():
                self.executor.spin_once(timeout_sec=0.1)
        except ExternalShutdownException:
            pass

    def close(self) -> None:
        import rclpy
        self.driver.close()   # joins its threads: none may be in a client when it is destroyed
        self._stop.set()
        self._thread.join(2.0)
        self.executor.shutdown(timeout_sec=0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)


@dataclass(frozen=True)
class RespawnPolicy:
    """When `sage up --processes` starts a dead node again (launch's respawn/respawn_delay)."""

    delay_s: float = 2.0            # [s] after a death, before the restart
    max_per_minute: int = 5         # restarts within 60 s before giving up on the node
    quick_death_s: float = 10.0     # [s] dying sooner than this after a start doubles the delay
    max_delay_s: float = 30.0       # [s] cap of the doubled delay
    stop_timeout_s: float = 8.0     # [s] after SIGINT to the children, SIGKILL what is left


def _how(code: int) -> str:
    if code < 0:
        try:
            return f'killed by {signal.Signals(-code).name}'
        except ValueError:
            return f'killed by signal {-code}'
    return f'exit code {code}'


@dataclass
class _Child:
    spec: NodeSpec
    cmd: List[str]
    required: bool
    proc: Optional[subprocess.Popen] = None
    started_at: float = 0.0
    restart_at: Optional[float] = None
    delay_s: float = 0.0
    restarts: Deque[float] = field(default_factory=deque)
    gave_up: str = ''            # why it is not started again ('' while it is)


class Supervisor:
    """One process per node; restarts the ones that die (see `RespawnPolicy`)."""

    def __init__(self, specs: Sequence[NodeSpec], namespace: str, params_files: Sequence[Path],
                 policy: RespawnPolicy, on_start: Optional[Callable[[NodeSpec], None]] = None
                 ) -> None:
        self.policy = policy
        self.namespace = namespace
        self._on_start = on_start
        self.children = [
            _Child(spec, [sys.executable, '-m', 'sage_ros.nodes.launcher', spec.executable,
                          *ros_args(spec, namespace, list(params_files))],
                   required=spec is not TEXT_SENSOR, delay_s=policy.delay_s)
            for spec in specs]

    def start(self, c: _Child) -> None:
        # Only the text sensor reads the terminal; the others must not compete for it.
        stdin = None if c.spec is TEXT_SENSOR else subprocess.DEVNULL
        c.proc = subprocess.Popen(c.cmd, stdin=stdin)
        c.started_at = time.monotonic()
        c.restart_at = None
        again = ' again' if c.restarts else ''
        _say(f'started {c.spec.name}{again} (pid {c.proc.pid})')
        if self._on_start is not None:
            self._on_start(c.spec)

    def _died(self, c: _Child, code: int, now: float) -> None:
        pid = c.proc.pid if c.proc is not None else 0
        c.proc = None
        name = c.spec.name
        if code == 2:
            c.gave_up = f'{name} cannot run (exit code 2: a configuration error, said above)'
            return
        while c.restarts and now - c.restarts[0] > 60.0:
            c.restarts.popleft()
        if len(c.restarts) >= self.policy.max_per_minute:
            c.gave_up = (f'{name} died {len(c.restarts) + 1} times within a minute '
                         f'(last: {_how(code)}); not restarting it')
            return
        quick = now - c.started_at < self.policy.quick_death_s
        c.delay_s = (min(c.delay_s * 2, self.policy.max_delay_s) if quick and c.restarts
                     else self.policy.delay_s)
        c.restarts.append(now)
        c.restart_at = now + c.delay_s
        _say(f'{name} (pid {pid}) {_how(code)}; restarting it in {c.delay_s:.1f} s')

    def poll(self) -> Optional[int]:
        """Check the children once: restart the dead, start the due. Returns an exit code when
        the graph cannot go on (a required node gave up), else None."""
        now = time.monotonic()
        for c in self.children:
            if c.proc is not None:
                code = c.proc.poll()
                if code is not None:
                    self._died(c, code, now)
                    if c.gave_up:
                        _say(c.gave_up)
                        if c.required:
                            return 2 if code == 2 else 1
            elif c.restart_at is not None and now >= c.restart_at and not c.gave_up:
                self.start(c)
        return None

    def stop(self) -> None:
        """SIGINT to every child still running (a terminal's Ctrl-C may already have sent them
        one; they ignore the second), then SIGKILL what is left after `stop_timeout_s`."""
        running = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
        for c in running:
            assert c.proc is not None
            try:
                c.proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.policy.stop_timeout_s
        for c in running:
            assert c.proc is not None
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _say(f'{c.spec.name} did not stop within {self.policy.stop_timeout_s:.0f} s; '
                     'killing it')
                c.proc.kill()
                c.proc.wait()
            else:
                if c.proc.returncode not in (0, None):
                    _say(f'{c.spec.name} stopped: {_how(c.proc.returncode)}')


def run_processes(profile: Profile, namespace: str,
                  params_files: Union[PathArg, Sequence[PathArg]],
                  specs: Optional[Sequence[NodeSpec]] = None,
                  policy: RespawnPolicy = RespawnPolicy()) -> int:
    """One process per node, like `ros2 launch` with respawn. Returns 0 after SIGINT/SIGTERM,
    non-zero when a required node cannot run."""
    from ..nodes.common import StopSignals
    stop = StopSignals('sage up').install()
    specs = list(specs or profile.nodes)
    files = _files(params_files)
    overrides = lifecycle_overrides(specs)
    session: Optional[DriverSession] = None
    if overrides is not None:
        files.append(overrides)
        session = DriverSession(namespace, stop.requested)
    drive = session.driver.drive if session is not None else None

    def started(spec: NodeSpec) -> None:
        if spec.lifecycle and drive is not None:
            drive(names.qualify(spec.name, namespace))

    sup = Supervisor(specs, namespace, files, policy, started)
    code = 0
    try:
        for c in sup.children:
            if not stop.requested.is_set():
                sup.start(c)
        while not stop.requested.is_set():
            result = sup.poll()
            if result is not None:
                _say('stopping the graph')
                code = result
                break
            stop.requested.wait(0.1)
        else:
            _say(f'{stop.signal_name}: stopping every node')
    finally:
        if session is not None:
            session.driver.request_stop()   # no more polling of children that are stopping
        sup.stop()   # StopSignals stays installed: a second SIGINT meanwhile is ignored
        if session is not None:
            session.close()
    return code


def in_process_driver(context: Context, stop: threading.Event) -> Tuple[Node, 'LifecycleDriver']:
    """One-process `sage up`: the hidden node (spin it with the graph's nodes) and the driver
    that configures and activates the graph's lifecycle nodes through their services."""
    from .lifecycle_driver import LifecycleDriver
    node = Node(DRIVER_NODE, context=context)
    return node, LifecycleDriver(node, _say, stop)
