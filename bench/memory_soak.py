"""Soak: 2,000 turns through the real nodes with memory on; database size and RSS per turn.

One in-process graph (kernel + language block + model manager + memory block, the setup of
`memory_ttft.py`) on a fresh database, with a tiny random Qwen2 model (built here, as the tests
build theirs) in both roles, and the real MiniLM for the kernel's salience and the memory
block's episode embeddings. Turns are the told turns of `bench/data/memory_sessions.json` with a
turn number appended (each is new), sent one at a time, each waiting for its response. Every
`--sample-every` turns: database bytes (sage.db + WAL + shm), the process's RSS, the store's
live memories and the memory block's indexing backlog. Reported: growth per turn of both, over
the whole run and after a warm-up, and what RSS grows by beyond the data the process keeps on
purpose (the in-RAM vector index: 384 float32 per memory).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path
from collections import deque
from typing import Any, Deque, Dict, List, Sequence

from common import InProcessGraph, report, wait_until
from memory_ttft import DATA, TurnSender, graph_params

ROOT = Path(__file__).resolve().parents[1]
VECTOR_BYTES = 384 * 4      # [bytes] one float32 MiniLM embedding


def tiny_model(out: Path) -> Path:
    """The tests' tiny random Qwen2 (test/conftest.py build_tiny_model)."""
    spec = importlib.util.spec_from_file_location(
        'sage_test_conftest', ROOT / 'src' / 'sage_ros' / 'test' / 'conftest.py')
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return Path(mod.build_tiny_model(out, seed=1))


def rss() -> int:
    import psutil
    return int(psutil.Process().memory_info().rss)


def db_bytes(db: Path) -> int:
    return sum(p.stat().st_size for p in (db, Path(f'{db}-wal'), Path(f'{db}-shm')) if p.exists())


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ys over xs."""
    n = len(xs)
    if n < 2:
        return float('nan')
    mx, my = sum(xs) / n, sum(ys) / n
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else float('nan')


def goal_handles_kept(nodes: Sequence[Any]) -> int:
    """Goal handles the graph's action servers still hold: rclpy keeps each finished goal's
    result for the server's result_timeout (900 s by default), so they grow with the turn rate
    until the oldest expire."""
    from rclpy.action import ActionServer
    return sum(len(getattr(w, '_goal_handles', {})) for n in nodes for w in n.waitables
               if isinstance(w, ActionServer))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--turns', type=int, default=2000)
    ap.add_argument('--sample-every', type=int, default=100)
    ap.add_argument('--warmup-turns', type=int, default=300,
                    help='turns excluded from the "after warm-up" slopes')
    ap.add_argument('--max-new-tokens', type=int, default=8)
    ap.add_argument('--max-minutes', type=float, default=14.0,
                    help='stop sending turns after this long and report what was done [min]')
    ap.add_argument('--flat-bytes-per-turn', type=float, default=1024.0,
                    help='RSS growth beyond the in-RAM index below this counts as flat [bytes/turn]')
    args = ap.parse_args()

    from sage_interfaces.msg import MemoryStatus

    from sage_ros import graph, names
    from sage_ros.core.memory.store import MemoryStore
    from sage_ros.nodes.common import LATCHED

    data = json.loads(DATA.read_text())
    texts = [t['text'] for s in data['sessions'] for t in s['turns']]
    wall0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = tiny_model(root / 'tiny-model')
        db = root / 'sage.db'
        params = graph_params(db, True, args.max_new_tokens,
                              {'small': str(model), 'large': str(model)})
        # Both roles are the same tiny model: no swaps between them (what a swap costs is
        # swap_cost.py's business, not this soak's).
        params['/**/language_block']['ros__parameters']['roles'] = {
            'simple': 'small', 'moderate': 'small', 'complex': 'small'}
        # The tiny model's 512-token window with its byte-level tokenizer leaves no room for
        # memories at the default share (0.25): give memory the share the node tests use.
        params['/**/model_manager']['ros__parameters'].setdefault('context', {})[
            'memory_share'] = 0.6
        g = InProcessGraph((graph.KERNEL, graph.LANGUAGE_BLOCK, graph.MODEL_MANAGER,
                            graph.MEMORY_BLOCK), params, root, namespace='/bench_soak')
        status: Deque[Any] = deque(maxlen=1)
        samples: List[Dict[str, Any]] = []
        latencies: List[float] = []
        try:
            g.probe.create_subscription(MemoryStatus, names.MEMORY_STATUS,
                                     lambda m: status.append(m), LATCHED)
            g.wait_models_active()
            sender = TurnSender(g, 'soak')
            sender.wait_ready()
            reader = MemoryStore(db, read_only=True)

            def sample(turn: int) -> None:
                st = status[-1] if status else None
                samples.append({'turn': turn, 'db_bytes': db_bytes(db),
                                'db_main_bytes': db.stat().st_size if db.exists() else 0,
                                'rss_bytes': rss(),
                                'goal_handles_kept': goal_handles_kept(g.nodes),
                                'memories': reader.count(),
                                'unindexed': int(st.unindexed_turns) if st else -1,
                                'turn_p50_s': round(sorted(window)[len(window) // 2], 3)
                                if window else None,
                                't_s': round(time.perf_counter() - wall0, 1)})

            window: List[float] = []
            sample(0)
            deadline = time.monotonic() + 60.0 * args.max_minutes
            done = 0
            no_memory = 0      # turns the model got no memory for (recall timed out, or none)
            for i in range(1, args.turns + 1):
                r = sender.turn(f'{texts[(i - 1) % len(texts)]} ({i})', timeout_s=120)
                latencies.append(r['total_s'])
                window.append(r['total_s'])
                no_memory += r['memory_used'] == 0
                done = i
                if i % args.sample_every == 0 or i == args.turns:
                    sample(i)
                    window = []
                if time.monotonic() > deadline:
                    break
            if done % args.sample_every:
                sample(done)
            # Let the indexer catch up, then one last sample of what is stored.
            try:
                wait_until(lambda: bool(status) and status[-1].unindexed_turns == 0, 120,
                           'the indexer to catch up')
            except TimeoutError:
                pass
            time.sleep(1.0)
            sample(done)
            journalled = len(reader.turns(limit=args.turns * 2 + 100))
            integrity = reader.integrity_check()
            reader.close()
        finally:
            g.close()

    warm = [s for s in samples if s['turn'] >= args.warmup_turns]
    first, last = samples[0], samples[-1]
    turns = max(1, last['turn'] - first['turn'])
    mem_per_turn = (last['memories'] - first['memories']) / turns
    rss_slope_warm = slope([s['turn'] for s in warm], [s['rss_bytes'] for s in warm])
    db_slope_warm = slope([s['turn'] for s in warm], [s['db_bytes'] for s in warm])
    index_per_turn = mem_per_turn * VECTOR_BYTES
    beyond = rss_slope_warm - index_per_turn
    lat_sorted = sorted(latencies)
    report('memory_soak', {
        'turns_asked': args.turns, 'turns': done, 'stopped_by_time_budget': done < args.turns,
        'model': 'tiny random Qwen2 (2 layers, 64 wide)',
        'max_new_tokens': args.max_new_tokens,
        'journalled_turns': journalled, 'integrity_check': integrity,
        'db_main_file_bytes': {'start': first['db_main_bytes'], 'end': last['db_main_bytes'],
                               'per_turn_after_warmup': round(slope(
                                   [s['turn'] for s in warm], [s['db_main_bytes'] for s in warm]), 1)},
        'db_bytes': {'start': first['db_bytes'], 'end': last['db_bytes'],
                     'per_turn': round((last['db_bytes'] - first['db_bytes']) / turns, 1),
                     'per_turn_after_warmup': round(db_slope_warm, 1)},
        'rss_bytes': {'start': first['rss_bytes'], 'end': last['rss_bytes'],
                      'per_turn': round((last['rss_bytes'] - first['rss_bytes']) / turns, 1),
                      'per_turn_after_warmup': round(rss_slope_warm, 1)},
        'memories': {'start': first['memories'], 'end': last['memories'],
                     'per_turn': round(mem_per_turn, 3)},
        'in_ram_index_bytes_per_turn': round(index_per_turn, 1),
        'rss_growth_beyond_index_per_turn': round(beyond, 1),
        'flat_threshold_bytes_per_turn': args.flat_bytes_per_turn,
        'growth_beyond_stored_data_flat': bool(beyond < args.flat_bytes_per_turn),
        'turns_without_memory': no_memory,
        'turn_latency_s': {'p50': round(lat_sorted[len(lat_sorted) // 2], 3),
                           'p95': round(lat_sorted[int(len(lat_sorted) * 0.95)], 3),
                           'max': round(lat_sorted[-1], 3)},
        'samples': samples,
        'wall_s': round(time.perf_counter() - wall0, 1),
    })


if __name__ == '__main__':
    main()
