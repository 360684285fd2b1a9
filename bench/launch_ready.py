"""Time from `ros2 launch sage_ros <profile>.launch.py` to KernelState.ready, on the real models.

What a robot user waits for after typing the launch command: every process started, the model
manager configured and activated by launch (default model loaded), the language block serving,
the kernel ready. Each run starts the launch from a colcon-built workspace on a ROS domain of its
own, watches the kernel's transient-local `state` topic from this process, then stops the launch
with SIGINT (timed too). Needs `make ros2-tools`.

    .venv/bin/python bench/launch_ready.py --runs 5 [--workspace WS] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.prefix)


def tools_env(domain: Optional[int] = None) -> Dict[str, str]:
    env = dict(os.environ, PATH=f'{VENV / "bin"}{os.pathsep}{os.environ.get("PATH", "")}',
               AMENT_PREFIX_PATH=str(VENV), CMAKE_PREFIX_PATH=str(VENV), PYTHONUNBUFFERED='1',
               HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1', RCUTILS_COLORIZED_OUTPUT='0')
    if domain is not None:
        env.update(ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')
    return env


def build(ws: Path) -> None:
    """`colcon build` of both packages into `ws` (incremental when it was built before)."""
    (ws / 'src').mkdir(parents=True, exist_ok=True)
    for pkg in ('sage_interfaces', 'sage_ros'):
        if not (ws / 'src' / pkg).exists():
            (ws / 'src' / pkg).symlink_to(ROOT / 'src' / pkg)
    subprocess.run(['colcon', 'build', '--cmake-args', f'-DPython3_EXECUTABLE={sys.executable}',
                    '-DBUILD_TESTING=OFF'], cwd=ws, env=tools_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def one_run(ws: Path, profile: str, domain: int, timeout: float) -> Dict[str, Any]:
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sage_interfaces.msg import KernelState

    os.environ.update(ROS_DOMAIN_ID=str(domain), ROS_AUTOMATIC_DISCOVERY_RANGE='LOCALHOST')
    context = Context()
    rclpy.init(context=context)
    node = rclpy.create_node('launch_ready_bench', context=context)
    ready: List[float] = []

    def on_state(msg: Any) -> None:
        if msg.ready and not ready:
            ready.append(time.monotonic())
    qos = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
    node.create_subscription(KernelState, '/bench/state', on_state, qos)
    executor = SingleThreadedExecutor(context=context)
    executor.add_node(node)
    with tempfile.TemporaryDirectory() as state_dir:
        env = dict(tools_env(domain), SAGE_STATE_DIR=state_dir)
        start = time.monotonic()
        log = open(Path(state_dir) / 'launch.log', 'w+', encoding='utf-8')
        proc = subprocess.Popen(
            ['bash', '-c', 'source "$0/install/setup.bash" && exec ros2 launch sage_ros "$1" '
             'namespace:=/bench', str(ws), f'{profile}.launch.py'],
            env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_default_sigint)
        try:
            while not ready and time.monotonic() - start < timeout and proc.poll() is None:
                executor.spin_once(timeout_sec=0.05)
            if not ready:
                raise RuntimeError(f'not ready within {timeout:.0f} s (launch exit code '
                                   f'{proc.poll()})')
            ready_s = ready[0] - start
            stop = time.monotonic()
            os.killpg(proc.pid, signal.SIGINT)   # Ctrl-C, as in a terminal
            code = proc.wait(timeout=60.0)
            stop_s = time.monotonic() - stop
            log.seek(0)
            out = log.read()
            return {'ready_s': ready_s, 'stop_s': stop_s, 'exit_code': code,
                    'died': out.count('process has died'),
                    'escalated': out.count("escalating to 'SIGTERM'")}
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
            executor.shutdown()
            node.destroy_node()
            rclpy.try_shutdown(context=context)
            subprocess.run(['bash', '-c', 'source "$0/install/setup.bash" && ros2 daemon stop',
                            str(ws)], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=30)


def spread(values: List[float]) -> Dict[str, float]:
    return {'median_s': round(statistics.median(values), 3), 'min_s': round(min(values), 3),
            'max_s': round(max(values), 3), 'spread_s': round(max(values) - min(values), 3),
            'stdev_s': round(statistics.stdev(values), 3) if len(values) > 1 else 0.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--runs', type=int, default=5)
    ap.add_argument('--profile', default='demo', choices=['demo', 'thor', 'sprout'])
    ap.add_argument('--workspace', type=Path, default=None,
                    help='colcon workspace to build into and launch from (default: a temporary one)')
    ap.add_argument('--domain', type=int, default=150, help='first ROS domain id (one per run)')
    ap.add_argument('--timeout', type=float, default=300.0)
    ap.add_argument('--out', type=Path, default=ROOT / 'bench' / 'results' / 'launch_ready_cpu.json')
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ws = args.workspace or Path(tmp) / 'ws'
        t0 = time.monotonic()
        build(ws)
        build_s = time.monotonic() - t0
        load_before = os.getloadavg()[0]
        runs = [one_run(ws, args.profile, args.domain + i, args.timeout) for i in range(args.runs)]
    ready = [r['ready_s'] for r in runs]
    stop = [r['stop_s'] for r in runs]
    result: Dict[str, Any] = {
        'benchmark': 'launch_ready', 'machine': machine(), 'profile': args.profile,
        'what': f'ros2 launch sage_ros {args.profile}.launch.py -> KernelState.ready '
                '(real offline models); then SIGINT -> launch exited',
        'runs': args.runs, 'colcon_build_s': round(build_s, 1),
        'load_average_1min': [round(load_before, 2), round(os.getloadavg()[0], 2)],
        'ready': {**spread(ready), 'values_s': [round(v, 3) for v in ready]},
        'stop': {**spread(stop), 'values_s': [round(v, 3) for v in stop]},
        'exit_codes': [r['exit_code'] for r in runs],
        # per run: "process has died" lines, and nodes launch had to SIGTERM after SIGINT
        'died': [r['died'] for r in runs], 'sigterm_escalations': [r['escalated'] for r in runs],
    }
    text = json.dumps(result, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
