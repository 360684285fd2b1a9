"""Run a profile's nodes: in this process on one executor, or one process per node."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from rclpy.context import Context
from rclpy.node import Node

from ..graph import TEXT_SENSOR, NodeSpec, Profile, ros_args


class GraphError(RuntimeError):
    """The graph could not be started; the message says why."""


def check_params_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise GraphError(f'parameters file not found: {path}')
    return p


def context_args(namespace: str, params_file: Optional[Path], log_level: str = '') -> List[str]:
    """Process-wide ROS arguments: every node of the context gets the namespace and parameters."""
    args = ['sage', '--ros-args', '-r', f'__ns:={namespace}']
    if params_file is not None:
        args += ['--params-file', str(params_file)]
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


def run_processes(profile: Profile, namespace: str, params_file: Path,
                  specs: Optional[Sequence[NodeSpec]] = None) -> int:
    """One process per node, like `ros2 launch`; Ctrl-C (or any child exiting) stops them all."""
    procs = []
    for spec in specs or profile.nodes:
        cmd = [sys.executable, '-m', spec.module, *ros_args(spec, namespace, params_file)]
        # Only the text sensor reads the terminal; the others must not compete for it.
        stdin = None if spec is TEXT_SENSOR else subprocess.DEVNULL
        procs.append((spec, subprocess.Popen(cmd, stdin=stdin)))
        print(f'[sage up] started {spec.name} (pid {procs[-1][1].pid})', file=sys.stderr)
    code = 0
    try:
        while all(p.poll() is None for _, p in procs):
            time.sleep(0.2)
        for spec, p in procs:
            if p.poll() is not None:
                print(f'[sage up] {spec.name} exited with code {p.returncode}; stopping the graph',
                      file=sys.stderr)
                code = p.returncode or 1
    except KeyboardInterrupt:
        pass
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 10.0
        for _, p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return code
