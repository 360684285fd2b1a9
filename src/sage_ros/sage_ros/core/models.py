"""Model registry and pool: load with progress, a memory budget and eviction, swap by policy,
fall back when a model cannot be used, generate with streaming, and unload that frees memory.

torch and transformers are imported lazily so that importing the core stays cheap.
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import re
import struct
import threading
import time
import weakref
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import (Any, Callable, Deque, Dict, Iterator, List, Mapping, Optional, Protocol,
                    Sequence, Tuple)

from .answers import cut_to_sentence
from .context import (DEFAULT_MEMORY_SHARE, ContextOverflow, FittedContext, SummaryCache,
                      fit_to_window, summary_request)
from .conversation import ChatTurn
from .loading import PRETRAINED_LOAD_LOCK, from_transformers
from .store import StateStore
from .swap_policy import (Action, Decision, MemoryState, ResidentInfo, RoleInfo, SwapPolicy,
                          plan_memory)

OFFLINE_PREFIX = 'offline:'
CHAT_ROLES = frozenset({'system', 'user', 'assistant'})

# Bytes per element of the dtypes a role may be loaded in.
DTYPE_BYTES: Dict[str, int] = {'float32': 4, 'float16': 2, 'bfloat16': 2, 'float64': 8}
# Bytes per element of safetensors dtypes; floating ones are converted to the load dtype.
_ST_BYTES: Dict[str, int] = {'F64': 8, 'F32': 4, 'F16': 2, 'BF16': 2, 'F8_E4M3': 1, 'F8_E5M2': 1,
                             'I64': 8, 'I32': 4, 'I16': 2, 'I8': 1, 'U64': 8, 'U32': 4, 'U16': 2,
                             'U8': 1, 'BOOL': 1}
_ST_FLOAT = frozenset({'F64', 'F32', 'F16', 'BF16', 'F8_E4M3', 'F8_E5M2'})
_MAX_HEADER_BYTES = 100 << 20
DEVICE_PATTERN = re.compile(r'^(cpu|mps|cuda(:\d+)?)$')
SWAP_STREAM = 'model_manager/swaps'          # StateStore log of swap records
SWAP_COUNT_KEY = 'model_manager/swap_count'  # StateStore counter, continues across restarts
MEASURED_KEY = 'model_manager/measured'      # StateStore: measured memory per model entry

TextFn = Callable[[str], None]
StopFn = Callable[[], bool]


class ModelError(RuntimeError):
    """A model could not be used; the message says why and what to do."""


class UnknownRole(ModelError):
    pass


class LoadError(ModelError):
    """A model's files are missing, corrupt or cannot be loaded."""


class OverBudget(LoadError):
    """A model does not fit in memory even after evicting every other resident model."""


class Cancelled(ModelError):
    pass


def model_cache_dir() -> Path:
    """Where `sage models prepare` puts converted offline models."""
    env = os.environ.get('SAGE_MODEL_CACHE')
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(xdg) / 'sage_ros' / 'models'


def resolve_model_path(path: str) -> str:
    """`offline:NAME` -> the prepared cache dir; `~` and `$VARS` expanded; hub ids unchanged."""
    if path.startswith(OFFLINE_PREFIX):
        return str(model_cache_dir() / path[len(OFFLINE_PREFIX):])
    return os.path.expandvars(os.path.expanduser(path))


@dataclass(frozen=True)
class ModelSpec:
    """One role's model, as configured."""

    role: str
    model_id: str
    path: str                   # directory, `offline:NAME`, or a hub id present in the local cache
    dtype: str = 'bfloat16'
    device: str = 'cpu'
    max_new_tokens: int = 128
    context_window: int = 2048
    keep_resident: bool = False  # may stay resident next to other keep_resident models
    priority: int = 0            # capability rank: higher = more capable (a stand-in for lower)
    fallback: Tuple[str, ...] = ()  # roles tried in order when this one cannot be used
    adapter: str = ''            # LoRA merged after load: '' = none, 'latest' = the current
                                 # sleep-trained adapter of this model (if any), or a directory

    def __post_init__(self) -> None:
        if not self.role or not self.path:
            raise ValueError('a model spec needs a role and a path')
        if self.max_new_tokens < 1 or self.context_window < 16:
            raise ValueError(f'role {self.role!r}: max_new_tokens and context_window must be '
                             'positive')
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f'role {self.role!r}: unknown dtype {self.dtype!r}; expected one of '
                             f'{", ".join(DTYPE_BYTES)}')
        if not DEVICE_PATTERN.match(self.device):
            raise ValueError(f'role {self.role!r}: unknown device {self.device!r}; expected cpu, '
                             'cuda, cuda:N or mps')

    @property
    def key(self) -> str:
        """Identity of the weights in memory: a change of any part means a reload."""
        key = f'{resolve_model_path(self.path)}|{self.dtype}|{self.device}'
        return f'{key}|{self.adapter.strip()}' if self.adapter.strip() else key


@dataclass(frozen=True)
class WeightInfo:
    """A model directory's weight files, checked for presence and intact headers."""

    directory: Path
    files: Tuple[Path, ...]
    file_bytes: int        # [bytes] on disk
    estimated_bytes: int   # [bytes] in memory once loaded in the spec's dtype


def _not_found(spec: ModelSpec, where: str) -> LoadError:
    hint = ' (run `sage models prepare`)' if spec.path.startswith(OFFLINE_PREFIX) else ''
    return LoadError(f'model for role {spec.role!r} not found: {where}{hint}')


def locate_model_dir(spec: ModelSpec) -> Path:
    """The local directory of a spec's model: a path, an offline name, or a hub id that is
    already in the local Hugging Face cache (nothing is ever downloaded)."""
    path = resolve_model_path(spec.path)
    if path.startswith(('/', '.', '~')) or spec.path.startswith(OFFLINE_PREFIX) \
            or os.path.isdir(path):
        if not (Path(path) / 'config.json').is_file():
            raise _not_found(spec, f'no config.json in {path}')
        return Path(path)
    try:
        from huggingface_hub import snapshot_download
        local = Path(str(snapshot_download(path, local_files_only=True)))
    except Exception:  # any failure here means "not in the local cache"
        raise _not_found(spec, f'{path!r} is neither a directory nor in the local Hugging Face '
                               'cache') from None
    if not (local / 'config.json').is_file():
        raise _not_found(spec, f'no config.json in {local}')
    return local


def _weight_files(spec: ModelSpec, directory: Path) -> List[Path]:
    for index_name, single in (('model.safetensors.index.json', 'model.safetensors'),
                               ('pytorch_model.bin.index.json', 'pytorch_model.bin')):
        index = directory / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())['weight_map'].values()))
                if not all(isinstance(n, str) and n for n in names):
                    raise TypeError('weight file names must be strings')
            except (ValueError, KeyError, TypeError, AttributeError):
                raise LoadError(f'cannot load model for role {spec.role!r}: {index} is not a '
                                'valid weight index') from None
            files = [directory / n for n in names]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise LoadError(f'cannot load model for role {spec.role!r}: weight file(s) '
                                f'{", ".join(missing)} missing in {directory}')
            return files
        if (directory / single).is_file():
            return [directory / single]
    raise LoadError(f'cannot load model for role {spec.role!r}: no weight files '
                    f'(model.safetensors or pytorch_model.bin) in {directory}')


def _safetensors_bytes(spec: ModelSpec, file: Path, itemsize: int) -> int:
    """Memory the file's tensors take in the load dtype; raises LoadError if the header is
    unreadable or the data is shorter than the header says (a truncated or garbled file)."""
    def corrupt(what: str) -> LoadError:
        return LoadError(f'cannot load model for role {spec.role!r}: {file} is corrupt ({what})')

    size = file.stat().st_size
    with open(file, 'rb') as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise corrupt('shorter than a safetensors header')
        n = struct.unpack('<Q', head)[0]
        if n < 2 or n > _MAX_HEADER_BYTES or 8 + n > size:
            raise corrupt('bad header length')
        try:
            header = json.loads(fh.read(n))
        except (ValueError, UnicodeDecodeError):
            raise corrupt('header is not valid JSON') from None
    if not isinstance(header, dict):
        raise corrupt('header is not a table of tensors')
    data_bytes, end, total = size - 8 - n, 0, 0
    for name, t in header.items():
        if name == '__metadata__':
            continue
        try:
            dtype, shape, (begin, stop) = t['dtype'], t['shape'], t['data_offsets']
            numel = math.prod(int(d) for d in shape)
            begin, stop = int(begin), int(stop)
            known = isinstance(dtype, str) and dtype in _ST_BYTES
        except (KeyError, TypeError, ValueError):
            raise corrupt(f'bad entry for tensor {name!r}') from None
        if not known:
            raise corrupt(f'unknown dtype {dtype!r} of tensor {name!r}')
        if stop - begin != numel * _ST_BYTES[dtype]:
            raise corrupt(f'tensor {name!r} has the wrong number of bytes')
        end = max(end, stop)
        total += numel * (itemsize if dtype in _ST_FLOAT else _ST_BYTES[dtype])
    if end > data_bytes:
        raise corrupt(f'truncated: {data_bytes} of {end} data bytes present')
    return total


def inspect_weights(spec: ModelSpec) -> WeightInfo:
    """Find a spec's weight files, check them and estimate their memory (no weights are read)."""
    try:
        return _inspect_weights(spec)
    except OSError as exc:   # unreadable files are a broken model, not a crash
        raise LoadError(f'cannot load model for role {spec.role!r}: {exc}') from None


def _inspect_weights(spec: ModelSpec) -> WeightInfo:
    directory = locate_model_dir(spec)
    files = _weight_files(spec, directory)
    itemsize = DTYPE_BYTES[spec.dtype]
    file_bytes = sum(f.stat().st_size for f in files)
    if files[0].suffix == '.safetensors':
        estimate = sum(_safetensors_bytes(spec, f, itemsize) for f in files)
    else:  # pickled weights: scale the file size by the dtype ratio
        try:
            cfg = json.loads((directory / 'config.json').read_text())
        except ValueError:
            raise LoadError(f'cannot load model for role {spec.role!r}: '
                            f'{directory / "config.json"} is not valid JSON') from None
        stored = str(cfg.get('dtype') or cfg.get('torch_dtype') or 'float32')
        estimate = file_bytes * itemsize // DTYPE_BYTES.get(stored, 4)
    return WeightInfo(directory, tuple(files), file_bytes, estimate)


def read_through_page_cache(file: Path, chunk_bytes: int) -> Iterator[int]:
    """Read a file into the page cache chunk by chunk, yielding the bytes of each chunk. On
    Linux the pages are spliced to /dev/null (`sendfile`): the disk is read, nothing is copied
    to user space (27 GB/s from a warm cache here, 2.5x faster than `readinto`)."""
    size = file.stat().st_size
    with open(file, 'rb', buffering=0) as fh:
        try:
            null = os.open(os.devnull, os.O_WRONLY)
        except OSError:  # pragma: no cover - no /dev/null
            null = -1
        try:
            offset = 0
            while null >= 0 and offset < size:
                try:
                    sent = os.sendfile(null, fh.fileno(), offset, min(chunk_bytes, size - offset))
                except (OSError, AttributeError):  # no sendfile here: copy below
                    break
                if sent <= 0:
                    break
                offset += sent
                yield sent
        finally:
            if null >= 0:
                os.close(null)
        if offset < size:
            fh.seek(offset)
            buffer = memoryview(bytearray(chunk_bytes))
            while True:
                got = fh.readinto(buffer)
                if not got:
                    break
                yield got


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
    tokenizer: Any
    memory_bytes: int          # [bytes] measured: CUDA allocated delta, else RSS delta (at least
                               # the tensors' bytes)
    load_duration_s: float     # [s] tokenizer + weights, without evictions
    loaded_at: float           # time.time()
    key: str = ''              # spec.key at load time; differs from the spec's after a change
    bytes_read: int = 0        # [bytes] weight file bytes read
    tensor_bytes: int = 0      # [bytes] parameters and buffers of the model
    loaded_mono: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    uses: int = 0              # generations served
    adapter: str = ''          # directory of the LoRA adapter merged into the weights ('' = none)


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


def process_rss() -> int:
    import psutil
    return int(psutil.Process().memory_info().rss)


def _device_allocated(device: str) -> int:
    import torch
    if device.startswith('cuda') and torch.cuda.is_available():
        return int(torch.cuda.memory_allocated(torch.device(device)))
    return 0


def cuda_available() -> bool:
    import torch
    return bool(torch.cuda.is_available())


def resolve_device(device: str, cpu_fallback: bool) -> Tuple[str, str]:
    """(device to load on, why it is not the configured one ('' if it is)). `auto` = cuda when
    available, else cpu; a cuda device falls back to the cpu without CUDA if `cpu_fallback`."""
    if device == 'auto':
        return ('cuda' if cuda_available() else 'cpu'), ''
    if device.startswith('cuda') and cpu_fallback and not cuda_available():
        return 'cpu', (f'configured for {device} but CUDA is not available: loading on the '
                       'CPU (set cpu_fallback false to fail instead)')
    return device, ''


def available_memory(device: str) -> int:
    """Free memory now: the CUDA device's if the role runs there, else the system's."""
    if device.startswith('cuda'):
        import torch
        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil
    return int(psutil.virtual_memory().available)


def _tensor_bytes(model: Any) -> int:
    """Bytes of a model's parameters and buffers, tied weights counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.data_ptr()
        if ptr in seen:
            continue
        seen.add(ptr)
        total += t.numel() * t.element_size()
    return total


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def pin_malloc_mmap_threshold(nbytes: int) -> bool:
    """Fix glibc's mmap threshold (it otherwise grows after big frees, up to 32 MiB, so that
    later weight-sized allocations land in the heap and stay there after unload, as
    fragmentation `malloc_trim` cannot return). Allocations of `nbytes` and more are then
    always mmapped and go back to the system when freed. Process-wide; False if not glibc."""
    try:
        return bool(ctypes.CDLL('libc.so.6').mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
    except (OSError, AttributeError):
        return False


def release_memory(collect: bool = True) -> None:
    """Return freed model memory to the system: GC (skipped with `collect=False` when the caller
    knows nothing is left to collect: a full collection costs ~0.2 s in a process holding
    transformers), the CUDA cache and, on glibc, the heap."""
    if collect:
        gc.collect()
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class ModelPool:
    """Loads models by role within a memory budget, picks per request which resident model
    answers (`SwapPolicy`), falls back to other roles when one cannot be used, and generates.

    One lock serialises loads, unloads and generations: a swap never pulls a model out from
    under a running generation. Waiting for the lock is cancellable (`should_stop`).

    Settings (`max_resident`, `memory_budget_bytes`, `memory_reserve_bytes`, `preread_weights`,
    `preread_chunk_bytes`, `retry_failed_s`, `policy.config`) are plain attributes that may be
    changed between calls. `malloc_mmap_threshold` (bytes, 0 = leave glibc alone) is applied to
    the process once, at construction: see `pin_malloc_mmap_threshold`.
    """

    def __init__(self, specs: Mapping[str, ModelSpec], default_role: str,
                 max_resident: int = 1, *, memory_budget_bytes: int = 0,
                 memory_reserve_bytes: int = 0, policy: Optional[SwapPolicy] = None,
                 preread_weights: bool = True, preread_chunk_bytes: int = 16 << 20,
                 retry_failed_s: float = 60.0, history_limit: int = 50,
                 store: Optional[StateStore] = None,
                 malloc_mmap_threshold: int = 128 << 10, summary_tokens: int = 96) -> None:
        if default_role not in specs:
            raise UnknownRole(f'default role {default_role!r} is not among the configured roles '
                              f'{sorted(specs)}')
        if max_resident < 1:
            raise ValueError('max_resident must be at least 1')
        if memory_budget_bytes < 0 or memory_reserve_bytes < 0 or preread_chunk_bytes < 1:
            raise ValueError('memory figures and the read chunk must not be negative')
        if malloc_mmap_threshold > 0:
            pin_malloc_mmap_threshold(malloc_mmap_threshold)
        self.specs: Dict[str, ModelSpec] = dict(specs)
        self.default_role = default_role
        self.max_resident = max_resident
        self.memory_budget_bytes = memory_budget_bytes
        self.memory_reserve_bytes = memory_reserve_bytes
        self.policy = policy or SwapPolicy()
        self.preread_weights = preread_weights
        self.preread_chunk_bytes = preread_chunk_bytes
        self.retry_failed_s = retry_failed_s
        self.store = store
        self.summary_tokens = summary_tokens   # 0 = extractive summaries only
        self.memory_share = DEFAULT_MEMORY_SHARE   # of the window for preamble + memories
        self._summaries = SummaryCache()
        self._loaded: Dict[str, LoadedModel] = {}   # insertion order = least recently used first
        self._lock = threading.RLock()
        self._busy_depth = 0
        self.loading_role = ''
        self.history: Deque[SwapEvent] = deque(maxlen=max(1, history_limit))
        self.swap_count = 0
        self.errors: 'OrderedDict[str, str]' = OrderedDict()  # role -> load error, newest last
        self._failures: Dict[str, Tuple[str, str, float]] = {}  # role -> (key, error, monotonic)
        self._measured: Dict[str, int] = {}  # spec key -> measured memory bytes
        self.listeners: List[Callable[[], None]] = []  # called after any change of state
        self.progress_listeners: List[ProgressFn] = []  # called at every step of every load
        # Called with (level 'info' | 'warning', text) for what a load did that the log should
        # say: an adapter applied, or not applied and why (the base model serves then).
        self.note_listeners: List[Callable[[str, str], None]] = []
        # One long-lived thread runs every generation while the caller streams the text: a new
        # thread per call would set up its CUDA state (cuBLAS handle, workspace) each time.
        self._generation_thread = ThreadPoolExecutor(max_workers=1,
                                                     thread_name_prefix='generate')
        if store is not None:
            self._restore(store)

    # ---- persistence -------------------------------------------------------------------------
    def _restore(self, store: StateStore) -> None:
        """Swap count, recent history and measured memory from a previous run."""
        self.swap_count = int(store.get(SWAP_COUNT_KEY, 0) or 0)
        measured = store.get(MEASURED_KEY, {}) or {}
        self._measured = {str(k): int(v) for k, v in measured.items()}
        keys = {s.role: s.key for s in self.specs.values()}
        for raw in reversed(store.recent(SWAP_STREAM, self.history.maxlen or 50)):
            try:
                event = SwapEvent.from_dict(raw)
            except (TypeError, ValueError):
                continue  # a record from an incompatible version: skip it
            self.history.append(event)
            if event.succeeded and keys.get(event.to_role) == event.model_key:
                self.policy.observe_load(event.to_role, event.duration_s)

    def _record(self, event: SwapEvent) -> None:
        self.history.append(event)
        self.swap_count += 1
        if self.store is not None:
            self.store.append(SWAP_STREAM, event.to_dict(), keep=1000)
            self.store.put(SWAP_COUNT_KEY, self.swap_count)

    # ---- queries -------------------------------------------------------------------------
    @property
    def swaps(self) -> List[SwapEvent]:
        """Recent load attempts, oldest first (bounded by `history_limit`)."""
        return list(self.history)

    @property
    def busy(self) -> bool:
        return self._busy_depth > 0

    @property
    def last_error(self) -> str:
        """The newest load error of a role that has not loaded since ('' if none)."""
        return next(reversed(self.errors.values()), '')

    def loaded(self) -> List[LoadedModel]:
        return list(self._loaded.values())

    def is_loaded(self, role: str) -> bool:
        entry = self._loaded.get(role)
        return entry is not None and entry.key == self.specs[role].key

    def spec(self, role: str) -> ModelSpec:
        role = role or self.default_role
        try:
            return self.specs[role]
        except KeyError:
            raise UnknownRole(f'unknown model role {role!r}; configured roles: '
                              f'{", ".join(sorted(self.specs))}') from None

    def memory_used(self) -> int:
        return sum(e.memory_bytes for e in self.loaded())

    def memory_available(self) -> int:
        return available_memory(self.specs[self.default_role].device)

    def estimate_need(self, role: str) -> int:
        """Memory the role will take: measured at its last load, else from its weight files."""
        spec = self.spec(role)
        return self._measured.get(spec.key) or inspect_weights(spec).estimated_bytes

    def _memory_state(self, device: str) -> MemoryState:
        return MemoryState(max_resident=self.max_resident, budget_bytes=self.memory_budget_bytes,
                           available_bytes=available_memory(device),
                           reserve_bytes=self.memory_reserve_bytes)

    def _residents(self) -> List[ResidentInfo]:
        return [ResidentInfo(e.spec.role, e.spec.priority, e.spec.keep_resident, e.memory_bytes,
                             e.loaded_mono, e.last_used, e.uses)
                for e in self.loaded() if e.key == self.specs[e.spec.role].key]

    def decide(self, role: str, complexity: Optional[str] = None) -> Decision:
        """What the policy would do for a request to `role` now (updates its streak)."""
        spec = self.spec(role)
        try:
            need = self.estimate_need(spec.role)
        except LoadError:
            need = 0  # the load will fail and fall back; the decision does not need the figure
        info = RoleInfo(spec.role, spec.priority, spec.keep_resident, need)
        return self.policy.decide(info, self._residents(), self._memory_state(spec.device),
                                  time.monotonic(), complexity)

    # ---- configuration changes -----------------------------------------------------------------
    def update_specs(self, specs: Mapping[str, ModelSpec]) -> List[str]:
        """Apply changed model entries. Returns the resident roles whose weights changed (path,
        dtype or device): they are reloaded by `reload` or at their next use."""
        stale = []
        for role, spec in specs.items():
            old = self.specs.get(role)
            self.specs[role] = spec
            if old is not None and old.key != spec.key:
                self.policy.forget(role)
                self._failures.pop(role, None)
                self.errors.pop(role, None)
            entry = self._loaded.get(role)
            if entry is not None:
                if entry.key == spec.key:
                    entry.spec = spec
                else:
                    stale.append(role)
        self._notify()
        return stale

    def reload(self, roles: Sequence[str], reason: str = 'configuration changed',
               should_stop: Optional[StopFn] = None) -> None:
        """Unload the stale models of `roles`; load the default role again at once if it was
        one of them (the others load at their next use)."""
        with self._locked(should_stop):
            for role in roles:
                entry = self._loaded.get(role)
                if role != self.default_role and entry is not None \
                        and entry.key != self.specs[role].key:
                    self._unload_locked(role)
        self._notify()
        if self.default_role in roles:  # load() replaces it and records it as evicted
            # A broken new entry must not leave nothing resident: its fallback serves instead.
            self.load_or_fall_back(self.default_role, reason=reason, should_stop=should_stop)

    # ---- locking -------------------------------------------------------------------------------
    def _notify(self) -> None:
        for fn in list(self.listeners):
            fn()

    @contextmanager
    def _locked(self, should_stop: Optional[StopFn]) -> Iterator[None]:
        while not self._lock.acquire(timeout=0.05):
            if should_stop is not None and should_stop():
                raise Cancelled('cancelled while waiting for another load or generation')
        try:
            yield
        finally:
            self._lock.release()

    @contextmanager
    def _busy(self) -> Iterator[None]:
        self._busy_depth += 1
        if self._busy_depth == 1:
            self._notify()
        try:
            yield
        finally:
            self._busy_depth -= 1
            if self._busy_depth == 0:
                self._notify()

    # ---- load / unload -------------------------------------------------------------------
    def _unload_locked(self, role: str) -> bool:
        entry = self._loaded.pop(role, None)
        if entry is None:
            return False
        ref = weakref.ref(entry.model)
        entry.model = None
        entry.tokenizer = None
        del entry
        if ref() is not None:  # held in a reference cycle: only the collector frees it
            gc.collect()
        release_memory(collect=False)
        if ref() is not None:  # pragma: no cover - would be a leak in our own code
            raise ModelError(f'model of role {role!r} is still referenced after unload')
        return True

    def unload(self, role: str) -> bool:
        """Drop a role's model and give its memory back; True if it was loaded."""
        with self._lock:
            done = self._unload_locked(role)
        if done:
            self._notify()
        return done

    def unload_all(self, should_stop: Optional[StopFn] = None) -> None:
        with self._locked(should_stop):
            for role in list(self._loaded):
                self._unload_locked(role)
        self._notify()

    def _fail(self, role: str, key: str, error: str) -> None:
        self._failures[role] = (key, error, time.monotonic())
        self.errors.pop(role, None)
        self.errors[role] = error

    def load(self, role: str, reason: str = '', progress: Optional[ProgressFn] = None,
             should_stop: Optional[StopFn] = None, retry_failed: bool = False) -> LoadedModel:
        """Make `role` resident. Steps: check its files and plan memory (refusing with
        `OverBudget`, before touching anything, when it cannot fit even after evicting every
        other model); read the weight files ahead with progress in bytes and shards
        (cancellable: the resident models are still intact); evict the least valuable models
        the plan names; load tokenizer and weights. A role that failed with the same entry less
        than `retry_failed_s` ago fails again at once, without a new attempt, unless
        `retry_failed`."""
        spec = self.spec(role)
        role = spec.role

        def report(p: LoadProgress) -> None:
            for fn in list(self.progress_listeners):
                fn(p)
            if progress is not None:
                progress(p)

        with self._locked(should_stop), self._busy():
            entry = self._loaded.get(role)
            if entry is not None and entry.key == spec.key:
                self._loaded[role] = self._loaded.pop(role)  # mark most recent
                return entry
            failed = self._failures.get(role)
            if failed and failed[0] == spec.key and not retry_failed \
                    and time.monotonic() - failed[2] < self.retry_failed_s:
                raise LoadError(failed[1])  # same entry, failed moments ago: not tried again
            t0 = time.monotonic()
            evicted: List[str] = []
            unload_s = read_s = 0.0
            try:
                if entry is not None:  # its entry changed since it was loaded
                    report(LoadProgress(role, 'unloading', 0.0))
                    self._unload_locked(role)
                    evicted.append(role)
                info = inspect_weights(spec)
                need = self._measured.get(spec.key) or info.estimated_bytes
                plan = plan_memory(RoleInfo(role, spec.priority, spec.keep_resident, need),
                                   self._residents(), self._memory_state(spec.device),
                                   time.monotonic())
                if not plan.fits:
                    raise OverBudget(f'cannot load role {role!r}: {plan.reason}')
                self.loading_role = role
                self._notify()
                read_s = self._preread(spec, info, report, should_stop)
                t_unload = time.monotonic()
                for victim in plan.evict:
                    report(LoadProgress(role, 'unloading', 0.8, info.file_bytes,
                                        info.file_bytes, len(info.files), len(info.files)))
                    self._unload_locked(victim)
                    evicted.append(victim)
                unload_s += time.monotonic() - t_unload
                # Once something was evicted, a cancel would leave nothing resident: the load
                # then runs to the end (cancellable before that, during the read-ahead).
                entry = self._load_spec(spec, info, report, None if evicted else should_stop)
            except BaseException as exc:
                self.loading_role = ''
                error = str(exc) or type(exc).__name__
                if isinstance(exc, LoadError):
                    self._fail(role, spec.key, error)
                self._record(SwapEvent(evicted[0] if evicted else '', role, reason,
                                       time.monotonic() - t0, False, time.time(), error,
                                       tuple(evicted), unload_s=unload_s, read_s=read_s,
                                       model_key=spec.key))
                self._notify()
                raise
            self.loading_role = ''
            self._loaded[role] = entry
            self._failures.pop(role, None)
            self.errors.pop(role, None)
            self._measured[spec.key] = entry.memory_bytes
            if self.store is not None:
                self.store.put(MEASURED_KEY, self._measured)
            duration = time.monotonic() - t0
            self.policy.observe_load(role, duration)
            self._record(SwapEvent(evicted[0] if evicted else '', role, reason, duration, True,
                                   time.time(), '', tuple(evicted), entry.memory_bytes,
                                   entry.bytes_read, unload_s, read_s, spec.key))
        self._notify()
        return entry

    def _preread(self, spec: ModelSpec, info: WeightInfo, report: ProgressFn,
                 should_stop: Optional[StopFn]) -> float:
        """Read the weight files through the page cache in chunks: the I/O of the load, with
        progress in bytes and shards and a cancellation check per chunk; `from_pretrained`
        then maps pages that are already in memory. Returns the seconds it took."""
        shards, total = len(info.files), info.file_bytes

        def step(done: int, shards_done: int) -> None:
            if should_stop and should_stop():
                raise Cancelled(f'load of role {spec.role!r} cancelled while reading weights')
            report(LoadProgress(spec.role, 'weights', 0.8 * done / max(1, total), done, total,
                                shards_done, shards))

        if not self.preread_weights:
            step(0, 0)
            return 0.0
        t0 = time.monotonic()
        done = 0
        for index, file in enumerate(info.files):
            step(done, index)
            for got in read_through_page_cache(file, self.preread_chunk_bytes):
                done += got
                step(done, index)
        step(done, shards)
        return time.monotonic() - t0

    def _load_spec(self, spec: ModelSpec, info: WeightInfo, report: ProgressFn,
                   should_stop: Optional[StopFn]) -> LoadedModel:
        """Tokenizer and `from_pretrained`; memory measured around them."""
        shards, total = len(info.files), info.file_bytes

        def step(stage: str, fraction: float) -> None:
            if should_stop and should_stop():
                raise Cancelled(f'load of role {spec.role!r} cancelled during {stage}')
            report(LoadProgress(spec.role, stage, fraction, total if self.preread_weights else 0,
                                total, shards if self.preread_weights else 0, shards))

        import torch
        AutoModelForCausalLM, AutoTokenizer = from_transformers('AutoModelForCausalLM',
                                                                'AutoTokenizer')
        if spec.device.startswith('cuda') and not torch.cuda.is_available():
            raise LoadError(f'role {spec.role!r} is configured for {spec.device} but CUDA is not '
                            'available')
        t0 = time.monotonic()
        rss_before, device_before = process_rss(), _device_allocated(spec.device)
        step('tokenizer', 0.82)
        try:
            with PRETRAINED_LOAD_LOCK:
                tokenizer = AutoTokenizer.from_pretrained(str(info.directory),
                                                          local_files_only=True)
        except Exception as exc:  # corrupt files raise many types; all mean "cannot load"
            raise LoadError(f'cannot load the tokenizer of role {spec.role!r} from '
                            f'{info.directory}: {_first_line(exc)}') from exc
        if tokenizer.chat_template is None:
            raise LoadError(f'model for role {spec.role!r} at {info.directory} has no chat '
                            'template')
        step('weights', 0.85)
        kwargs: Dict[str, Any] = {}
        if spec.device != 'cpu':
            kwargs['device_map'] = spec.device

        def load_weights() -> Any:
            with PRETRAINED_LOAD_LOCK:
                loaded = AutoModelForCausalLM.from_pretrained(
                    str(info.directory), dtype=getattr(torch, spec.dtype), local_files_only=True,
                    **kwargs)
            loaded.eval()
            return loaded

        try:
            model = load_weights()
            adapter = ''
            if spec.adapter.strip():
                model, adapter = self._apply_adapter(spec, model, load_weights)
        except Exception as exc:  # corrupt files raise many types; all mean "cannot load"
            release_memory()
            raise LoadError(f'cannot load model for role {spec.role!r} from {info.directory}: '
                            f'{_first_line(exc)}') from exc
        if should_stop and should_stop():
            del model
            release_memory()
            raise Cancelled(f'load of role {spec.role!r} cancelled')
        tensors = _tensor_bytes(model)
        if spec.device.startswith('cuda'):
            memory = max(0, _device_allocated(spec.device) - device_before) or tensors
        else:  # mmapped weights count in RSS only once touched: the tensors are the floor
            memory = max(process_rss() - rss_before, tensors)
        report(LoadProgress(spec.role, 'done', 1.0, total, total, shards, shards))
        return LoadedModel(spec, model, tokenizer, memory, time.monotonic() - t0, time.time(),
                           key=spec.key, bytes_read=total, tensor_bytes=tensors, adapter=adapter)

    def _note(self, level: str, text: str) -> None:
        for fn in list(self.note_listeners):
            fn(level, text)

    def _apply_adapter(self, spec: ModelSpec, model: Any, load_base: Callable[[], Any]
                       ) -> Tuple[Any, str]:
        """Merge the role's configured LoRA adapter into `model`: (model, adapter directory).
        A missing or broken adapter is a warning and the base model serves ('' = none merged)."""
        from .memory.sleep_training import apply_adapter, resolve_adapter
        path, problem = resolve_adapter(spec.adapter, spec.path)
        if path is None:
            if problem:
                self._note('warning', f'role {spec.role!r}: {problem}; serving the base model')
            else:
                self._note('info', f'role {spec.role!r}: no sleep-trained adapter yet; serving '
                                   'the base model')
            return model, ''

        def reload_base() -> Any:
            release_memory()
            return load_base()

        model, problem = apply_adapter(model, path, reload_base)
        if problem:
            self._note('warning', f'role {spec.role!r}: {problem}; serving the base model')
            return model, ''
        self._note('info', f'role {spec.role!r}: LoRA adapter {path} merged into the weights')
        return model, str(path)

    # ---- generation ----------------------------------------------------------------------
    def generate(self, role: str, messages: Sequence[ChatTurn], max_new_tokens: int = 0,
                 temperature: float = 0.0, on_text: Optional[TextFn] = None,
                 should_stop: Optional[StopFn] = None,
                 complexity: Optional[str] = None, preamble: str = '',
                 memory: Sequence[str] = ()) -> GenerationResult:
        """Answer `messages` for `role`: the policy picks the resident model that answers or
        swaps (`swapped`); a role that cannot be loaded falls back to its `fallback` roles.
        `requested_role`, `fallback` and `decision` in the result say what happened. The
        awakening `preamble` and recalled `memory` (best first) join the system message as far
        as `memory_share` of the serving model's window allows (`memory_used`)."""
        if not messages:
            raise ValueError('no messages to answer')
        bad = [m.role for m in messages if m.role not in CHAT_ROLES]
        if bad:
            raise ValueError(f'unknown chat role(s) {bad}; expected system, user or assistant')
        requested = self.spec(role).role
        t0 = time.monotonic()
        with self._locked(should_stop), self._busy():
            entry, swapped, decision, fallback = self._serve(requested, complexity, should_stop)
            entry.uses += 1
            entry.last_used = time.monotonic()
            t_generate = time.monotonic()
            # The role's cap bounds every answer; a caller (an ATP budget) may ask for fewer.
            cap = entry.spec.max_new_tokens
            result = self._generate(entry, messages, min(max_new_tokens, cap) or cap,
                                    temperature, on_text, should_stop, swapped, t0,
                                    preamble=preamble, memory=memory)
            self.policy.observe_generation(entry.spec.role, time.monotonic() - t_generate)
        return replace(result, requested_role=requested, fallback=fallback, decision=decision)

    def _serve(self, requested: str, complexity: Optional[str], should_stop: Optional[StopFn]
               ) -> Tuple[LoadedModel, bool, str, str]:
        """(model that answers, whether it was loaded now, policy action, fallback reason)."""
        decision = self.decide(requested, complexity)
        if decision.action in (Action.USE, Action.SUBSTITUTE):
            entry = self._loaded[decision.role]
            self._loaded[decision.role] = self._loaded.pop(decision.role)  # most recent
            why = decision.reason if decision.action is Action.SUBSTITUTE else ''
            failed = self._failures.get(requested)
            if failed is not None and entry.spec.role != requested:
                # Say the real reason: the requested role is broken, not merely not chosen.
                why = f'role {requested!r} unavailable ({failed[1]}); answered with ' \
                      f'{entry.spec.role!r}'
            return entry, False, decision.action.value, why
        try:  # LOAD, SWAP, or REFUSE (the load then raises OverBudget with the reason)
            entry = self.load(requested, reason=f'generate request for role {requested}',
                              should_stop=should_stop)
            return entry, True, decision.action.value, ''
        except LoadError as exc:
            return self._fall_back(requested, exc, should_stop)

    def load_or_fall_back(self, role: str, reason: str = '', progress: Optional[ProgressFn] = None,
                          should_stop: Optional[StopFn] = None) -> Tuple[LoadedModel, str]:
        """`load(role)`, or else the first of its fallback roles that loads; returns the model
        and why another role is serving ('' if `role` loaded)."""
        role = self.spec(role).role
        try:
            return self.load(role, reason, progress, should_stop, retry_failed=True), ''
        except LoadError as exc:
            entry, _, _, why = self._fall_back(role, exc, should_stop)
            return entry, why

    def _fall_back(self, requested: str, error: LoadError, should_stop: Optional[StopFn]
                   ) -> Tuple[LoadedModel, bool, str, str]:
        failures = []
        for role in self.specs[requested].fallback:
            if role == requested or role not in self.specs:
                continue
            swapped = not self.is_loaded(role)
            try:
                entry = self.load(role, reason=f'fallback for role {requested}',
                                  should_stop=should_stop)
            except LoadError as exc:
                failures.append(str(exc))
                continue
            return (entry, swapped, 'fallback',
                    f'role {requested!r} unavailable ({error}); answered with {role!r}')
        if not failures:
            raise error
        raise LoadError(f'{error}; every fallback failed too: {"; ".join(failures)}') from error

    def _generate(self, entry: LoadedModel, messages: Sequence[ChatTurn], max_new_tokens: int,
                  temperature: float, on_text: Optional[TextFn], should_stop: Optional[StopFn],
                  swapped: bool, t0: float, fit: bool = True, preamble: str = '',
                  memory: Sequence[str] = ()) -> GenerationResult:
        import torch
        StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer = from_transformers(
            'StoppingCriteria', 'StoppingCriteriaList', 'TextIteratorStreamer')

        tok, model = entry.tokenizer, entry.model
        fitted: Optional[FittedContext] = None
        if fit:
            try:
                fitted = fit_to_window(
                    messages, lambda ms: _prompt_tokens(tok, ms), entry.spec.context_window,
                    reserve_tokens=min(max_new_tokens, entry.spec.context_window // 2),
                    summarize=self._summarizer(entry, should_stop), cache=self._summaries,
                    preamble=preamble, memory=memory, memory_share=self.memory_share)
            except ContextOverflow as exc:
                raise ModelError(f'role {entry.spec.role!r}: {exc}') from None
            messages = fitted.messages
        chat = [{'role': m.role, 'content': m.content} for m in messages]
        enc = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors='pt',
                                      return_dict=True)
        input_ids = enc['input_ids'].to(entry.spec.device)
        attention_mask = enc['attention_mask'].to(entry.spec.device)
        prompt_tokens = int(input_ids.shape[-1])
        budget = min(max_new_tokens, entry.spec.context_window - prompt_tokens)
        if budget < 1:
            raise ModelError(f'prompt of {prompt_tokens} tokens does not fit the context window '
                             f'({entry.spec.context_window}) of role {entry.spec.role!r}')

        stop_flag = should_stop or (lambda: False)
        aborted = threading.Event()   # the caller's side failed: stop the worker too

        class _Stop(StoppingCriteria):  # type: ignore[misc, valid-type]  # after every token
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                stop = aborted.is_set() or bool(stop_flag())
                return torch.full((input_ids.shape[0],), stop, dtype=torch.bool,
                                  device=input_ids.device)

        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        kwargs: Dict[str, Any] = dict(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=budget,
            streamer=streamer, stopping_criteria=StoppingCriteriaList([_Stop()]),
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)

        output: Dict[str, Any] = {}

        def run() -> None:
            try:
                with torch.inference_mode():
                    output['ids'] = model.generate(**kwargs)
            except BaseException as exc:  # surfaced in the calling thread
                output['error'] = exc
                streamer.end()

        worker = self._generation_thread.submit(run)
        pieces: List[str] = []
        ttft = 0.0
        try:
            for piece in streamer:
                if not piece:
                    continue
                if not pieces:
                    ttft = time.monotonic() - t0
                pieces.append(piece)
                if on_text:
                    on_text(piece)
        except BaseException:
            # Never leave with the model still generating: the lock is released on the way
            # out, and a swap must not pull the model from under a running generation.
            aborted.set()
            for _ in streamer:
                pass
            worker.result()
            raise
        worker.result()
        if 'error' in output:
            raise ModelError(f'generation failed: {output["error"]}') from output['error']
        if stop_flag():
            raise Cancelled('generation cancelled')
        ids = output['ids'][0]
        completion = int(ids.shape[-1]) - prompt_tokens
        text = ''.join(pieces).strip()
        truncated = False
        if completion >= budget and int(ids[-1]) not in _eos_ids(model, tok):
            text, _ = cut_to_sentence(text)   # kept whole when it has no sentence end
            truncated = True
        return GenerationResult(text=text, truncated=truncated, model_id=entry.spec.model_id,
                                role=entry.spec.role, swapped=swapped,
                                prompt_tokens=prompt_tokens, completion_tokens=max(0, completion),
                                time_to_first_token_s=ttft or (time.monotonic() - t0),
                                duration_s=time.monotonic() - t0, context=fitted,
                                memory_used=fitted.memory_used if fitted else 0)

    def _summarizer(self, serving: LoadedModel, should_stop: Optional[StopFn]
                    ) -> Optional[Callable[[Sequence[ChatTurn]], str]]:
        """Summaries of older turns by the least capable RESIDENT model (never a swap for a
        summary); None = extractive summaries only."""
        if self.summary_tokens < 1:
            return None
        current = [e for e in self._loaded.values() if e.key == self.specs[e.spec.role].key]
        entry = min(current, key=lambda e: e.spec.priority) if current else serving

        def summarize(turns: Sequence[ChatTurn]) -> str:
            window = entry.spec.context_window
            request = summary_request(turns)
            # Keep the transcript's end (the facts are kept verbatim anyway) within the window.
            keep = max(200, 2 * (window - self.summary_tokens))
            if len(request[1].content) > keep:
                request[1] = ChatTurn('user', request[1].content[-keep:])
            result = self._generate(entry, request, self.summary_tokens, 0.0, None, should_stop,
                                    False, time.monotonic(), fit=False)
            return result.text
        return summarize


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Token ids that end a generation: the generation config's and the tokenizer's."""
    ids = set()
    for value in (getattr(model.generation_config, 'eos_token_id', None),
                  tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def _prompt_tokens(tokenizer: Any, messages: Sequence[ChatTurn]) -> int:
    """Length of the rendered prompt, with the model's own tokenizer and chat template."""
    ids: Any = tokenizer.apply_chat_template(
        [{'role': m.role, 'content': m.content} for m in messages], add_generation_prompt=True,
        tokenize=True, return_dict=True)
    return len(ids['input_ids'])


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__
