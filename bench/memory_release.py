"""Memory returned by unload: RSS growth over many load/unload cycles of a real model.

Loads and unloads the demo's small offline model `--cycles` times through `ModelPool` and
compares the process RSS after the cycles with the RSS after the first cycle (the baseline:
the first load also imports torch and transformers and fills their caches).
Goal: growth < 2 %. Also reports how much of each load's memory an unload gives back.
"""

from __future__ import annotations

import argparse
from typing import List

from common import offline_model_params, report


def rss() -> int:
    import psutil
    return int(psutil.Process().memory_info().rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--cycles', type=int, default=100)
    ap.add_argument('--role', default='small')
    args = ap.parse_args()

    from sage_ros.core.conversation import ChatTurn
    from sage_ros.core.models import ModelPool, ModelSpec, resolve_model_path

    m = offline_model_params('demo')['/**/model_manager']['ros__parameters']['models'][args.role]
    spec = ModelSpec(role=args.role, model_id=m['model_id'], path=resolve_model_path(m['path']),
                     dtype=m['dtype'], device=m['device'], max_new_tokens=2,
                     context_window=m['context_window'])
    pool = ModelPool({args.role: spec}, args.role, max_resident=1)
    messages = [ChatTurn('user', 'hello')]

    before_first = rss()
    pool.generate(args.role, messages, max_new_tokens=2)   # load + a generation fills caches
    pool.unload_all()
    baseline = rss()
    loaded: List[int] = []
    released: List[float] = []
    for _ in range(args.cycles):
        pool.load(args.role)
        with_model = rss()
        loaded.append(with_model)
        pool.unload_all()
        after = rss()
        released.append((with_model - after) / max(1, with_model - baseline))
    final = rss()
    growth = (final - baseline) / baseline
    report('memory_release', {
        'model': spec.model_id, 'cycles': args.cycles,
        'rss_before_first_load_mb': round(before_first / 2**20, 1),
        'rss_baseline_mb': round(baseline / 2**20, 1),
        'rss_loaded_mean_mb': round(sum(loaded) / len(loaded) / 2**20, 1),
        'rss_final_mb': round(final / 2**20, 1),
        'rss_growth_pct': round(100 * growth, 2),
        'released_fraction_min': round(min(released), 3),
        'goal_growth_lt_2pct': growth < 0.02})


if __name__ == '__main__':
    main()
