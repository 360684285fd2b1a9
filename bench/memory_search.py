"""Memory search latency through `MemoryStore.search` at 1k, 10k and 100k memories.

Per size, one fresh SQLite file is filled with memories of every kind (90% episodes, 7% facts,
3% pinned; three sources, a few persons, created over 30 days). Their embeddings are NOT MiniLM
for speed: 300 are real MiniLM embeddings of sentences, the rest random unit vectors around
2,000 centres (inserting 100k through MiniLM would take most of an hour on 2 cores). The 50
queries are real sentences embedded with the real MiniLM.

Measured per size, in the same run:
- `raw_scan` (baseline): the bare numpy exact scan (float32 matrix @ query, top 10), no SQL;
- `store`: `MemoryStore.search` as the graph uses it (its default index: numpy exact), which
  adds the SQL fetch of the oversampled candidates and the recall scoring;
- `store_hnsw`: the same with usearch HNSW forced (only up to `--hnsw-max` memories: building
  HNSW over 100k takes minutes here).
For each store mode: the open, the first search (builds the index: reads every embedding from
SQLite), then `--repeats` x 50 turns, each: the query embedded with MiniLM (`query_embed`,
timed on its own; a new text each time so the embedder's cache does not answer), then searched
(k=10, default weights but min_similarity=-1 so every candidate is fetched and scored: the
worst case), unfiltered and filtered (kinds=['pinned'] and a person: the oversample-then-exact
fallback path). Searching right after torch has run is the real order, and it matters (see
core/memory/index.py `_dot`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from common import percentile, report

ROOT = Path(__file__).resolve().parents[1]

SUBJECTS = ['my sister', 'the robot', 'the red cup', 'the kitchen', 'our dog', 'the charger',
            'my friend Ada', 'the garden', 'the blue box', 'the printer']
FACTS = ['is in the living room', 'likes green tea', 'is broken since Monday',
         'was moved next to the window', 'needs charging every night', 'is called Rex',
         'opens at nine in the morning', 'belongs to Ada', 'is under the desk',
         'should be cleaned on Fridays']
QUERIES = ['where did I put the red cup?', 'what does Ada like to drink?',
           'what is our dog called',
           'when does the shop open', 'is the printer working', 'where is the charger',
           'who owns the blue box', 'what needs charging at night', 'when should I clean',
           'what was moved near the window']


def ms_summary(values_s: List[float]) -> Dict[str, float]:
    ms = [v * 1000.0 for v in values_s]
    return {'p50_ms': round(percentile(ms, 50), 3), 'p95_ms': round(percentile(ms, 95), 3),
            'mean_ms': round(statistics.fmean(ms), 3), 'n': len(ms)}


def fill(path: Path, n: int, rng: np.random.Generator, real: np.ndarray,
         real_texts: List[str]) -> float:
    from sage_ros.core.memory.store import MemoryStore
    centres = rng.normal(size=(2000, real.shape[1])).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    kinds = rng.choice(['episode', 'fact', 'pinned'], size=n, p=[0.9, 0.07, 0.03])
    t0 = time.perf_counter()
    with MemoryStore(path) as store:
        now = time.time()
        for start in range(0, n, 5000):
            with store.transaction():
                for i in range(start, min(n, start + 5000)):
                    if i < len(real):
                        vec, text = real[i], real_texts[i]
                    else:
                        vec = centres[rng.integers(0, 2000)] + 0.6 * rng.normal(
                            size=real.shape[1]).astype(np.float32) / np.sqrt(real.shape[1])
                        text = f'memory {i}: {SUBJECTS[i % 10]} {FACTS[(i // 10) % 10]}'
                    store.add_memory(str(kinds[i]), text, embedding=vec,
                                     source=['console', 'camera', 'microphone'][i % 3],
                                     person=['', 'ada', 'ben', 'cleo'][i % 4],
                                     salience=float(rng.random()), importance=float(rng.random()),
                                     now=now - float(rng.random()) * 30 * 86400)
    return time.perf_counter() - t0


def measure(path: Path, mode: str, embedder: Any, queries: List[str],
            repeats: int) -> Dict[str, Any]:
    """The store's search as the memory block runs it: embed the turn's text (MiniLM, a new
    text each time so its cache does not answer), then search with that embedding."""
    from sage_ros.core.memory.store import MemoryStore, RecallWeights
    weights = RecallWeights(min_similarity=-1.0)
    t0 = time.perf_counter()
    store = MemoryStore(path, read_only=True, index=mode)
    opened = time.perf_counter() - t0
    first_q = np.asarray(embedder.embed([queries[0]]), dtype=np.float32)[0]
    t0 = time.perf_counter()
    store.search('', k=10, weights=weights, query_embedding=first_q)
    first = time.perf_counter() - t0
    info = store.index_info()
    embed: List[float] = []
    plain: List[float] = []
    filtered: List[float] = []
    for r in range(repeats):
        for i, text in enumerate(queries):
            t = time.perf_counter()
            q = np.asarray(embedder.embed([f'{text} ({path.stem} {mode} {r} {i})']),
                           dtype=np.float32)[0]
            embed.append(time.perf_counter() - t)
            t = time.perf_counter()
            hits = store.search('', k=10, weights=weights, query_embedding=q)
            plain.append(time.perf_counter() - t)
            assert len(hits) == 10
            t = time.perf_counter()
            store.search('', k=10, weights=weights, query_embedding=q, kinds=['pinned'],
                         person='ada')
            filtered.append(time.perf_counter() - t)
    store.close()
    return {'index': info['index'], 'open_ms': round(opened * 1000, 2),
            'first_search_ms': round(first * 1000, 2), 'query_embed': ms_summary(embed),
            'search': ms_summary(plain), 'filtered_search': ms_summary(filtered),
            'embed_plus_search': ms_summary([a + b for a, b in zip(embed, plain)])}


def raw_scan(path: Path, qvecs: np.ndarray, repeats: int) -> Dict[str, float]:
    """The baseline: every live embedding in one float32 matrix, scanned per query."""
    import sqlite3
    db = sqlite3.connect(str(path))
    blobs = [r[0] for r in db.execute('SELECT embedding FROM memories WHERE embedding IS NOT '
                                      'NULL AND superseded_by IS NULL AND forgotten = 0')]
    db.close()
    matrix = np.frombuffer(b''.join(blobs), dtype=np.float32).reshape(len(blobs), -1)
    times: List[float] = []
    for _ in range(repeats):
        for q in qvecs:
            t = time.perf_counter()
            sims = matrix @ q
            top = np.argpartition(-sims, 9)[:10]
            top[np.argsort(-sims[top])]
            times.append(time.perf_counter() - t)
    return ms_summary(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--sizes', default='1000,10000,100000')
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--hnsw-max', type=int, default=10000)
    parser.add_argument('--torch-threads', type=int, default=0,
                        help="torch's intra-op threads for MiniLM (0 = torch's default)")
    args = parser.parse_args()
    import torch
    if args.torch_threads > 0:
        torch.set_num_threads(args.torch_threads)
    from sage_ros.core.embeddings import shared_embedder
    from sage_ros.core.memory.index import HNSW_THRESHOLD, usearch_available

    rng = np.random.default_rng(args.seed)
    embedder = shared_embedder()
    real_texts = [f'{s} {f}' for s in SUBJECTS for f in FACTS] * 3
    real = np.asarray(embedder.embed(real_texts), dtype=np.float32)
    queries = [q + suffix for suffix in ('', ' please', ' again', ' now', ' today')
               for q in QUERIES]
    qv = np.asarray(embedder.embed(queries), dtype=np.float32)
    results: Dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(s) for s in args.sizes.split(',')):
            path = Path(tmp) / f'm{n}.db'
            insert_s = fill(path, n, rng, real, real_texts)
            row: Dict[str, Any] = {'insert_s': round(insert_s, 2),
                                   'db_mb': round(path.stat().st_size / 2**20, 1),
                                   'raw_scan': raw_scan(path, qv, args.repeats),
                                   'store': measure(path, 'exact', embedder, queries,
                                                    args.repeats)}
            if usearch_available() and n <= args.hnsw_max:
                row['store_hnsw'] = measure(path, 'hnsw', embedder, queries, args.repeats)
            row['store_vs_raw_p95'] = round(row['store']['search']['p95_ms']
                                            / row['raw_scan']['p95_ms'], 2)
            results[str(n)] = row
    report('memory_search', {
        'k': 10, 'queries': len(queries), 'repeats': args.repeats,
        'hnsw_threshold': HNSW_THRESHOLD, 'usearch': usearch_available(),
        'machine_load_1min': round(os.getloadavg()[0], 2),
        'torch_threads': torch.get_num_threads(),
        'embeddings': '300 real MiniLM, the rest random unit vectors around 2000 centres',
        'goal': 'p95 < 50 ms at 10k (mem0: 200 ms p95)', 'results': results})


if __name__ == '__main__':
    main()
