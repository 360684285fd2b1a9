"""Model registry and pool: load, swap, generate with streaming, and unload that frees memory.

torch and transformers are imported lazily so that importing the core stays cheap.
"""

from __future__ import annotations

import ctypes
import gc
import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence

from .conversation import ChatTurn

OFFLINE_PREFIX = 'offline:'
CHAT_ROLES = frozenset({'system', 'user', 'assistant'})

ProgressFn = Callable[[str, float], None]
TextFn = Callable[[str], None]
StopFn = Callable[[], bool]


class ModelError(RuntimeError):
    """A model could not be used; the message says why and what to do."""


class UnknownRole(ModelError):
    pass


class LoadError(ModelError):
    """A model's files are missing, corrupt or cannot be loaded."""


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

    def __post_init__(self) -> None:
        if not self.role or not self.path:
            raise ValueError('a model spec needs a role and a path')
        if self.max_new_tokens < 1 or self.context_window < 16:
            raise ValueError(f'role {self.role!r}: max_new_tokens and context_window must be positive')


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: Any
    tokenizer: Any
    memory_bytes: int
    load_duration_s: float
    loaded_at: float  # time.time()


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


class Generator(Protocol):
    """What a language block needs to answer: the pool in-process, or the model manager via ROS."""

    def generate(self, role: str, messages: Sequence[ChatTurn], max_new_tokens: int = 0,
                 temperature: float = 0.0, on_text: Optional[TextFn] = None,
                 should_stop: Optional[StopFn] = None) -> GenerationResult: ...


@dataclass(frozen=True)
class SwapEvent:
    from_role: str
    to_role: str
    reason: str
    duration_s: float
    succeeded: bool
    finished_at: float


def _memory_in_use(device: str) -> int:
    import torch
    if device.startswith('cuda') and torch.cuda.is_available():
        return int(torch.cuda.memory_allocated())
    import psutil
    return int(psutil.Process().memory_info().rss)


def release_memory() -> None:
    """Return freed model memory to the system: GC, the CUDA cache and, on glibc, the heap."""
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
    """Loads models by role, keeps at most `max_resident` of them, and generates with them.

    One lock serialises loads, unloads and generations: a swap never pulls a model out from
    under a running generation.
    """

    def __init__(self, specs: Mapping[str, ModelSpec], default_role: str,
                 max_resident: int = 1) -> None:
        if default_role not in specs:
            raise UnknownRole(f'default role {default_role!r} is not among the configured roles '
                              f'{sorted(specs)}')
        if max_resident < 1:
            raise ValueError('max_resident must be at least 1')
        self.specs: Dict[str, ModelSpec] = dict(specs)
        self.default_role = default_role
        self.max_resident = max_resident
        self._loaded: Dict[str, LoadedModel] = {}   # insertion order = least recently used first
        self._lock = threading.RLock()
        self.swaps: List[SwapEvent] = []
        self.busy = False
        self.listeners: List[Callable[[], None]] = []  # called after any change of state

    # ---- queries -------------------------------------------------------------------------
    def loaded(self) -> List[LoadedModel]:
        return list(self._loaded.values())

    def is_loaded(self, role: str) -> bool:
        return role in self._loaded

    def spec(self, role: str) -> ModelSpec:
        role = role or self.default_role
        try:
            return self.specs[role]
        except KeyError:
            raise UnknownRole(f'unknown model role {role!r}; configured roles: '
                              f'{", ".join(sorted(self.specs))}') from None

    # ---- load / unload -------------------------------------------------------------------
    def _notify(self) -> None:
        for fn in list(self.listeners):
            fn()

    def unload(self, role: str) -> bool:
        """Drop a role's model and give its memory back; True if it was loaded."""
        with self._lock:
            entry = self._loaded.pop(role, None)
            if entry is None:
                return False
            ref = weakref.ref(entry.model)
            entry.model = None
            entry.tokenizer = None
            del entry
            release_memory()
            if ref() is not None:  # pragma: no cover - would be a leak in our own code
                raise ModelError(f'model of role {role!r} is still referenced after unload')
        self._notify()
        return True

    def unload_all(self) -> None:
        for role in list(self._loaded):
            self.unload(role)

    def load(self, role: str, reason: str = '', progress: Optional[ProgressFn] = None,
             should_stop: Optional[StopFn] = None) -> LoadedModel:
        """Make `role` resident, evicting least recently used models beyond `max_resident`."""
        spec = self.spec(role)
        with self._lock:
            if spec.role in self._loaded:
                self._loaded[spec.role] = self._loaded.pop(spec.role)  # mark most recent
                return self._loaded[spec.role]
            t0 = time.monotonic()
            evicted = ''
            try:
                while len(self._loaded) >= self.max_resident:
                    evicted = next(iter(self._loaded))
                    if progress:
                        progress('unloading', 0.05)
                    self.unload(evicted)
                entry = self._load_spec(spec, progress, should_stop)
            except BaseException:
                self.swaps.append(SwapEvent(evicted, spec.role, reason, time.monotonic() - t0,
                                            False, time.time()))
                self._notify()
                raise
            self._loaded[spec.role] = entry
            self.swaps.append(SwapEvent(evicted, spec.role, reason, time.monotonic() - t0, True,
                                        time.time()))
        self._notify()
        return entry

    def _load_spec(self, spec: ModelSpec, progress: Optional[ProgressFn],
                   should_stop: Optional[StopFn]) -> LoadedModel:
        def step(stage: str, frac: float) -> None:
            if should_stop and should_stop():
                raise Cancelled(f'load of role {spec.role!r} cancelled during {stage}')
            if progress:
                progress(stage, frac)

        path = resolve_model_path(spec.path)
        local = Path(path)
        if (path.startswith(('/', '.', '~')) or spec.path.startswith(OFFLINE_PREFIX)) \
                and not (local / 'config.json').is_file():
            hint = ' (run `sage models prepare`)' if spec.path.startswith(OFFLINE_PREFIX) else ''
            raise LoadError(f'model for role {spec.role!r} not found: no config.json in {path}{hint}')
        step('tokenizer', 0.1)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        try:
            dtype = getattr(torch, spec.dtype)
        except AttributeError:
            raise LoadError(f'role {spec.role!r}: unknown dtype {spec.dtype!r}') from None
        t0 = time.monotonic()
        before = _memory_in_use(spec.device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            step('weights', 0.3)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
            model.to(torch.device(spec.device))  # type: ignore[arg-type]  # decorated .to()
            model.eval()
        except Cancelled:
            raise
        except Exception as exc:  # corrupt files raise many types; all mean "cannot load"
            release_memory()
            raise LoadError(f'cannot load model for role {spec.role!r} from {path}: '
                             f'{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}') from exc
        if tokenizer.chat_template is None:
            raise LoadError(f'model for role {spec.role!r} at {path} has no chat template')
        memory = max(0, _memory_in_use(spec.device) - before)
        if progress:
            progress('done', 1.0)
        return LoadedModel(spec, model, tokenizer, memory, time.monotonic() - t0, time.time())

    # ---- generation ----------------------------------------------------------------------
    def generate(self, role: str, messages: Sequence[ChatTurn], max_new_tokens: int = 0,
                 temperature: float = 0.0, on_text: Optional[TextFn] = None,
                 should_stop: Optional[StopFn] = None) -> GenerationResult:
        """Answer `messages` with `role`'s model, loading it first if needed (`swapped`)."""
        if not messages:
            raise ValueError('no messages to answer')
        bad = [m.role for m in messages if m.role not in CHAT_ROLES]
        if bad:
            raise ValueError(f'unknown chat role(s) {bad}; expected system, user or assistant')
        spec = self.spec(role)
        t0 = time.monotonic()
        with self._lock:
            self.busy = True
            self._notify()
            try:
                swapped = not self.is_loaded(spec.role)
                entry = self.load(spec.role, reason=f'generate request for role {spec.role}',
                                  should_stop=should_stop)
                return self._generate(entry, messages, max_new_tokens or spec.max_new_tokens,
                                      temperature, on_text, should_stop, swapped, t0)
            finally:
                self.busy = False
                self._notify()

    def _generate(self, entry: LoadedModel, messages: Sequence[ChatTurn], max_new_tokens: int,
                  temperature: float, on_text: Optional[TextFn], should_stop: Optional[StopFn],
                  swapped: bool, t0: float) -> GenerationResult:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        tok, model = entry.tokenizer, entry.model
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

        class _Stop(StoppingCriteria):  # checked after every token
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), bool(stop_flag()), dtype=torch.bool,
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

        worker = threading.Thread(target=run, name=f'generate-{entry.spec.role}', daemon=True)
        worker.start()
        pieces: List[str] = []
        ttft = 0.0
        for piece in streamer:
            if not piece:
                continue
            if not pieces:
                ttft = time.monotonic() - t0
            pieces.append(piece)
            if on_text:
                on_text(piece)
        worker.join()
        if 'error' in output:
            raise ModelError(f'generation failed: {output["error"]}') from output['error']
        if stop_flag():
            raise Cancelled('generation cancelled')
        completion = int(output['ids'].shape[-1]) - prompt_tokens
        return GenerationResult(text=''.join(pieces).strip(), model_id=entry.spec.model_id,
                                role=entry.spec.role, swapped=swapped,
                                prompt_tokens=prompt_tokens, completion_tokens=max(0, completion),
                                time_to_first_token_s=ttft or (time.monotonic() - t0),
                                duration_s=time.monotonic() - t0)
