"""Memory measurement and release: process RSS, CUDA allocation, free memory, tensor bytes, and
glibc tuning so that unloaded weights go back to the system. torch is imported lazily."""

from __future__ import annotations

import ctypes
import gc
from typing import Any, Tuple


def process_rss() -> int:
    import psutil
    return int(psutil.Process().memory_info().rss)


def device_allocated(device: str) -> int:
    """[bytes] allocated by torch on a CUDA device (0 elsewhere)."""
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


def tensor_bytes(model: Any) -> int:
    """Bytes of a torch model's parameters and buffers, tied weights counted once."""
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
