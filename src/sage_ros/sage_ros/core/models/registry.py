"""Which runner serves each model kind. Runners of the perception kinds live in
`core.perception` and are imported on first use, so that a missing optional dependency only
disables its kind."""

from __future__ import annotations

import importlib
from typing import Callable, Dict, Mapping, Optional

from ..inference import KIND_CHAT, KIND_EMBEDDING, KIND_OMNI, KIND_SPEECH, KIND_VISION, Runner
from .chat import ChatRunner
from .embedding import EmbeddingRunner
from .specs import LoadError

NoteFn = Callable[[str, str], None]

# kind -> (module, class) of runners imported lazily; each is constructed without arguments.
LAZY_RUNNERS: Dict[str, tuple[str, str]] = {
    KIND_SPEECH: ('sage_ros.core.perception.speech', 'SpeechRunner'),
    KIND_VISION: ('sage_ros.core.perception.vision', 'VisionRunner'),
    KIND_OMNI: ('sage_ros.core.perception.omni', 'OmniRunner'),
}


class RunnerRegistry:
    """One runner per kind per pool, created on first use."""

    def __init__(self, note: Optional[NoteFn] = None,
                 overrides: Optional[Mapping[str, Runner]] = None) -> None:
        self.chat = ChatRunner(note)
        self._runners: Dict[str, Runner] = {KIND_CHAT: self.chat}
        self._runners.update(overrides or {})

    def get(self, kind: str) -> Runner:
        runner = self._runners.get(kind)
        if runner is None:
            runner = self._runners[kind] = self._create(kind)
        return runner

    @staticmethod
    def _create(kind: str) -> Runner:
        if kind == KIND_EMBEDDING:
            return EmbeddingRunner()
        if kind not in LAZY_RUNNERS:
            raise LoadError(f'kind {kind!r} is not available: no runner serves it')
        module, name = LAZY_RUNNERS[kind]
        try:
            cls = getattr(importlib.import_module(module), name)
            runner: Runner = cls()
        except Exception as exc:  # ImportError of an optional dependency, a broken module
            raise LoadError(f'kind {kind!r} is not available: {type(exc).__name__}: '
                            f'{exc}') from exc
        return runner
