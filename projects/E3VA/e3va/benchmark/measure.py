"""One method's measurement, in this process: :func:`measure_method` builds the detector with the method
(on the weights it shares with ``fixed``, :func:`build_with_shared_weights`) and times training steps.

Peak memory, ``peak_memory_mb`` (read through :mod:`e3va.engine.memory`, as the training hook reads it):
    on CUDA, ``torch.cuda.max_memory_allocated`` over the steps, after ``reset_peak_memory_stats`` just
    before the first one (tensors only; the model's weights included);
    on the CPU, the peak resident set over the steps minus the resident set just before the first one
    (what the steps add on top of the built model and batch). The peak is the kernel's ``VmHWM``, reset
    through ``/proc/self/clear_refs`` before the first step (``cpu_peak_reset`` in the record says whether
    that worked; where it did not, the peak also covers model building). ``ru_maxrss`` is not used because
    a child process inherits its parent's value at ``exec``. Workers run with
    ``MALLOC_MMAP_THRESHOLD_=131072`` (:func:`e3va.benchmark.runner.worker_environment`): glibc then maps
    large buffers with ``mmap`` and unmaps them on ``free``, so the resident set follows the live tensors
    instead of glibc's free lists.
"""
from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import time
from typing import Any, Dict, List, Optional

import torch

from e3va import find_tuned_backbone

from ..checkpoint_io import align_with_wrapped_layers
from ..engine.memory import current_memory_mb, peak_memory_mb, peak_rss_mb, reset_peak_memory
from ..methods import CROSSING_OPTIONS, METHOD_OPTIONS, SIDE_NETWORK_OPTIONS
from ..synthetic import synthetic_batch
from .settings import BenchmarkSettings, base_record, load_benchmark_config

__all__ = ["SHARED_WEIGHTS_REFERENCE", "build_with_shared_weights", "describe_device", "measure_method"]

SHARED_WEIGHTS_REFERENCE = "fixed"
# Options that shape only a tuned method's own modules. The reference has none of those modules and refuses
# them, so an ablation such as ``adapter_arrangement=stacked`` is built against the reference without them.
METHOD_ONLY_OPTIONS = (*METHOD_OPTIONS, *SIDE_NETWORK_OPTIONS, *CROSSING_OPTIONS)


def reference_overrides(overrides: List[str]) -> List[str]:
    """``overrides`` without those setting a :data:`METHOD_ONLY_OPTIONS` (the last part of the key)."""
    return [o for o in overrides if o.split("=", 1)[0].rsplit(".", 1)[-1] not in METHOD_ONLY_OPTIONS]


def describe_device(device: str) -> str:
    """``"cpu: <model name>, N threads"`` or ``"cuda: <device name>"``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(dev)}"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {name}, {torch.get_num_threads()} threads"


def _load_avg() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on every platform
        return None


def _count(params) -> int:
    return sum(p.numel() for p in params)


def build_with_shared_weights(cfg: Any, settings: BenchmarkSettings, method: str) -> torch.nn.Module:
    """``cfg.model`` (tuned with ``method``), holding the same weights as the ``fixed`` model of the same
    seed in every parameter the two share (trunk, FPN, heads).

    Building a method's own modules (highway, LoRA, adapters) draws from the random generator and would
    shift the heads' initialisation from one method to the next; the heads' cost then changes with their
    proposals (ROIAlign samples adaptively to proposal sizes, the mask head runs on the foreground ones),
    which is noise in a comparison of backbones. With shared weights, methods whose side network starts
    at zero give exactly the proposals of ``fixed`` at the first step.
    """
    from detectron2.config import instantiate

    torch.manual_seed(settings.seed)
    model = instantiate(cfg.model)
    if method == SHARED_WEIGHTS_REFERENCE:
        return model
    reference_cfg = load_benchmark_config(
        settings.config_file, reference_overrides(settings.overrides), SHARED_WEIGHTS_REFERENCE
    )
    torch.manual_seed(settings.seed)
    reference = instantiate(reference_cfg.model).state_dict()
    state = align_with_wrapped_layers(reference, model.state_dict().keys())
    incompatible = model.load_state_dict(state, strict=False)
    if incompatible.unexpected_keys:  # every parameter of `fixed` exists in every method
        raise RuntimeError(f"{method}: the fixed model's {incompatible.unexpected_keys[:5]} have no counterpart.")
    del reference, state
    gc.collect()
    return model


def measure_method(method: str, settings: BenchmarkSettings) -> Dict[str, Any]:
    """Builds the config's detector tuned with ``method`` and measures ``settings.warmup +
    settings.iters`` training steps in this process; see the module docstring for the fields.

    Exceptions propagate (the worker entry point turns them into a failed record).
    """
    from detectron2.utils.events import EventStorage

    record = base_record(method, settings)
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={settings.device!r} but CUDA is not available; use device='cpu'.")
    record["device"] = describe_device(settings.device)
    record["num_threads"] = torch.get_num_threads()
    record["instances_per_image"] = settings.instances_per_image
    record["malloc_mmap_threshold"] = os.environ.get("MALLOC_MMAP_THRESHOLD_")

    cfg = load_benchmark_config(settings.config_file, settings.overrides, method)
    model = build_with_shared_weights(cfg, settings, method).to(device).train()
    torch.manual_seed(settings.seed)  # the same drop-path and proposal-sampling draws for every method

    _, backbone = find_tuned_backbone(model)
    backbone_ids = {id(p) for p in backbone.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    record["backbone_trainable_params"] = _count(p for p in trainable if id(p) in backbone_ids)
    record["head_trainable_params"] = _count(p for p in trainable if id(p) not in backbone_ids)
    # The paper's "trained params" column counts the backbone only: every method trains the same heads.
    record["trainable_params"] = record["backbone_trainable_params"]
    record["total_params"] = _count(model.parameters())

    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.05)
    try:
        num_classes = int(cfg.model.roi_heads.num_classes)
    except Exception:  # configs without roi_heads.num_classes: three classes exist in every detector here
        num_classes = 3
    batch = synthetic_batch(settings.batch_size, settings.input_size, min(3, num_classes), settings.seed,
                            settings.instances_per_image)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    gc.collect()
    sync()
    # The memory window opens just before the first step, so it holds what training adds: activations,
    # gradients and AdamW's two moments (created at the first step), not model building.
    peak_reset = reset_peak_memory(device)
    if device.type == "cpu":
        record["cpu_peak_reset"] = peak_reset
    record["memory_before_step_mb"] = current_memory_mb(device)

    times: List[float] = []
    cpu_times: List[float] = []
    # Other processes on the machine slow the wall clock but hardly the process's own CPU time: both are
    # kept, with the load average, so a contended run can be recognised.
    record["load_avg_1m_before"] = _load_avg()
    loss_value = float("nan")
    losses_by_step: List[float] = []
    with EventStorage(0) as storage:  # Detectron2's heads log training statistics into it
        for step in range(settings.warmup + settings.iters):
            sync()
            start, cpu_start = time.perf_counter(), time.process_time()
            # SimpleTrainer's order: the previous step's gradients are freed by zero_grad only after the
            # forward pass, as in Detectron2's training loop, so the peak is the one training would see.
            losses = model(batch)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sync()
            elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu_start
            loss_value = float(loss.detach())
            losses_by_step.append(loss_value)
            del losses, loss
            storage.step()
            if step >= settings.warmup:
                times.append(elapsed)
                cpu_times.append(cpu_elapsed)

    peaks = peak_memory_mb(device)
    if device.type == "cuda":
        record["peak_memory_mb"] = peaks["peak_mem_alloc_mb"]
        record["peak_mem_reserved_mb"] = peaks["peak_mem_reserved_mb"]
        record["peak_rss_abs_mb"] = peak_rss_mb()  # the CPU's, since the process started
    else:
        record["peak_rss_abs_mb"] = peaks["peak_rss_mb"]
        record["peak_memory_mb"] = peaks["peak_rss_mb"] - record["memory_before_step_mb"]
    record["step_times_s"] = times
    record["step_time_s"] = statistics.median(times)
    record["step_cpu_times_s"] = cpu_times  # CPU time of all the process's threads
    record["step_cpu_time_s"] = statistics.median(cpu_times)
    record["load_avg_1m_after"] = _load_avg()
    record["final_loss"] = loss_value
    record["losses"] = losses_by_step  # the first is the same for every method that starts as `fixed`
    record["status"] = "ok" if math.isfinite(loss_value) else f"failed: non-finite loss {loss_value}"
    return record


