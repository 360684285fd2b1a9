"""One model load at a time per process.

transformers' `from_pretrained` sets torch's process-wide default dtype while it builds a model.
When every node runs in one process (`sage up`, `sage chat` with an embedded graph), the model
manager's loader thread and the MiniLM loads for salience and routing would otherwise overlap,
and a bf16 model could come out with float32 layers ("expected m1 and m2 to have the same
dtype"). Every `from_pretrained` in sage_ros holds this lock.
"""

from __future__ import annotations

import threading

PRETRAINED_LOAD_LOCK = threading.Lock()
