"""Peak-memory readings for training runs, on CUDA and on the CPU.

Sizes are in "MB" of 2**20 bytes, as Detectron2's own ``max_mem`` console field.

On CUDA the peaks are the caching allocator's (``torch.cuda.max_memory_*``) and can be reset. On the
CPU the peak is the process's resident-set high-water mark (``ru_maxrss``), which the kernel keeps
for the whole life of the process and cannot be reset; it also excludes child processes, e.g.
data-loader workers started with ``num_workers > 0``.
"""
from __future__ import annotations

import os
import resource
import sys
from typing import Dict, Union

import torch

__all__ = ["current_rss_mb", "peak_memory_mb", "peak_rss_mb", "reset_peak_memory"]

DeviceLike = Union[str, torch.device]

_MB = float(2**20)


def _as_device(device: DeviceLike) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def peak_rss_mb() -> float:
    """The process's peak resident set size since it started, in MB."""
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


def reset_peak_memory(device: DeviceLike) -> None:
    """Starts a new peak on CUDA; a no-op on the CPU, whose peak RSS cannot be reset."""
    device = _as_device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device: DeviceLike) -> Dict[str, float]:
    """Peak memory on ``device``, in MB.

    Returns:
        on CUDA: ``peak_mem_alloc_mb`` (tensors) and ``peak_mem_reserved_mb`` (the allocator's cache,
        what ``nvidia-smi`` sees), both since the last :func:`reset_peak_memory`;
        elsewhere: ``peak_rss_mb`` (since the process started) and ``rss_mb`` (now).
    """
    device = _as_device(device)
    if device.type == "cuda":
        return {
            "peak_mem_alloc_mb": torch.cuda.max_memory_allocated(device) / _MB,
            "peak_mem_reserved_mb": torch.cuda.max_memory_reserved(device) / _MB,
        }
    return {"peak_rss_mb": peak_rss_mb(), "rss_mb": current_rss_mb()}
