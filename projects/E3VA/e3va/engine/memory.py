"""Memory readings, on CUDA and on the CPU: the one place the training hook and the benchmark measure.

Sizes are in "MB" of 2**20 bytes, as Detectron2's own ``max_mem`` console field.

CUDA: the caching allocator's peaks (``torch.cuda.max_memory_*``), tensors only; reset by
:func:`reset_peak_memory`.

CPU: the peak is the process's resident-set high-water mark, and on Linux it **can** be reset. The kernel
keeps it per address space as ``VmHWM`` (``/proc/self/status``); writing ``5`` to ``/proc/self/clear_refs``
(Linux >= 4.0) sets it back to the current resident set, which :func:`reset_peak_memory` does. The
other reading, ``getrusage``'s ``ru_maxrss``, cannot serve as a resettable peak: it is the larger of
``VmHWM`` and the peak the process had before its ``exec`` (a forked copy of its parent), and nothing
lowers the latter. So :func:`peak_rss_mb` reads ``VmHWM`` and falls back to ``ru_maxrss`` only where there
is no ``/proc`` (macOS). Where ``clear_refs`` cannot be written (not Linux, some sandboxes)
:func:`reset_peak_memory` returns False and the CPU peak keeps counting from the process's start. Child
processes (data-loader workers with ``num_workers > 0``) are never included.

:func:`bytes_saved_for_backward` measures another memory: what autograd keeps for backward in one forward
pass (a training step's activations), by storage, independent of the allocator.
"""
from __future__ import annotations

import os
import resource
import sys
from typing import Any, Dict, Optional, Union

import torch

__all__ = [
    "DeviceLike",
    "bytes_saved_for_backward",
    "current_memory_mb",
    "current_rss_mb",
    "peak_memory_mb",
    "peak_rss_mb",
    "reset_peak_memory",
]

DeviceLike = Union[str, torch.device]

_MB = float(2**20)


def _as_device(device: DeviceLike) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def _status_mb(key: str) -> Optional[float]:
    """A ``kB`` field of ``/proc/self/status`` in MB, or None where there is no such file or field."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """The process's peak resident set size in MB: since the last successful :func:`reset_peak_memory`
    on the CPU, else since the process started (see the module docstring)."""
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return maxrss / _MB if sys.platform == "darwin" else maxrss / 1024.0


def current_rss_mb() -> float:
    """The process's resident set size now, in MB."""
    try:
        import psutil
    except ImportError:  # psutil is optional; /proc is there on Linux
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / _MB
    return psutil.Process().memory_info().rss / _MB


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set to the current one (the other values clear page bits)
        return True
    except OSError:
        return False


def reset_peak_memory(device: DeviceLike) -> bool:
    """Starts a new peak on ``device``: CUDA's allocator peaks, or the CPU's peak resident set. Returns
    whether it could (False on the CPU where ``/proc/self/clear_refs`` cannot be written)."""
    device = _as_device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    return _reset_cpu_peak()


def current_memory_mb(device: DeviceLike) -> float:
    """Memory in use on ``device`` now, in MB: CUDA's allocated tensors, or the CPU's resident set."""
    device = _as_device(device)
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / _MB
    return current_rss_mb()


def peak_memory_mb(device: DeviceLike) -> Dict[str, float]:
    """Peak memory on ``device``, in MB, since the last :func:`reset_peak_memory`.

    Returns:
        on CUDA: ``peak_mem_alloc_mb`` (tensors) and ``peak_mem_reserved_mb`` (the allocator's cache,
        what ``nvidia-smi`` sees);
        elsewhere: ``peak_rss_mb`` (:func:`peak_rss_mb`) and ``rss_mb`` (now).
    """
    device = _as_device(device)
    if device.type == "cuda":
        return {
            "peak_mem_alloc_mb": torch.cuda.max_memory_allocated(device) / _MB,
            "peak_mem_reserved_mb": torch.cuda.max_memory_reserved(device) / _MB,
        }
    return {"peak_rss_mb": peak_rss_mb(), "rss_mb": current_rss_mb()}


def bytes_saved_for_backward(model: torch.nn.Module, *inputs: Any) -> int:
    """Bytes of the storages autograd keeps for backward during ``model(*inputs)``, each counted once
    (several layers may keep the same tensor): the activation memory a training step holds."""
    kept: Dict[int, torch.Tensor] = {}  # by storage address; holding the tensor keeps the address unique

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(*inputs)
    return sum(t.untyped_storage().nbytes() for t in kept.values())
