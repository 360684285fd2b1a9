"""Loading one model with progress: read its files ahead through the page cache (cancellable,
in bytes and shards), then load it with its kind's runner while measuring the memory it takes."""

from __future__ import annotations

import time
from typing import Optional

from ..inference import Runner
from .chat import ChatRunner
from .events import LoadedModel, LoadProgress, ProgressFn
from .memory import device_allocated, process_rss, release_memory
from .specs import Cancelled, LoadError, ModelError, ModelSpec, StopFn, WeightInfo, first_line
from .weights import read_through_page_cache


def preread(spec: ModelSpec, info: WeightInfo, report: ProgressFn,
            should_stop: Optional[StopFn], enabled: bool, chunk_bytes: int) -> float:
    """Read the weight files through the page cache in chunks: the I/O of the load, with
    progress in bytes and shards and a cancellation check per chunk; the runner then maps pages
    that are already in memory. Returns the seconds it took."""
    shards, total = len(info.files), info.file_bytes

    def step(done: int, shards_done: int) -> None:
        if should_stop and should_stop():
            raise Cancelled(f'load of role {spec.role!r} cancelled while reading weights')
        report(LoadProgress(spec.role, 'weights', 0.8 * done / max(1, total), done, total,
                            shards_done, shards))

    if not enabled:
        step(0, 0)
        return 0.0
    t0 = time.monotonic()
    done = 0
    for index, file in enumerate(info.files):
        if not file.is_file():   # a runner may name a directory (e.g. a converted model)
            continue
        step(done, index)
        for got in read_through_page_cache(file, chunk_bytes):
            done += got
            step(done, index)
    step(done, shards)
    return time.monotonic() - t0


def load_model(runner: Runner, spec: ModelSpec, info: WeightInfo, report: ProgressFn,
               should_stop: Optional[StopFn], preread_done: bool) -> LoadedModel:
    """Load with `runner` (its optional `import_libraries()` first, outside the measurement);
    memory measured around the load: the CUDA allocated delta on a CUDA device, else the RSS
    delta; at least the bytes of the model's tensors (mmapped weights count in RSS only once
    touched)."""
    import torch
    if spec.device.startswith('cuda') and not torch.cuda.is_available():
        raise LoadError(f'role {spec.role!r} is configured for {spec.device} but CUDA is not '
                        'available')
    # Libraries imported now would count as the model's memory: a runner may import them first.
    import_libraries = getattr(runner, 'import_libraries', None)
    try:
        if callable(import_libraries):
            import_libraries()
    except ModelError:
        raise
    except Exception as exc:  # an optional dependency of the kind is missing or broken
        raise LoadError(f'cannot load model for role {spec.role!r}: {first_line(exc)}') from exc
    t0 = time.monotonic()
    rss_before, device_before = process_rss(), device_allocated(spec.device)
    adapter = ''
    try:
        if isinstance(runner, ChatRunner):
            model, processor, adapter = runner.load_chat(spec, info, report, should_stop,
                                                         preread_done)
        else:
            model, processor = runner.load(spec, info, report, should_stop)
    except ModelError:       # LoadError and Cancelled say what happened already
        release_memory()
        raise
    except Exception as exc:  # a runner's library fails in many ways; all mean "cannot load"
        release_memory()
        raise LoadError(f'cannot load model for role {spec.role!r} from {info.directory}: '
                        f'{first_line(exc)}') from exc
    if should_stop and should_stop():
        del model, processor
        release_memory()
        raise Cancelled(f'load of role {spec.role!r} cancelled')
    tensors = runner.tensor_bytes(model)
    if spec.device.startswith('cuda'):
        memory = max(0, device_allocated(spec.device) - device_before) or tensors
    else:
        memory = max(process_rss() - rss_before, tensors)
    shards, total = len(info.files), info.file_bytes
    report(LoadProgress(spec.role, 'done', 1.0, total, total, shards, shards))
    return LoadedModel(spec, model, processor, memory, time.monotonic() - t0, time.time(),
                       key=spec.key, bytes_read=total, tensor_bytes=tensors, adapter=adapter)


