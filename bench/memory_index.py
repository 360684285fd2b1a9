"""Which vector index for the memory store: build time, k=10 search p50/p95, recall@10 against
the exact scan, and memory, at 1k/10k/100k 384-d unit vectors (MiniLM's size).

Candidates: numpy exact (a float32 matrix and one matrix-vector product: the baseline, recall
1.0 by definition), usearch HNSW (the wheel in requirements/python.txt), hnswlib HNSW and
sqlite-vec's vec0 table inside an SQLite file (through apsw: the venv's sqlite3 module has no
`enable_load_extension`). hnswlib (sdist only) and sqlite-vec/apsw are not project
requirements: install them into a folder and put it on PYTHONPATH to measure them, e.g.
  pip install --no-deps --target /tmp/benchlib hnswlib==0.8.0 sqlite-vec==0.1.9 apsw
  PYTHONPATH=/tmp/benchlib .venv/bin/python bench/memory_index.py
A candidate that cannot be imported is reported with the reason.

Vectors: unit vectors around 2,000 random centres (text embeddings cluster; uniform random
vectors in 384-d are the unrealistic worst case for graph indexes, `--uniform` measures that).
Queries come from the same distribution and are not stored.
"""

from __future__ import annotations

import argparse
import gc
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from common import percentile, report

DIM = 384
K = 10


def rss_mb() -> float:
    import psutil
    return float(psutil.Process(os.getpid()).memory_info().rss) / 2**20


def make_vectors(n: int, rng: np.random.Generator, uniform: bool,
                 centres: np.ndarray) -> np.ndarray:
    if uniform:
        v = rng.normal(size=(n, DIM)).astype(np.float32)
    else:
        v = centres[rng.integers(0, len(centres), n)] + 0.6 * rng.normal(
            size=(n, DIM)).astype(np.float32) / np.sqrt(DIM)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v.astype(np.float32)


Searcher = Callable[[np.ndarray], np.ndarray]


def build_numpy(vecs: np.ndarray, workdir: Path) -> Tuple[Searcher, Dict[str, Any]]:
    from sage_ros.core.memory.index import ExactIndex
    index = ExactIndex(DIM, capacity=len(vecs))
    index.add(list(range(len(vecs))), vecs)
    return (lambda q: index.search(q, K)[0]), {'bytes': int(vecs.nbytes)}


def build_usearch(vecs: np.ndarray, workdir: Path) -> Tuple[Searcher, Dict[str, Any]]:
    from usearch.index import Index
    index = Index(ndim=DIM, metric='ip', dtype='f32', connectivity=16, expansion_add=128,
                  expansion_search=64)
    index.add(np.arange(len(vecs), dtype=np.uint64), vecs)
    return (lambda q: np.asarray(index.search(q, K).keys)), {'bytes': int(index.memory_usage)}


def build_hnswlib(vecs: np.ndarray, workdir: Path) -> Tuple[Searcher, Dict[str, Any]]:
    import hnswlib
    index = hnswlib.Index(space='ip', dim=DIM)
    index.init_index(max_elements=len(vecs), ef_construction=128, M=16)
    index.add_items(vecs, np.arange(len(vecs)))
    index.set_ef(64)
    return (lambda q: index.knn_query(q, k=K)[0][0]), {}


def build_sqlite_vec(vecs: np.ndarray, workdir: Path) -> Tuple[Searcher, Dict[str, Any]]:
    import apsw
    import sqlite_vec
    path = workdir / f'vec{len(vecs)}.db'
    db = apsw.Connection(str(path))
    db.enable_load_extension(True)
    db.load_extension(sqlite_vec.loadable_path())
    db.execute('PRAGMA journal_mode=WAL')
    db.execute(f'CREATE VIRTUAL TABLE v USING vec0(embedding float[{DIM}] '
               'distance_metric=cosine)')
    with db:
        db.executemany('INSERT INTO v (rowid, embedding) VALUES (?, ?)',
                       ((i, vecs[i].tobytes()) for i in range(len(vecs))))

    def search(q: np.ndarray) -> np.ndarray:
        rows = db.execute('SELECT rowid FROM v WHERE embedding MATCH ? AND k = ?',
                          (q.astype(np.float32).tobytes(), K)).fetchall()
        return np.asarray([r[0] for r in rows])
    wal = Path(f'{path}-wal')
    return search, {'bytes_on_disk': path.stat().st_size + (wal.stat().st_size
                                                             if wal.exists() else 0)}


CANDIDATES: Dict[str, Callable[[np.ndarray, Path], Tuple[Searcher, Dict[str, Any]]]] = {
    'numpy-exact': build_numpy, 'usearch-hnsw': build_usearch, 'hnswlib-hnsw': build_hnswlib,
    'sqlite-vec': build_sqlite_vec}


def unavailable(name: str) -> Optional[str]:
    """Why a candidate cannot be measured here, or None."""
    try:
        if name == 'usearch-hnsw':
            import usearch.index  # noqa: F401
        elif name == 'hnswlib-hnsw':
            import hnswlib  # noqa: F401
        elif name == 'sqlite-vec':
            if not hasattr(sqlite3.connect(':memory:'), 'enable_load_extension'):
                try:
                    import apsw  # noqa: F401
                except ImportError:
                    return ("this Python's sqlite3 has no enable_load_extension and apsw is "
                            'not installed')
            import sqlite_vec  # noqa: F401
    except ImportError as exc:
        return f'not installed: {exc}'
    return None


def measure(name: str, vecs: np.ndarray, queries: np.ndarray, truth: List[set],
            workdir: Path) -> Dict[str, Any]:
    gc.collect()
    before = rss_mb()
    t0 = time.perf_counter()
    search, extra = CANDIDATES[name](vecs, workdir)
    build_s = time.perf_counter() - t0
    grown = rss_mb() - before
    search(queries[0])                                # warm
    times: List[float] = []
    found = 0
    for q, want in zip(queries, truth):
        t = time.perf_counter()
        ids = search(q)
        times.append(time.perf_counter() - t)
        found += len(set(int(i) for i in ids) & want)
    ms = [x * 1000 for x in times]
    return {'build_s': round(build_s, 3), 'search_p50_ms': round(percentile(ms, 50), 3),
            'search_p95_ms': round(percentile(ms, 95), 3),
            'recall_at_10': round(found / (K * len(queries)), 4),
            'rss_growth_mb': round(grown, 1), **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', default='1000,10000,100000')
    parser.add_argument('--queries', type=int, default=200)
    parser.add_argument('--uniform', action='store_true', help='uniform random vectors')
    parser.add_argument('--only', default='', help='comma-separated candidate names')
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    centres = rng.normal(size=(2000, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    names = [n for n in CANDIDATES if not args.only or n in args.only.split(',')]
    skipped = {n: why for n in names if (why := unavailable(n)) is not None}
    results: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(',')):
            vecs = make_vectors(n, rng, args.uniform, centres)
            queries = make_vectors(args.queries, rng, args.uniform, centres)
            exact = queries @ vecs.T
            truth = [set(np.argsort(-row)[:K].tolist()) for row in exact]
            results[str(n)] = {name: measure(name, vecs, queries, truth, Path(tmp))
                               for name in names if name not in skipped}
            gc.collect()
    report('memory_index', {'dim': DIM, 'k': K, 'queries': args.queries,
                            'vectors': 'uniform random' if args.uniform else
                            'clustered (2000 centres)', 'unavailable': skipped,
                            'hnsw_params': {'M': 16, 'ef_construction': 128, 'ef_search': 64},
                            'results': results})


if __name__ == '__main__':
    main()
