"""Model registry and pool: load with progress, a memory budget and eviction, swap by policy,
fall back when a model cannot be used, generate with streaming (chat), infer (speech, vision,
omni, embedding), and unload that frees memory.

Parts, each one concern:
- `specs`: errors, `ModelSpec` (with its kind), model path schemes;
- `weights`: weight files, safetensors header checks, page-cache read-ahead;
- `memory`: RSS, CUDA and free memory, tensor bytes, glibc tuning, release;
- `events`: progress, loaded models, swap records, results;
- `loader`: one load with progress and measured memory, through the kind's runner;
- `residency`: what is resident, the lock, budget and eviction, persistence;
- `pool`: `ModelPool` serving `generate` and `infer`, with fallback;
- `chat`, `embedding`, `registry`: runners per kind (perception kinds imported on first use).

torch and transformers are imported lazily so that importing the core stays cheap.
"""

from __future__ import annotations

from .chat import ChatRunner
from .embedding import EmbeddingRunner
from .events import (GenerationResult, Generator, InferResult, LoadedModel, LoadProgress,
                     ProgressFn, SwapEvent)
from .memory import (available_memory, cuda_available, pin_malloc_mmap_threshold, process_rss,
                     release_memory, resolve_device, tensor_bytes)
from .pool import ModelPool
from .registry import RunnerRegistry
from .residency import MEASURED_KEY, SWAP_COUNT_KEY, SWAP_STREAM
from .specs import (CHAT_ROLES, DEVICE_PATTERN, DTYPE_BYTES, OFFLINE_PREFIX, OPENCV_PREFIX,
                    PACKAGE_PREFIX, SPEECH_COMPUTE_TYPES, TORCH_DTYPES, Cancelled, LoadError,
                    ModelError, ModelSpec, OverBudget, StopFn, TextFn, UnknownRole, WeightInfo,
                    dtype_choices, model_cache_dir, resolve_model_path)
from .weights import inspect_weights, locate_model_dir, read_through_page_cache

__all__ = [
    'CHAT_ROLES', 'DEVICE_PATTERN', 'DTYPE_BYTES', 'MEASURED_KEY', 'OFFLINE_PREFIX',
    'OPENCV_PREFIX', 'PACKAGE_PREFIX', 'SPEECH_COMPUTE_TYPES', 'SWAP_COUNT_KEY', 'SWAP_STREAM',
    'TORCH_DTYPES', 'Cancelled', 'ChatRunner', 'EmbeddingRunner', 'GenerationResult',
    'Generator', 'InferResult', 'LoadError', 'LoadProgress', 'LoadedModel', 'ModelError',
    'ModelPool', 'ModelSpec', 'OverBudget', 'ProgressFn', 'RunnerRegistry', 'StopFn',
    'SwapEvent', 'TextFn', 'UnknownRole', 'WeightInfo', 'available_memory', 'cuda_available',
    'dtype_choices', 'inspect_weights', 'locate_model_dir', 'model_cache_dir',
    'pin_malloc_mmap_threshold', 'process_rss', 'read_through_page_cache', 'release_memory',
    'resolve_device', 'resolve_model_path', 'tensor_bytes',
]
