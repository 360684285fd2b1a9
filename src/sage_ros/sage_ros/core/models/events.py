"""What the pool reports: load progress, loaded models, swap records and results."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Protocol, Sequence, Tuple

from ..context import FittedContext
from ..conversation import ChatTurn
from ..inference import InferOutput
from .specs import ModelSpec, StopFn, TextFn


@dataclass(frozen=True)
class LoadProgress:
    """One step of a load, for `swap` feedback and status."""

    role: str
    stage: str             # 'unloading', 'tokenizer', 'weights', 'done'
    fraction: float        # [0, 1]
    bytes_done: int = 0    # [bytes] weight file bytes read so far
    bytes_total: int = 0
    shards_done: int = 0   # weight files read so far
    shards_total: int = 0


ProgressFn = Callable[[LoadProgress], None]


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Any
    tokenizer: Any             # the processor (feature extractor, ...) for non-chat kinds
    memory_bytes: int          # [bytes] measured: CUDA allocated delta, else RSS delta (at least
                               # the tensors' bytes)
    load_duration_s: float     # [s] tokenizer + weights, without evictions
    loaded_at: float           # time.time()
    key: str = ''              # spec.key at load time; differs from the spec's after a change
    bytes_read: int = 0        # [bytes] weight file bytes read
    tensor_bytes: int = 0      # [bytes] parameters and buffers of the model
    loaded_mono: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    uses: int = 0              # generations and inferences served
    adapter: str = ''          # directory of the LoRA adapter merged into the weights ('' = none)
    # Concurrency (see `Residency`): one run of this model at a time; `users` counts the calls
    # that hold or wait for `run_lock` (an unload waits for 0); `evicting` refuses new users.
    run_lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    users: int = field(default=0, compare=False)
    evicting: bool = field(default=False, compare=False)

    @property
    def kind(self) -> str:
        return self.spec.kind


@dataclass(frozen=True)
class GenerationResult:
    text: str
    model_id: str
    role: str
    swapped: bool
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    duration_s: float
    requested_role: str = ''   # role asked for; differs from `role` after a fallback or stand-in
    fallback: str = ''         # why another role answered ('' if the requested one did)
    decision: str = ''         # policy action: use, load, swap, substitute, fallback
    context: Optional[FittedContext] = None  # what the model received, fitted to its window
    truncated: bool = False    # stopped at max_new_tokens without its end: `text` was cut back
                               # to its last sentence end (a prefix of what streamed)
    memory_used: int = 0       # recalled memories that fitted the window and were given


@dataclass(frozen=True)
class InferResult:
    """What `ModelPool.infer` gives: the runner's output and how the pool served it."""

    output: InferOutput
    role: str                  # role that served
    requested_role: str
    model_id: str
    kind: str
    swapped: bool              # loaded for this request
    evicted: Tuple[str, ...]   # roles unloaded to make room for this request's load
    fallback: str              # why another role served ('' if the requested one did)
    load_s: float              # [s] evictions + load (0 when it was resident)
    run_s: float               # [s] the runner's own time
    decision: str = ''         # use, load, fallback
    memory_bytes: int = 0      # [bytes] measured memory of the serving model


class Generator(Protocol):
    """What a language block needs to answer: the pool in-process, or the model manager via ROS."""

    def generate(self, role: str, messages: Sequence[ChatTurn], max_new_tokens: int = 0,
                 temperature: float = 0.0, on_text: Optional[TextFn] = None,
                 should_stop: Optional[StopFn] = None,
                 complexity: Optional[str] = None, preamble: str = '',
                 memory: Sequence[str] = ()) -> GenerationResult: ...


@dataclass(frozen=True)
class SwapEvent:
    """One load attempt (a swap when it evicted something), as published and persisted."""

    from_role: str             # first role unloaded to make room ('' if none)
    to_role: str
    reason: str
    duration_s: float          # [s] evictions + load
    succeeded: bool
    finished_at: float         # time.time()
    error: str = ''
    evicted: Tuple[str, ...] = ()
    memory_bytes: int = 0
    bytes_read: int = 0
    unload_s: float = 0.0      # [s] of duration_s spent unloading
    read_s: float = 0.0        # [s] of duration_s spent reading weight files ahead of the load
    model_key: str = ''

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> 'SwapEvent':
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known['evicted'] = tuple(known.get('evicted', ()))
        return cls(**known)
