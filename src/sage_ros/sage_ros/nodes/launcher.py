"""Entry points of the node executables (`ros2 run sage_ros <node>`, `python -m
sage_ros.nodes.launcher <node>`).

A node module imports torch, transformers or MiniLM before its `main` can take over the stop
signals, which takes seconds. A Ctrl-C (or launch's SIGINT) in that window would print a
KeyboardInterrupt traceback from deep inside an import; nothing has started yet, so the process
just ends, quietly and with exit code 0. `run_node` installs the real handlers.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from types import FrameType
from typing import Optional

from ..graph import PROFILES


def _stop_while_importing(signum: int, frame: Optional[FrameType]) -> None:
    os._exit(0)


def run(executable: str) -> int:
    """Import the node's module with the quiet stop in place, then run its `main()`."""
    specs = {s.executable: s for p in PROFILES.values() for s in p.nodes}
    spec = specs.get(executable)
    if spec is None:
        print(f'error: unknown SAGE node {executable!r} (one of {", ".join(sorted(specs))})',
              file=sys.stderr)
        return 2
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stop_while_importing)
    main = getattr(importlib.import_module(spec.module), 'main')
    return int(main())


def kernel() -> int:
    return run('kernel')


def text_sensor() -> int:
    return run('text_sensor')


def language_block() -> int:
    return run('language_block')


def model_manager() -> int:
    return run('model_manager')


def reasoning_block() -> int:
    return run('reasoning_block')


def memory_block() -> int:
    return run('memory_block')


def perception_block() -> int:
    return run('perception_block')


def microphone() -> int:
    return run('microphone')


def camera() -> int:
    return run('camera')


if __name__ == '__main__':
    raise SystemExit(run(sys.argv[1] if len(sys.argv) > 1 else ''))
