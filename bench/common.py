"""What every benchmark shares: percentiles, the JSON report, and an in-process graph.

Benchmarks print one JSON object on stdout and compare against a baseline measured in the same
run, so results from a busy or slow machine still mean something.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'OFF')


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not values:
        return float('nan')
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary_ms(values_s: Sequence[float]) -> Dict[str, float]:
    ms = [v * 1000.0 for v in values_s]
    return {'n': len(ms), 'p50_ms': round(percentile(ms, 50), 3),
            'p99_ms': round(percentile(ms, 99), 3),
            'mean_ms': round(statistics.fmean(ms), 3) if ms else float('nan')}


def machine() -> Dict[str, Any]:
    import torch
    info: Dict[str, Any] = {'python': platform.python_version(), 'cpus': os.cpu_count(),
                            'torch': torch.__version__, 'cuda': torch.cuda.is_available()}
    if torch.cuda.is_available():
        info['gpu'] = torch.cuda.get_device_name(0)
    return info


def report(name: str, results: Dict[str, Any]) -> None:
    print(json.dumps({'benchmark': name, 'machine': machine(), **results}, indent=2))
    sys.stdout.flush()


class InProcessGraph:
    """SAGE nodes on one executor in a background thread, with a probe node for the benchmark."""

    def __init__(self, specs: Sequence[Any], params: Dict[str, Any], workdir: Path,
                 namespace: str = '/sage') -> None:
        import rclpy
        import yaml
        from rclpy.context import Context
        from rclpy.executors import MultiThreadedExecutor
        from rclpy.node import Node

        from sage_ros.cli.graph_runner import context_args, create_nodes
        from sage_ros.nodes.common import executor_threads

        pf = workdir / 'params.yaml'
        pf.write_text(yaml.safe_dump(params))
        self.context = Context()
        rclpy.init(args=context_args(namespace, pf, 'warn'), context=self.context)
        self.nodes = create_nodes(specs, self.context)
        self.probe = Node('bench_probe', namespace=namespace, context=self.context)
        self.executor = MultiThreadedExecutor(num_threads=executor_threads(len(specs) + 1),
                                              context=self.context)
        for n in [*self.nodes, self.probe]:
            self.executor.add_node(n)
        self._thread = threading.Thread(target=self.executor.spin, daemon=True)
        self._thread.start()

    def close(self) -> None:
        import rclpy
        self.executor.shutdown(timeout_sec=5.0)
        self._thread.join(timeout=5.0)
        for n in [*self.nodes, self.probe]:
            n.destroy_node()
        rclpy.try_shutdown(context=self.context)


    def wait_models_active(self, timeout_s: float = 300.0) -> Any:
        """Block until the model manager is active with its default model loaded (configure
        returns while the load still runs); returns that ModelStatus."""
        from sage_interfaces.msg import ModelStatus

        from sage_ros import names
        from sage_ros.nodes.common import LATCHED
        latest: List[Any] = []
        self.probe.create_subscription(ModelStatus, names.MODELS_STATUS,
                                       lambda m: latest.append(m), LATCHED)
        wait_until(lambda: bool(latest) and latest[-1].lifecycle_state == 'active'
                   and bool(latest[-1].loaded) and not latest[-1].loading_role, timeout_s,
                   'the model manager to become active with its model loaded')
        return latest[-1]


def wait_until(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f'timed out waiting for {what}')
        time.sleep(0.005)


def offline_model_params(profile: str = 'demo', overrides: Optional[Dict[str, Any]] = None,
                         roles: Optional[List[str]] = None) -> Dict[str, Any]:
    """A profile's parameters, optionally with some model-manager keys replaced."""
    import yaml

    from sage_ros.graph import PROFILES, params_path
    params = yaml.safe_load(params_path(PROFILES[profile]).read_text())
    mm = params['/**/model_manager']['ros__parameters']
    for k, v in (overrides or {}).items():
        mm[k] = v
    if roles is not None:
        mm['roles'] = roles
    return params


def demo_spec(role: str, max_new_tokens: int, path: Optional[str] = None,
              device: str = '', name: str = '') -> Any:
    """A `ModelSpec` for a demo role: the demo's model, or another directory and device."""
    from sage_ros.core.models import ModelSpec, resolve_model_path
    m = offline_model_params('demo')['/**/model_manager']['ros__parameters']['models'][role]
    return ModelSpec(role=name or role, model_id=Path(path).name if path else m['model_id'],
                     path=path or resolve_model_path(m['path']), dtype=m['dtype'],
                     device=device or m['device'], max_new_tokens=max_new_tokens,
                     context_window=m['context_window'])
