"""Memory returned by unload: RSS growth over many load/unload cycles of a real model.

Loads and unloads the demo's small offline model `--cycles` times through `ModelPool` and
compares the process RSS after the cycles with the RSS after the first cycle (the baseline:
the first load also imports torch and transformers and fills their caches).
Goal: growth < 2 %. Also reports the growth once warm (from cycle 20 on: the first cycles grow
the allocator's arenas and import code lazily, then RSS stays flat) and how much of each load's
memory an unload gives back.
"""

from __future__ import annotations

import argparse
from typing import List

from common import demo_spec, report


def rss() -> int:
    import psutil
    return int(psutil.Process().memory_info().rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--cycles', type=int, default=100)
    ap.add_argument('--role', default='small')
    ap.add_argument('--path', help='model directory (default: the demo role\'s)')
    ap.add_argument('--device', default='', help='torch device (default: the demo\'s, cpu)')
    args = ap.parse_args()

    from sage_ros.core.conversation import ChatTurn
    from sage_ros.core.models import ModelPool

    spec = demo_spec(args.role, 2, args.path, args.device)
    cuda = spec.device.startswith('cuda')

    def device_bytes() -> int:
        import torch
        return int(torch.cuda.memory_reserved()) if cuda else 0
    pool = ModelPool({args.role: spec}, args.role, max_resident=1)
    messages = [ChatTurn('user', 'hello')]

    before_first = rss()
    pool.generate(args.role, messages, max_new_tokens=2)   # load + a generation fills caches
    pool.unload_all()
    baseline = rss()
    device_baseline = device_bytes()
    loaded: List[int] = []
    released: List[float] = []
    after_each: List[int] = []
    for _ in range(args.cycles):
        pool.load(args.role)
        with_model = rss()
        loaded.append(with_model)
        pool.unload_all()
        after = rss()
        after_each.append(after)
        released.append((with_model - after) / max(1, with_model - baseline))
    final = rss()
    growth = (final - baseline) / baseline
    # Growth once warm (allocator arenas, lazily imported code): from cycle `warm` to the end.
    warm = min(20, args.cycles - 1)
    steady = (final - after_each[warm - 1]) / after_each[warm - 1]
    extra = {}
    if cuda:
        extra = {'cuda_reserved_baseline_mb': round(device_baseline / 2**20, 1),
                 'cuda_reserved_final_mb': round(device_bytes() / 2**20, 1)}
    report('memory_release', {
        'model': spec.model_id, 'cycles': args.cycles,
        'rss_before_first_load_mb': round(before_first / 2**20, 1),
        'rss_baseline_mb': round(baseline / 2**20, 1),
        'rss_loaded_mean_mb': round(sum(loaded) / len(loaded) / 2**20, 1),
        'rss_final_mb': round(final / 2**20, 1),
        'rss_growth_pct': round(100 * growth, 2),
        'rss_growth_after_warm_up_pct': round(100 * steady, 2), 'warm_up_cycles': warm,
        'rss_after_unload_every_10_cycles_mb': [round(v / 2**20, 1) for v in after_each[9::10]],
        'released_fraction_min': round(min(released), 3),
        'goal_growth_lt_2pct': growth < 0.02,
        'goal_growth_after_warm_up_lt_2pct': steady < 0.02, **extra})


if __name__ == '__main__':
    main()
