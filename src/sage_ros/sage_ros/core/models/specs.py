"""Model entries as configured: errors, `ModelSpec` with its kind, and model path schemes."""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from ..inference import KIND_CHAT, KIND_EMBEDDING, KIND_OMNI, KIND_SPEECH, KINDS

OFFLINE_PREFIX = 'offline:'    # a model converted by `sage models prepare`, in the cache dir
PACKAGE_PREFIX = 'package:'    # package:PKG/sub/dir, a data dir inside an installed package
OPENCV_PREFIX = 'opencv:'      # opencv:FILE, one of OpenCV's bundled Haar cascades
CHAT_ROLES = frozenset({'system', 'user', 'assistant'})

# Bytes per element of the torch dtypes a chat, omni or embedding entry may be loaded in.
DTYPE_BYTES: Dict[str, int] = {'float32': 4, 'float16': 2, 'bfloat16': 2, 'float64': 8}
TORCH_DTYPES = tuple(DTYPE_BYTES)
# CTranslate2 compute types of a speech entry.
SPEECH_COMPUTE_TYPES = ('int8', 'int8_float32', 'int8_float16', 'float16', 'float32', 'default')
DEVICE_PATTERN = re.compile(r'^(cpu|mps|cuda(:\d+)?)$')

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


def dtype_choices(kind: str) -> Tuple[str, ...]:
    """The dtypes an entry of `kind` accepts; () = any (the kind has none)."""
    if kind in (KIND_CHAT, KIND_OMNI, KIND_EMBEDDING):
        return TORCH_DTYPES
    if kind == KIND_SPEECH:
        return SPEECH_COMPUTE_TYPES
    return ()  # vision: OpenCV models have no dtype


def model_cache_dir() -> Path:
    """Where `sage models prepare` puts converted offline models."""
    env = os.environ.get('SAGE_MODEL_CACHE')
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return Path(xdg) / 'sage_ros' / 'models'


def package_dir(package: str) -> Optional[Path]:
    """The directory of an installed top-level package, found without importing it."""
    if not package.isidentifier():
        return None
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0])


def opencv_data_dir() -> Optional[Path]:
    """OpenCV's bundled cascade directory (None without opencv-python)."""
    try:
        import cv2
        return Path(getattr(cv2, 'data').haarcascades)   # cv2.data is untyped
    except (ImportError, AttributeError):
        return None


def resolve_model_path(path: str) -> str:
    """`offline:NAME` -> the prepared cache dir; `package:PKG/sub` -> that dir in the installed
    package; `opencv:FILE` -> OpenCV's bundled FILE; `~` and `$VARS` expanded; hub ids
    unchanged. An unresolvable package or opencv path is returned as given (loading it then
    fails with a LoadError that says why)."""
    if path.startswith(OFFLINE_PREFIX):
        return str(model_cache_dir() / path[len(OFFLINE_PREFIX):])
    if path.startswith(PACKAGE_PREFIX):
        package, _, sub = path[len(PACKAGE_PREFIX):].partition('/')
        root = package_dir(package)
        return path if root is None else str(root / sub if sub else root)
    if path.startswith(OPENCV_PREFIX):
        data = opencv_data_dir()
        return path if data is None else str(data / path[len(OPENCV_PREFIX):])
    return os.path.expandvars(os.path.expanduser(path))


def path_hint(path: str) -> str:
    """What to do about a model path that is not there ('' if nothing specific)."""
    if path.startswith(OFFLINE_PREFIX):
        return ' (run `sage models prepare`)'
    if path.startswith(PACKAGE_PREFIX):
        package = path[len(PACKAGE_PREFIX):].partition('/')[0]
        if package_dir(package) is None:
            return f' (package {package!r} is not installed: see requirements/models.txt)'
        return f' (reinstall package {package!r})'
    if path.startswith(OPENCV_PREFIX) and opencv_data_dir() is None:
        return ' (opencv-python is not installed)'
    return ''


@dataclass(frozen=True)
class ModelSpec:
    """One role's model, as configured."""

    role: str
    model_id: str
    path: str                   # directory, `offline:NAME`, `package:PKG/sub`, `opencv:FILE`,
                                # or a hub id present in the local cache
    dtype: str = 'bfloat16'     # torch dtype; a CTranslate2 compute type for speech
    device: str = 'cpu'
    max_new_tokens: int = 128
    context_window: int = 2048
    keep_resident: bool = False  # may stay resident next to other keep_resident models
    priority: int = 0            # capability rank: higher = more capable (a stand-in for lower)
    fallback: Tuple[str, ...] = ()  # roles tried in order when this one cannot be used
    adapter: str = ''            # LoRA merged after load: '' = none, 'latest' = the current
                                 # sleep-trained adapter of this model (if any), or a directory
    kind: str = KIND_CHAT        # one of inference.KINDS: chat answers generate, others infer
    language: str = ''           # speech: the spoken language ('en', ...); '' = detected per
                                 # utterance (a short accented one is then often misheard)

    def __post_init__(self) -> None:
        if not self.role or not self.path:
            raise ValueError('a model spec needs a role and a path')
        if self.kind not in KINDS:
            raise ValueError(f'role {self.role!r}: unknown kind {self.kind!r}; expected one of '
                             f'{", ".join(KINDS)}')
        if self.max_new_tokens < 1 or self.context_window < 16:
            raise ValueError(f'role {self.role!r}: max_new_tokens and context_window must be '
                             'positive')
        choices = dtype_choices(self.kind)
        if choices and self.dtype not in choices:
            raise ValueError(f'role {self.role!r}: unknown dtype {self.dtype!r} for a '
                             f'{self.kind} model; expected one of {", ".join(choices)}')
        if not DEVICE_PATTERN.match(self.device):
            raise ValueError(f'role {self.role!r}: unknown device {self.device!r}; expected cpu, '
                             'cuda, cuda:N or mps')

    @property
    def key(self) -> str:
        """Identity of the weights in memory: a change of any part means a reload."""
        key = f'{resolve_model_path(self.path)}|{self.dtype}|{self.device}'
        if self.adapter.strip():
            key = f'{key}|{self.adapter.strip()}'
        if self.kind == KIND_CHAT:
            return key
        # A speech model decodes in its configured language: a change is a (cheap) reload.
        return f'{key}|{self.kind}|{self.language.strip()}' if self.language.strip() else \
            f'{key}|{self.kind}'


@dataclass(frozen=True)
class WeightInfo:
    """A model's files, checked for presence and intact headers."""

    directory: Path
    files: Tuple[Path, ...]
    file_bytes: int        # [bytes] on disk
    estimated_bytes: int   # [bytes] in memory once loaded in the spec's dtype


def not_found(spec: ModelSpec, where: str) -> LoadError:
    return LoadError(f'model for role {spec.role!r} not found: {where}{path_hint(spec.path)}')


def first_line(exc: BaseException) -> str:
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__

