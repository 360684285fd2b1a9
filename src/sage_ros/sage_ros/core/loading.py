"""One model load at a time per process.

transformers' `from_pretrained` sets torch's process-wide default dtype while it builds a model.
When every node runs in one process (`sage up`, `sage chat` with an embedded graph), the model
manager's loader thread and the MiniLM loads for salience and routing would otherwise overlap,
and a bf16 model could come out with float32 layers ("expected m1 and m2 to have the same
dtype"). Every `from_pretrained` in sage_ros holds this lock.
"""

from __future__ import annotations

import threading
from typing import Any, Tuple

PRETRAINED_LOAD_LOCK = threading.Lock()

_IMPORT_LOCK = threading.Lock()


def from_transformers(*names: str) -> Tuple[Any, ...]:
    """transformers' lazily imported classes, resolved one thread at a time.

    transformers imports a class's module on first attribute access; two threads doing that at
    once (the MiniLM embedder and the model manager's loader thread in one `sage up` process)
    can see a half-initialised module and raise ImportError.
    """
    with _IMPORT_LOCK:
        import transformers
        return tuple(getattr(transformers, name) for name in names)
