"""What a non-chat model entry takes and gives (speech to text, vision, omni, embeddings), and
the runner interface every model kind implements for the model pool.

ROS-free: the model manager node turns an `Infer` goal into an `InferRequest` and an
`InferOutput` into its result; tests and benchmarks call runners directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, Optional, Protocol, Tuple, Union

import numpy as np

if TYPE_CHECKING:  # no import cycle at run time: the pool imports this module
    from .models import LoadedModel, LoadProgress, ModelSpec, WeightInfo

StopFn = Callable[[], bool]

# Model kinds (`models.<role>.kind`); 'chat' entries answer Generate goals, the others Infer.
KIND_CHAT = 'chat'
KIND_SPEECH = 'speech'
KIND_VISION = 'vision'
KIND_OMNI = 'omni'
KIND_EMBEDDING = 'embedding'
KINDS = (KIND_CHAT, KIND_SPEECH, KIND_VISION, KIND_OMNI, KIND_EMBEDDING)

# Infer tasks, and the kinds that serve each.
TASK_TRANSCRIBE = 'transcribe'
TASK_DETECT = 'detect'
TASK_OMNI = 'omni'
TASK_EMBED = 'embed'
TASK_KINDS = {TASK_TRANSCRIBE: (KIND_SPEECH, KIND_OMNI), TASK_DETECT: (KIND_VISION, KIND_OMNI),
              TASK_OMNI: (KIND_OMNI,), TASK_EMBED: (KIND_EMBEDDING,)}


class MediaError(ValueError):
    """An audio or image payload that cannot be used; the message says why, for a log line."""


def read_media_file(path: Union[str, Path], limit: int = -1) -> bytes:
    """A media file's bytes (all of them, or the first `limit`). MediaError, in one line, for
    a missing, unreadable or empty file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise MediaError(f'no such file: {p}')
    try:
        with p.open('rb') as f:
            data = f.read(limit)
    except OSError as exc:
        raise MediaError(f'cannot read {p}: {exc.strerror or exc}') from exc
    if not data:
        raise MediaError(f'{p.name}: empty file (0 bytes)')
    return data


@dataclass(frozen=True)
class Detection:
    """One thing a vision model found; box in pixels of the image it was given."""

    label: str
    score: float            # [0, 1]
    x: int = 0
    y: int = 0
    width: int = 0
    height: int = 0


@dataclass
class InferRequest:
    """One input for a non-chat model. `audio` is mono float32 in [-1, 1] at `sample_rate`;
    `image` is an RGB uint8 array (H, W, 3). Either may be None."""

    task: str
    audio: Optional[np.ndarray] = None
    sample_rate: int = 16000
    image: Optional[np.ndarray] = None
    prompt: str = ''
    texts: Tuple[str, ...] = ()
    respond: bool = False
    max_new_tokens: int = 0


@dataclass
class InferOutput:
    """What a runner returns; `run_s` is the model's own time (no loading, no queueing)."""

    text: str = ''
    language: str = ''
    detections: List[Detection] = field(default_factory=list)
    vectors: Optional[np.ndarray] = None   # embed: (len(texts), dim) float32, unit norm
    run_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)   # runner-specific figures (for logs)


class Runner(Protocol):
    """Loads and runs one model kind. The pool owns residency, the memory budget, eviction,
    fallback and progress; a runner only knows its files and its model.

    - `inspect` checks the entry's files without loading them (missing or corrupt: LoadError
      with what to do) and estimates the memory the loaded model takes.
    - `load` returns (model, processor) where processor is the tokenizer/feature extractor or
      None; it reports progress and honours `should_stop` between steps.
    - `tensor_bytes` is the floor of the measured memory (0 when the kind cannot tell, e.g. a
      CTranslate2 model: the pool then measures the process RSS only).
    - `run` serves one request with a loaded model; an input the model cannot use raises
      MediaError, a failure of the model ModelError.
    """

    kind: str

    def inspect(self, spec: 'ModelSpec') -> 'WeightInfo': ...

    def load(self, spec: 'ModelSpec', info: 'WeightInfo',
             report: Callable[['LoadProgress'], None],
             should_stop: Optional[StopFn]) -> Tuple[Any, Any]: ...

    def tensor_bytes(self, model: Any) -> int: ...

    def run(self, loaded: 'LoadedModel', request: InferRequest,
            should_stop: Optional[StopFn]) -> InferOutput: ...
