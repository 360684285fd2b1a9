"""The in-RAM vector index over memory embeddings, derived from the SQLite file.

SQLite is the source of truth: an index holds (memory id, unit vector) pairs copied from the
`memories` table and is rebuilt or caught up from it (see `MemoryStore`), so a crash can never
make it lose or invent a memory; a stale entry is dropped when its row is fetched.

Two implementations behind one interface, chosen by measurement (bench/memory_index.py and
bench/memory_search.py, BENCHMARKS.md): `ExactIndex` (a float32 matrix and one matrix-vector
product: recall 1.0, built in 0.1 s from 100k embeddings, search p95 ~6 ms at 100k on 2 cores)
is the default; `HnswIndex` (usearch's HNSW graph: sub-millisecond search but 100-175 s to build
100k on 2 cores, approximate) is opt-in (`index='hnsw'`, or `hnsw_threshold` live vectors) for
stores far beyond 100k memories. Because the index is derived and rebuilt at each process's
first search, HNSW's build time would be paid by every `sage memory search`.
"""

from __future__ import annotations

import importlib.util
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np

HNSW_THRESHOLD: Optional[int] = None   # [vectors] switch to HNSW at this many; None = never


def usearch_available() -> bool:
    """Whether usearch can be imported (it is in requirements/python.txt; optional on robots)."""
    if importlib.util.find_spec('usearch') is None:
        return False
    try:
        import usearch.index  # noqa: F401
    except ImportError:
        return False
    return True


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows as float32 unit vectors (a zero row stays zero), so a dot product is a cosine."""
    v = np.asarray(vectors, dtype=np.float32)
    if v.ndim == 1:
        v = v[None, :]
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return np.where(norms > 0, v / np.maximum(norms, 1e-12), v).astype(np.float32, copy=False)


def _dot(matrix: np.ndarray, query: np.ndarray) -> np.ndarray:
    """matrix @ query without BLAS: numpy's own single-threaded loop. BLAS wakes its thread
    pool for a large matrix-vector product, and right after torch has embedded the query (its
    threads still spinning) that costs 5-15 ms at 10k rows on 2 cores instead of 0.3 ms
    (bench/memory_search.py)."""
    return np.einsum('ij,j->i', matrix, query)


class VectorIndex(Protocol):
    """Ids and unit vectors; search returns (ids, cosine similarities), best first."""

    dim: int

    def add(self, ids: Sequence[int], vectors: np.ndarray) -> None: ...
    def remove(self, ids: Sequence[int]) -> None: ...
    def search(self, query: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]: ...
    def similarities(self, query: np.ndarray, ids: Sequence[int]
                     ) -> Tuple[np.ndarray, np.ndarray]: ...
    def __len__(self) -> int: ...
    def __contains__(self, memory_id: object) -> bool: ...


class ExactIndex:
    """A growable float32 matrix: exact cosine top-k by one matrix-vector product."""

    name = 'numpy-exact'

    def __init__(self, dim: int, capacity: int = 1024) -> None:
        self.dim = dim
        self._vecs = np.zeros((max(capacity, 16), dim), dtype=np.float32)
        self._ids = np.zeros(max(capacity, 16), dtype=np.int64)
        self._row: Dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, memory_id: object) -> bool:
        return memory_id in self._row

    def add(self, ids: Sequence[int], vectors: np.ndarray) -> None:
        vecs = normalise(vectors)
        keys = [int(i) for i in ids]
        if len(set(keys)) == len(keys) and not any(k in self._row for k in keys):
            start, end = len(self._row), len(self._row) + len(keys)   # all new: one block
            if end > len(self._ids):
                grow = max(end, len(self._ids) * 2)
                self._vecs = np.resize(self._vecs, (grow, self.dim))
                self._ids = np.resize(self._ids, grow)
            self._vecs[start:end] = vecs
            self._ids[start:end] = keys
            self._row.update(zip(keys, range(start, end)))
            return
        for memory_id, vec in zip(keys, vecs):
            row = self._row.get(int(memory_id))
            if row is None:
                row = len(self._row)
                if row >= len(self._ids):
                    grow = len(self._ids) * 2
                    self._vecs = np.resize(self._vecs, (grow, self.dim))
                    self._ids = np.resize(self._ids, grow)
                self._row[int(memory_id)] = row
                self._ids[row] = int(memory_id)
            self._vecs[row] = vec

    def remove(self, ids: Sequence[int]) -> None:
        for memory_id in ids:
            row = self._row.pop(int(memory_id), None)
            if row is None:
                continue
            last = len(self._row)          # the row count after the pop
            if row != last:                # move the last row into the hole
                moved = int(self._ids[last])
                self._vecs[row] = self._vecs[last]
                self._ids[row] = moved
                self._row[moved] = row

    def search(self, query: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        n = len(self._row)
        if n == 0 or k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        sims = _dot(self._vecs[:n], normalise(query)[0])
        if k < n:
            top = np.argpartition(-sims, k - 1)[:k]
        else:
            top = np.arange(n)
        order = top[np.argsort(-sims[top], kind='stable')]
        return self._ids[order].copy(), sims[order]

    def similarities(self, query: np.ndarray, ids: Sequence[int]
                     ) -> Tuple[np.ndarray, np.ndarray]:
        """Exact similarity to the given ids that are in the index (the filtered fallback)."""
        rows = [self._row[i] for i in ids if i in self._row]
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        r = np.asarray(rows, dtype=np.int64)
        return self._ids[r].copy(), _dot(self._vecs[r], normalise(query)[0])


class HnswIndex:
    """usearch's HNSW graph (inner product on unit vectors = cosine), f32, with the vectors
    also kept so that a filtered fallback can score exactly."""

    name = 'usearch-hnsw'

    def __init__(self, dim: int, connectivity: int = 16, expansion_add: int = 128,
                 expansion_search: int = 64) -> None:
        from usearch.index import Index

        self.dim = dim
        self._index = Index(ndim=dim, metric='ip', dtype='f32', connectivity=connectivity,
                            expansion_add=expansion_add, expansion_search=expansion_search)
        self._exact = ExactIndex(dim)

    def __len__(self) -> int:
        return len(self._exact)

    def __contains__(self, memory_id: object) -> bool:
        return memory_id in self._exact

    def add(self, ids: Sequence[int], vectors: np.ndarray) -> None:
        vecs = normalise(vectors)
        keys = np.asarray([int(i) for i in ids], dtype=np.uint64)
        again = [int(k) for k in keys if int(k) in self._exact]
        if again:                          # usearch keeps duplicates: replace instead
            self._index.remove(np.asarray(again, dtype=np.uint64))
        if len(keys):
            self._index.add(keys, vecs)
        self._exact.add(ids, vecs)

    def remove(self, ids: Sequence[int]) -> None:
        present = [int(i) for i in ids if int(i) in self._exact]
        if present:
            self._index.remove(np.asarray(present, dtype=np.uint64))
        self._exact.remove(present)

    def search(self, query: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        if len(self) == 0 or k <= 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
        matches = self._index.search(normalise(query)[0], min(k, len(self)))
        keys = np.asarray(matches.keys, dtype=np.int64)
        return keys, (1.0 - np.asarray(matches.distances, dtype=np.float32))

    def similarities(self, query: np.ndarray, ids: Sequence[int]
                     ) -> Tuple[np.ndarray, np.ndarray]:
        return self._exact.similarities(query, ids)


def make_index(dim: int, expected: int, hnsw_threshold: Optional[int] = HNSW_THRESHOLD,
               prefer: Optional[str] = None) -> VectorIndex:
    """The index for about `expected` vectors: 'exact' or 'hnsw' forced by `prefer`, else exact
    unless `hnsw_threshold` is set and reached. HNSW needs usearch: without it, exact."""
    if prefer not in (None, 'exact', 'hnsw'):
        raise ValueError(f"unknown index {prefer!r} (exact or hnsw)")
    wants_hnsw = prefer == 'hnsw' or (prefer is None and hnsw_threshold is not None
                                      and expected >= hnsw_threshold)
    if wants_hnsw and usearch_available():
        return HnswIndex(dim)
    return ExactIndex(dim, capacity=max(expected, 1024))   # also when usearch is missing


def index_name(index: VectorIndex) -> str:
    """'numpy-exact' or 'usearch-hnsw' (for status and benchmarks)."""
    return str(getattr(index, 'name', type(index).__name__))


__all__: List[str] = ['ExactIndex', 'HnswIndex', 'VectorIndex', 'make_index', 'normalise',
                      'usearch_available', 'index_name', 'HNSW_THRESHOLD']
