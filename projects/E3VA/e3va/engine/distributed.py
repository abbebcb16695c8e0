"""Multi-process training through Detectron2's ``launch``: DDP over NCCL on CUDA, over gloo on the CPU.

Detectron2's ``launch`` already picks the backend by the machine (NCCL where CUDA is available, gloo
elsewhere), so ``--num-gpus N`` on a CPU machine starts N processes over gloo. What it leaves CUDA-only is
the rest of the engine, handled here:

- :func:`create_ddp_model`: Detectron2's ``create_ddp_model`` passes ``device_ids=[local_rank]``, which
  ``DistributedDataParallel`` refuses for a CPU module; on the CPU we pass none.
- :func:`convert_sync_batchnorm_for_cpu`: ``nn.SyncBatchNorm`` (``norm="SyncBN"``, e.g. UperNet's) raises
  on CPU tensors in a distributed run; on the CPU it becomes Detectron2's ``NaiveSyncBatchNorm``, which
  all-reduces its statistics through ``torch.distributed`` and so works over gloo.
- :func:`configure_cpu_threads`: N processes on one CPU machine share its cores instead of each taking
  all of them (what ``torchrun`` does with ``OMP_NUM_THREADS``).

:func:`allreduce_bytes_per_step` is what DDP sends per step: one gradient per trainable parameter.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, List, Optional

import torch
import torch.distributed as dist
from detectron2.engine.defaults import create_ddp_model as _d2_create_ddp_model
from detectron2.layers import NaiveSyncBatchNorm
from detectron2.utils import comm
from torch import nn

__all__ = [
    "allreduce_bytes_per_step",
    "check_backend_for_device",
    "configure_cpu_threads",
    "convert_sync_batchnorm_for_cpu",
    "create_ddp_model",
    "ddp_gradient_bytes",
    "gather_from_all_ranks",
    "trainable_fingerprint",
]

logger = logging.getLogger("e3va")


def check_backend_for_device(device: torch.device) -> None:
    """Raises when the process group cannot carry ``device``'s tensors: NCCL is CUDA-only.

    Detectron2's ``launch`` chooses NCCL whenever CUDA is available, also for a config with
    ``train.device=cpu`` (all the Shapes configs): the fix is to hide the GPUs, which makes it choose gloo.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    backend = str(dist.get_backend()).lower()
    if device.type == "cpu" and backend == "nccl":
        raise RuntimeError(
            f"train.device={str(device)!r}, but the process group's backend is {backend!r}, which carries CUDA "
            "tensors only (Detectron2's launch picks NCCL whenever CUDA is available). To train on the CPU "
            "with several processes, hide the GPUs so that launch picks gloo: CUDA_VISIBLE_DEVICES= ..."
        )


def create_ddp_model(model: nn.Module, device: torch.device, **kwargs: Any) -> nn.Module:
    """Detectron2's ``create_ddp_model`` (the model itself in a 1-process run), also for CPU models.

    Args:
        model: on ``device`` already.
        device: the model's device; on CUDA, DDP gets ``device_ids=[local_rank]`` as in Detectron2, on the
            CPU none (DDP accepts no ``device_ids`` for a CPU module).
        kwargs: ``cfg.train.ddp`` (``broadcast_buffers``, ``find_unused_parameters``, ``fp16_compression``)
            and any other DistributedDataParallel argument.
    """
    if comm.get_world_size() == 1:
        return model
    check_backend_for_device(device)
    if device.type == "cpu":
        if kwargs.get("device_ids") is not None:
            raise ValueError(
                f"device_ids={kwargs['device_ids']!r} given for a CPU model; DistributedDataParallel takes "
                "device_ids for CUDA modules only (leave it out, or None, on the CPU)."
            )
        kwargs["device_ids"] = None  # Detectron2 would put [local_rank] here
    return _d2_create_ddp_model(model, **kwargs)


def _naive_sync_batchnorm(bn: nn.SyncBatchNorm) -> NaiveSyncBatchNorm:
    """A ``NaiveSyncBatchNorm`` holding ``bn``'s very parameters and buffers (optimizers keep working)."""
    new = NaiveSyncBatchNorm(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                             track_running_stats=bn.track_running_stats)
    for name, param in bn.named_parameters(recurse=False):
        setattr(new, name, param)
    for name, buf in bn.named_buffers(recurse=False):
        setattr(new, name, buf)
    new.train(bn.training)
    return new


def convert_sync_batchnorm_for_cpu(model: nn.Module, device: torch.device) -> int:
    """Replaces, in place, every ``nn.SyncBatchNorm`` of a CPU model in a multi-process run by Detectron2's
    ``NaiveSyncBatchNorm``; returns how many were replaced (0 on CUDA or in a 1-process run).

    ``nn.SyncBatchNorm`` refuses CPU tensors once a process group exists. ``NaiveSyncBatchNorm``
    computes the same batch statistics over all processes (mean and mean of squares all-reduced, equal
    per-process batch sizes assumed, as with Detectron2's data loaders) through ``torch.distributed``, so
    gloo carries them. Its running variance is the biased one; checkpoints load either way.
    """
    if device.type != "cpu" or comm.get_world_size() == 1:
        return 0
    count = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.SyncBatchNorm):
                setattr(parent, name, _naive_sync_batchnorm(child))
                count += 1
    if count:
        logger.warning(
            f"Replaced {count} nn.SyncBatchNorm layers by Detectron2's NaiveSyncBatchNorm: PyTorch's SyncBatchNorm "
            "needs CUDA tensors, and NaiveSyncBatchNorm syncs the same statistics over gloo on the CPU."
        )
    return count


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def configure_cpu_threads(device: torch.device) -> Optional[int]:
    """On the CPU in a multi-process run, gives each process of this machine an equal share of its cores
    (``torch.set_num_threads``), unless ``OMP_NUM_THREADS`` says otherwise; returns the thread count set,
    or None when nothing was changed. Each process would otherwise run one thread per core and N
    processes would oversubscribe the machine N times."""
    if device.type != "cpu" or comm.get_world_size() == 1 or os.environ.get("OMP_NUM_THREADS"):
        return None
    threads = max(1, _usable_cpus() // comm.get_local_size())
    torch.set_num_threads(threads)
    logger.info(f"{comm.get_local_size()} processes on this machine's {_usable_cpus()} CPUs: "
                f"{threads} threads each (set OMP_NUM_THREADS to choose).")
    return threads


def allreduce_bytes_per_step(model: nn.Module, fp16_compression: bool = False) -> int:
    """Bytes of gradients DDP all-reduces per training step: one gradient per trainable parameter (its
    dtype, or fp16 with ``fp16_compression``); frozen parameters send nothing. Shared tensors count once."""
    model = getattr(model, "module", model)
    return sum(p.numel() * (2 if fp16_compression else p.element_size())
               for p in model.parameters() if p.requires_grad)


def trainable_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the trainable parameters' names and values: equal on every rank of a healthy DDP run."""
    model = getattr(model, "module", model)
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach().cpu().contiguous()
            digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def gather_from_all_ranks(value: Any) -> List[Any]:
    """``[value of rank 0, value of rank 1, ...]`` (``[value]`` in a 1-process run); a collective: every
    rank must call it at the same point."""
    return comm.all_gather(value) if comm.get_world_size() > 1 else [value]


def ddp_gradient_bytes(model: nn.Module) -> Optional[int]:
    """The bytes DDP itself says it all-reduces per step (its buckets' total), None for a model not in DDP;
    it agrees with :func:`allreduce_bytes_per_step` without fp16 compression."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return None
    data = model._get_ddp_logging_data()  # private, but the only place DDP states its bucket sizes
    return int(data["total_parameter_size_bytes"])
