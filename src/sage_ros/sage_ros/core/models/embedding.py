"""The embedding runner: a sentence encoder (MiniLM) served by the pool; `embed` gives unit-norm
vectors, the same computation as `core.embeddings` (mean pooling, then L2 normalisation)."""

from __future__ import annotations

import time
from typing import Any, Optional, Tuple

from ..embeddings import encode, load_encoder
from ..inference import KIND_EMBEDDING, TASK_EMBED, InferOutput, InferRequest
from ..loading import from_transformers
from .events import LoadedModel, LoadProgress, ProgressFn
from .memory import tensor_bytes
from .specs import Cancelled, ModelError, ModelSpec, StopFn, WeightInfo
from .weights import inspect_weights

MAX_LENGTH = 256      # tokens per text
BATCH = 64            # texts per forward pass


class EmbeddingRunner:
    kind = KIND_EMBEDDING

    def inspect(self, spec: ModelSpec) -> WeightInfo:
        return inspect_weights(spec)

    def import_libraries(self) -> None:
        """Import transformers before the pool measures the load's memory."""
        from_transformers('AutoModel', 'AutoTokenizer')

    def load(self, spec: ModelSpec, info: WeightInfo, report: ProgressFn,
             should_stop: Optional[StopFn]) -> Tuple[Any, Any]:
        shards, total = len(info.files), info.file_bytes
        if should_stop and should_stop():
            raise Cancelled(f'load of role {spec.role!r} cancelled')
        report(LoadProgress(spec.role, 'weights', 0.85, total, total, shards, shards))
        return load_encoder(info.directory, spec.dtype, spec.device)

    def tensor_bytes(self, model: Any) -> int:
        return tensor_bytes(model)

    def run(self, loaded: LoadedModel, request: InferRequest,
            should_stop: Optional[StopFn]) -> InferOutput:
        if request.task != TASK_EMBED:
            raise ModelError(f'role {loaded.spec.role!r} (embedding) cannot do task '
                             f'{request.task!r}')
        texts = [str(t) for t in request.texts]
        if not texts:
            raise ModelError('an embed request needs at least one text')
        t0 = time.monotonic()
        parts = []
        for i in range(0, len(texts), BATCH):
            if should_stop and should_stop():
                raise Cancelled('embedding cancelled')
            parts.append(encode(loaded.model, loaded.tokenizer, texts[i:i + BATCH], MAX_LENGTH))
        import numpy as np
        vectors = np.concatenate(parts, axis=0)
        return InferOutput(vectors=vectors, run_s=time.monotonic() - t0,
                           extra={'texts': len(texts), 'dim': int(vectors.shape[1])})
