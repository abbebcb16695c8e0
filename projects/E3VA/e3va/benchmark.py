"""Parameter, memory and time cost of tuning methods: one training step, measured per method.

The paper's efficiency tables compare, for one detector and input, each tuning method's trainable
backbone parameters, peak training memory and time per step. This module measures them:

* :func:`measure_method` builds the detector of a LazyConfig with its backbone's ``tuning``
  (``model.backbone.bottom_up.tuning``, or ``model.backbone.net.tuning`` on ViT) set to one method and
  times ``W + N`` training steps (Detectron2's ``SimpleTrainer`` order: forward, ``zero_grad``, backward,
  AdamW step over the trainable parameters) on one seeded synthetic batch. The weights every method
  shares with ``fixed`` are ``fixed``'s (:func:`build_with_shared_weights`), so the heads start alike
  and their cost does not differ by method;
* :func:`run_method_isolated` runs it in a fresh Python process (``python -m e3va.benchmark``), because
  a process's allocator caches and high-water marks would otherwise leak from one method into the next;
* :func:`run_benchmark` does that for every method, and a failing method gives a ``"failed: ..."``
  record instead of stopping the others. With ``rounds > 1`` it measures every method once per round,
  interleaved (each round in a rotated order), and :func:`merge_rounds` reports per method the median
  over rounds: a host whose speed drifts over minutes then slows every method alike, and a step-time
  ratio is taken between methods of the same round (:func:`paired_time_ratios`);
* :func:`write_results_json`, :func:`format_markdown_table` / :func:`write_markdown` and
  :func:`plot_results` write ``results.json``, a paper-style table and a bar chart.

``tools/benchmark_tuning.py`` is the command line.

Peak memory, ``peak_memory_mb``:
    on CUDA, ``torch.cuda.max_memory_allocated`` over the steps, after ``reset_peak_memory_stats`` just
    before the first one (tensors only; the model's weights included);
    on the CPU, the peak resident set over the steps minus the resident set just before the first one
    (what the steps add on top of the built model and batch). The peak is the kernel's ``VmHWM``, reset
    through ``/proc/self/clear_refs`` before the first step; ``ru_maxrss`` is not used because a child
    process inherits its parent's value at ``exec``. Workers run with ``MALLOC_MMAP_THRESHOLD_=131072``:
    glibc then maps large buffers with ``mmap`` and unmaps them on ``free``, so the resident set follows
    the live tensors instead of glibc's free lists.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from detectron2.structures import BitMasks, Boxes, Instances

from .atomic import atomic_write_text
from .overrides import apply_overrides

__all__ = [
    "BenchmarkSettings",
    "RECORD_FIELDS",
    "describe_device",
    "failed_record",
    "format_markdown_table",
    "load_note",
    "load_benchmark_config",
    "measure_method",
    "merge_rounds",
    "paired_time_ratios",
    "plot_results",
    "round_order",
    "run_benchmark",
    "run_method_isolated",
    "summary_line",
    "synthetic_batch",
    "worker_environment",
    "write_json",
    "write_markdown",
    "write_results_json",
]

_MB = float(2**20)

# glibc serves allocations of at least this many bytes with mmap and returns them to the kernel on free,
# so on the CPU the peak resident set tracks live tensors (see the module docstring).
MALLOC_MMAP_THRESHOLD = "131072"

# Every record has these keys (None where a failed worker could not measure them).
RECORD_FIELDS = (
    "method",
    "status",
    "backbone_trainable_params",
    "head_trainable_params",
    "trainable_params",
    "total_params",
    "peak_memory_mb",
    "peak_rss_abs_mb",
    "memory_before_step_mb",
    "step_time_s",
    "step_times_s",
    "final_loss",
    "device",
    "config",
    "overrides",
    "input_size",
    "batch_size",
    "iters",
    "warmup",
    "torch_version",
)


# --------------------------------------------------------------------------- inputs
def synthetic_batch(
    batch_size: int = 2, size: int = 64, num_classes: int = 3, seed: int = 0, num_instances: int = 2
) -> List[Dict[str, Any]]:
    """Detectron2-style training inputs: seeded random ``size`` x ``size`` uint8 images, each with
    ``num_instances`` box+mask instances.

    The first two boxes are fixed fractions of the image (at ``size=64``: ``[4, 6, 30, 40]`` and
    ``[20, 10, 60, 50]``); further ones are drawn from the seeded generator. Masks fill their boxes.
    """
    if batch_size < 1 or size < 8 or num_classes < 1 or num_instances < 1:
        raise ValueError(
            f"synthetic_batch needs batch_size >= 1, size >= 8, num_classes >= 1 and num_instances >= 1; "
            f"got batch_size={batch_size}, size={size}, num_classes={num_classes}, num_instances={num_instances}."
        )
    g = torch.Generator().manual_seed(seed)
    template = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]]) * (size / 64.0)
    batch = []
    for _ in range(batch_size):
        image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        classes = torch.randint(0, num_classes, (num_instances,), generator=g)
        boxes = template[:num_instances]
        if num_instances > len(template):
            extra = num_instances - len(template)
            xy0 = torch.rand(extra, 2, generator=g) * 0.6 * size
            wh = (0.15 + 0.25 * torch.rand(extra, 2, generator=g)) * size
            boxes = torch.cat([boxes, torch.cat([xy0, (xy0 + wh).clamp(max=size)], dim=1)])
        masks = torch.zeros(num_instances, size, size, dtype=torch.bool)
        for k, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
            masks[k, y0:y1, x0:x1] = True
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = classes
        inst.gt_masks = BitMasks(masks)
        batch.append({"image": image, "instances": inst, "height": size, "width": size})
    return batch


# --------------------------------------------------------------------------- settings
@dataclass
class BenchmarkSettings:
    """What every method of one benchmark shares. Plain JSON types, so a worker process can receive it."""

    config_file: str
    overrides: List[str] = field(default_factory=list)  # LazyConfig KEY=VALUE, applied before the method's
    input_size: int = 512
    batch_size: int = 2
    iters: int = 5  # timed steps
    warmup: int = 2  # untimed steps before them (but inside the memory window)
    device: str = "cpu"
    seed: int = 0
    instances_per_image: int = 3

    def __post_init__(self) -> None:
        checks = {
            "input_size": (self.input_size, 32),
            "batch_size": (self.batch_size, 1),
            "iters": (self.iters, 1),
            "warmup": (self.warmup, 0),
            "instances_per_image": (self.instances_per_image, 1),
        }
        for name, (value, low) in checks.items():
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        if torch.device(self.device).type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda' (optionally 'cuda:N'), got {self.device!r}.")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "BenchmarkSettings":
        return cls(**json.loads(text))


def load_benchmark_config(config_file: str, overrides: Sequence[str] = (), method: Optional[str] = None):
    """The LazyConfig of ``config_file`` with ``overrides`` and, given ``method``, the tuning override.

    Raises ValueError naming the file or the override that does not apply.
    """
    from detectron2.config import LazyConfig

    if not Path(config_file).is_file():
        raise ValueError(f"Config file {config_file!r} does not exist; pass a LazyConfig .py file, "
                         "e.g. configs/COCO/mask_rcnn_swin_t_e3va.py.")
    cfg = LazyConfig.load(config_file)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"Overrides must look like KEY=VALUE, got {bad}.")
    try:
        cfg = apply_overrides(cfg, list(overrides))  # a mistyped key is an error, naming the closest
    except Exception as e:  # omegaconf/Detectron2 raise several types; say which override failed
        raise ValueError(f"Could not apply overrides {list(overrides)} to {config_file}: {e}") from e
    from .backbone import backbone_config_key

    try:
        key = backbone_config_key(cfg)
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}") from e
    if method is not None:
        cfg = LazyConfig.apply_overrides(cfg, [f"{key}.tuning={method}"])
    return cfg


# --------------------------------------------------------------------------- device & memory
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


def _status_kb(key: str) -> Optional[float]:
    """A ``kB`` field of ``/proc/self/status`` in MB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def _reset_cpu_peak() -> bool:
    """Resets the kernel's peak resident set (VmHWM) of this process; False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_rss_mb() -> float:
    rss = _status_kb("VmRSS")
    if rss is not None:
        return rss
    from .engine.memory import current_rss_mb

    return current_rss_mb()


def _cpu_peak_mb() -> float:
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm
    from .engine.memory import peak_rss_mb  # not resettable: an upper bound that includes model building

    return peak_rss_mb()


def _load_avg() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on every platform
        return None


def worker_environment(device: str, base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The environment of a worker: ``base`` (default ``os.environ``), plus, on the CPU,
    ``MALLOC_MMAP_THRESHOLD_`` unless the caller already set it."""
    env = dict(os.environ if base is None else base)
    if torch.device(device).type == "cpu":
        env.setdefault("MALLOC_MMAP_THRESHOLD_", MALLOC_MMAP_THRESHOLD)
    return env


# --------------------------------------------------------------------------- records
def _base_record(method: str, settings: BenchmarkSettings) -> Dict[str, Any]:
    record: Dict[str, Any] = {k: None for k in RECORD_FIELDS}
    record.update(
        method=method,
        config=settings.config_file,
        overrides=list(settings.overrides),
        input_size=settings.input_size,
        batch_size=settings.batch_size,
        iters=settings.iters,
        warmup=settings.warmup,
        torch_version=torch.__version__,
        step_times_s=[],
    )
    return record


def failed_record(method: str, settings: BenchmarkSettings, reason: str, **known: Any) -> Dict[str, Any]:
    """A record for a method that could not be measured; ``known`` keeps what was (e.g. parameter counts)."""
    record = _base_record(method, settings)
    record.update({k: v for k, v in known.items() if v is not None})
    record["status"] = f"failed: {reason}"
    return record


def _count(params) -> int:
    return sum(p.numel() for p in params)


SHARED_WEIGHTS_REFERENCE = "fixed"


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

    from .checkpoint import align_with_wrapped_layers

    torch.manual_seed(settings.seed)
    model = instantiate(cfg.model)
    if method == SHARED_WEIGHTS_REFERENCE:
        return model
    reference_cfg = load_benchmark_config(settings.config_file, settings.overrides, SHARED_WEIGHTS_REFERENCE)
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

    from .backbone import find_tuned_backbone

    record = _base_record(method, settings)
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
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        record["memory_before_step_mb"] = torch.cuda.memory_allocated(device) / _MB
    else:
        record["cpu_peak_reset"] = _reset_cpu_peak()
        record["memory_before_step_mb"] = _cpu_rss_mb()

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

    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / _MB
        record["peak_memory_mb"] = peak
        record["peak_mem_reserved_mb"] = torch.cuda.max_memory_reserved(device) / _MB
        record["peak_rss_abs_mb"] = _cpu_peak_mb()
    else:
        peak_abs = _cpu_peak_mb()
        record["peak_rss_abs_mb"] = peak_abs
        record["peak_memory_mb"] = peak_abs - record["memory_before_step_mb"]
    record["step_times_s"] = times
    record["step_time_s"] = statistics.median(times)
    record["step_cpu_times_s"] = cpu_times  # CPU time of all the process's threads
    record["step_cpu_time_s"] = statistics.median(cpu_times)
    record["load_avg_1m_after"] = _load_avg()
    record["final_loss"] = loss_value
    record["losses"] = losses_by_step  # the first is the same for every method that starts as `fixed`
    record["status"] = "ok" if math.isfinite(loss_value) else f"failed: non-finite loss {loss_value}"
    return record


# --------------------------------------------------------------------------- process isolation
def _failure_from_log(log_text: str, returncode: int) -> str:
    """A one-line reason: the last exception line of the worker's output, or how it ended."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        reason = f"killed by signal {name}"
        return reason + (" (likely out of memory)" if -returncode == signal.SIGKILL else "")
    lines = [ln.strip() for ln in log_text.splitlines() if ln.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) or head in ("KeyboardInterrupt", "SystemExit"):
            return line[:300]
    return f"worker exited with code {returncode}" + (f": {lines[-1][:200]}" if lines else "")


def run_method_isolated(
    method: str,
    settings: BenchmarkSettings,
    work_dir: Path,
    *,
    timeout: Optional[float] = None,
    python: str = sys.executable,
) -> Dict[str, Any]:
    """Runs :func:`measure_method` for ``method`` in a fresh ``python -m e3va.benchmark`` process.

    The worker's output goes to ``work_dir/<method>.log`` and its record to ``work_dir/<method>.json``.
    Never raises for a failing worker: it returns a ``"failed: ..."`` record instead.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    result_file, log_file = work_dir / f"{method}.json", work_dir / f"{method}.log"
    result_file.unlink(missing_ok=True)  # a stale record must not pass for this run's
    cmd = [python, "-m", "e3va.benchmark", "--method", method, "--settings", settings.to_json(),
           "--result-file", str(result_file)]
    with open(log_file, "w") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=worker_environment(settings.device),
                                  timeout=timeout)
            returncode = proc.returncode
        except subprocess.TimeoutExpired:
            return failed_record(method, settings, f"timed out after {timeout:g} s (log: {log_file})")
    record: Optional[Dict[str, Any]] = None
    if result_file.is_file():
        try:
            record = json.loads(result_file.read_text())
        except json.JSONDecodeError:
            record = None
    if record is not None and (returncode == 0 or str(record.get("status", "")).startswith("failed")):
        return {**_base_record(method, settings), **record}
    known = {k: record.get(k) for k in RECORD_FIELDS if k != "status"} if record else {}
    return failed_record(method, settings, _failure_from_log(log_file.read_text(), returncode), **known)


def round_order(methods: Sequence[str], round_index: int) -> List[str]:
    """The order of round ``round_index`` (0-based): ``methods`` rotated by it, so that no method always
    runs first, or always right after the same one."""
    shift = round_index % len(methods) if methods else 0
    return list(methods[shift:]) + list(methods[:shift])


def run_benchmark(
    methods: Sequence[str],
    settings: BenchmarkSettings,
    work_dir: Path,
    *,
    rounds: int = 1,
    timeout: Optional[float] = None,
    on_record: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> List[Dict[str, Any]]:
    """Measures every method, each in its own process, ``rounds`` times (interleaved, see
    :func:`round_order`), and returns one record per method in ``methods``' order (:func:`merge_rounds`).
    ``on_record`` sees each process's record as it arrives (to print it, or to save partial results);
    with several rounds those carry ``round`` (1-based) and their logs go to ``work_dir/round<k>/``."""
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}.")
    measured = []
    for k in range(rounds):
        round_dir = Path(work_dir) if rounds == 1 else Path(work_dir) / f"round{k + 1}"
        for method in round_order(methods, k):
            record = run_method_isolated(method, settings, round_dir, timeout=timeout)
            if rounds > 1:
                record["round"] = k + 1
            measured.append(record)
            if on_record is not None:
                on_record(record)
    return merge_rounds(measured, order=methods)


def _median(values: Sequence[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# Per-round values that merge_rounds keeps as lists (``round_<key>``) and reports as their median.
_PER_ROUND_MEDIANS = ("peak_memory_mb", "peak_rss_abs_mb", "memory_before_step_mb", "step_time_s", "step_cpu_time_s")


def merge_rounds(records: Sequence[Mapping[str, Any]], order: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """One record per method from its records of several rounds (a method with one record is returned as is).

    A merged record is its first round's, with ``rounds`` (how many), ``round_<key>`` (the per-round
    values, in round order) and ``<key>`` their median for memory and time; ``step_times_s`` holds every
    timed step of every round, and the load average spans all rounds. A method that failed in any round is
    reported failed, with the round named. ``order`` (default: first appearance) orders the methods.
    """
    by_method: Dict[str, List[Mapping[str, Any]]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    names = [m for m in (order or by_method) if m in by_method]
    merged = []
    for name in names:
        runs = sorted(by_method[name], key=lambda r: r.get("round") or 0)
        if len(runs) == 1:
            merged.append(dict(runs[0]))
            continue
        record = {k: v for k, v in runs[0].items() if k != "round"}
        record["rounds"] = len(runs)
        failed = [r for r in runs if not _ok(r)]
        if failed:
            first = failed[0]
            record.update({k: v for k, v in first.items() if k != "round"})
            reason = str(first.get("status", "failed: ?")).removeprefix("failed: ")
            record["status"] = f"failed: in round {first.get('round')} of {len(runs)}: {reason}"
            merged.append(record)
            continue
        for key in _PER_ROUND_MEDIANS:
            record["round_" + key] = [r.get(key) for r in runs]
            record[key] = _median(record["round_" + key])
        record["step_times_s"] = [t for r in runs for t in r.get("step_times_s") or []]
        record["step_cpu_times_s"] = [t for r in runs for t in r.get("step_cpu_times_s") or []]
        loads = [r[k] for r in runs for k in ("load_avg_1m_before", "load_avg_1m_after") if r.get(k) is not None]
        if loads:
            record["load_avg_1m_before"], record["load_avg_1m_after"] = min(loads), max(loads)
        merged.append(record)
    return merged


def paired_time_ratios(record: Mapping[str, Any], reference: Mapping[str, Any]) -> List[float]:
    """``record``'s step time over ``reference``'s, round by round (empty unless both ran the same rounds).

    Two methods of one round ran minutes apart, so their ratio is spared the host's slower drifts; the
    spread of these ratios over rounds says how far to trust their median."""
    mine, ref = record.get("round_step_time_s") or [], reference.get("round_step_time_s") or []
    if len(mine) < 2 or len(mine) != len(ref) or not all(mine) or not all(ref):
        return []
    return [a / b for a, b in zip(mine, ref)]


# --------------------------------------------------------------------------- reporting
def _ok(record: Mapping[str, Any]) -> bool:
    return record.get("status") == "ok"


def _millions(n: Optional[float]) -> str:
    if n is None:
        return "—"
    if n == 0:
        return "0"
    # Two decimals as in the paper's tables, more for the tiny counts of small test models.
    return f"{n / 1e6:.2f}" if n >= 1e5 else f"{n / 1e6:.4f}"


def summary_line(record: Mapping[str, Any]) -> str:
    """One console line per method: method, parameters, memory, time (or why it failed)."""
    params = (f"backbone {_millions(record.get('backbone_trainable_params'))} M "
              f"(heads {_millions(record.get('head_trainable_params'))} M)")
    name = f"{record['method']:<14}" + (f" round {record['round']}" if record.get("round") else "")
    if not _ok(record):
        return f"{name} {params}  {record.get('status')}"
    return f"{name} {params}  peak memory {record['peak_memory_mb']:8.1f} MB  step {record['step_time_s']:7.3f} s"


def write_json(obj: Any, path: Path) -> Path:
    """Writes ``obj`` as indented JSON to ``path``, creating its folder. Through a temporary file, so a
    reader (or a run killed mid-write) never sees half a file."""
    return atomic_write_text(json.dumps(obj, indent=2) + "\n", path)


def load_note(records: Sequence[Mapping[str, Any]]) -> Optional[str]:
    """The range of the 1-minute load average seen by the workers, with a warning when it exceeded
    their thread count (other processes then shared the CPU and wall-clock times are inflated)."""
    loads = [r[k] for r in records for k in ("load_avg_1m_before", "load_avg_1m_after") if r.get(k) is not None]
    if not loads:
        return None
    threads = max((r.get("num_threads") or 0 for r in records), default=0)
    note = f"{min(loads):.1f}–{max(loads):.1f} (workers use {threads} threads)"
    # The load average includes the worker itself; half a core of slack for short-lived housekeeping.
    if threads and max(loads) > threads + 0.5:
        note += ("; other processes competed for the CPU, so step times may be inflated "
                 "(results.json also has each step's CPU time, step_cpu_time_s)")
    return note


def write_results_json(records: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Writes ``records`` to ``path`` as a JSON list."""
    return write_json(list(records), path)


def _reference(records: Sequence[Mapping[str, Any]], method: str) -> Optional[Mapping[str, Any]]:
    return next((r for r in records if r.get("method") == method and _ok(r)), None)


def _delta(value: Optional[float], ref: Optional[float], is_ref: bool) -> str:
    if is_ref:
        return "ref"
    if value is None or not ref:
        return "—"
    return f"{100.0 * (value / ref - 1.0):+.1f}%"


def _ratio(value: Optional[float], ref: Optional[float]) -> str:
    if value is None or not ref:
        return "—"
    return f"{value / ref:.2f}×"


def _time_vs(record: Mapping[str, Any], reference: Mapping[str, Any]) -> str:
    """The step-time ratio; over several rounds the median of the per-round ratios, with their range."""
    ratios = paired_time_ratios(record, reference)
    if not ratios or record is reference:
        return _ratio(record.get("step_time_s"), reference.get("step_time_s"))
    return f"{statistics.median(ratios):.2f}× ({min(ratios):.2f}–{max(ratios):.2f})"


def format_markdown_table(
    records: Sequence[Mapping[str, Any]], meta: Optional[Mapping[str, Any]] = None, title: str = "Tuning-method cost"
) -> str:
    """A paper-style markdown table of ``records``, after a header listing ``meta`` (``"key": value``
    lines, e.g. config, input size, device, command).

    Δ% columns compare with ``full`` and ratio columns with ``fixed`` when those methods are present and
    succeeded; failed methods get a row of dashes and their reason below the table. Records merged over
    rounds (:func:`merge_rounds`) show medians, and the time ratio to ``fixed`` is the median of the
    per-round ratios with their range in brackets.
    """
    full, fixed = _reference(records, "full"), _reference(records, "fixed")
    lines = [f"# {title}", ""]
    for key, value in (meta or {}).items():
        shown = f"`{value}`" if key.lower() == "command" else str(value)
        lines.append(f"- {key}: {shown}")
    if meta:
        lines.append("")
    header = ["Method", "Backbone trainable params (M)", "Δ% vs full", "Head params (M)", "Peak memory (MB)",
              "Δ% vs full", "Step time (s)", "Δ% vs full"]
    align = ["---", "---:", "---:", "---:", "---:", "---:", "---:", "---:"]
    if fixed is not None:
        header += ["Memory vs fixed", "Time vs fixed"]
        align += ["---:", "---:"]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    failures = []
    for r in records:
        ok = _ok(r)
        is_full = full is not None and r is full
        mem = r.get("peak_memory_mb") if ok else None
        step = r.get("step_time_s") if ok else None
        params = r.get("backbone_trainable_params")
        name = r.get("method", "?") if ok else f"{r.get('method', '?')} (failed)"
        row = [
            name,
            _millions(params),
            _delta(params, full and full.get("backbone_trainable_params"), is_full),
            _millions(r.get("head_trainable_params")),
            "—" if mem is None else f"{mem:.0f}",
            _delta(mem, full and full.get("peak_memory_mb"), is_full),
            "—" if step is None else f"{step:.3f}",
            _delta(step, full and full.get("step_time_s"), is_full),
        ]
        if fixed is not None:
            row += [_ratio(mem, fixed.get("peak_memory_mb")), _time_vs(r, fixed) if ok else "—"]
        lines.append("| " + " | ".join(row) + " |")
        if not ok:
            reason = str(r.get("status") or "no status")
            failures.append(f"- `{r.get('method')}`: {reason.removeprefix('failed: ')}")
    if failures:
        lines += ["", "Failed:", *failures]
    return "\n".join(lines) + "\n"


def write_markdown(
    records: Sequence[Mapping[str, Any]], path: Path, meta: Optional[Mapping[str, Any]] = None, **kwargs: Any
) -> Path:
    """Writes :func:`format_markdown_table` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(format_markdown_table(records, meta, **kwargs))
    return path


def _bar_color(method: str) -> str:
    if method.startswith("e3va"):
        return "tab:red"
    return {"full": "tab:blue", "fixed": "tab:gray", "losa": "tab:purple"}.get(method, "tab:olive")


def plot_results(records: Sequence[Mapping[str, Any]], path: Path, title: str = "") -> Path:
    """Three bar charts side by side, one bar per method: peak memory, step time and backbone trainable
    parameters (symmetric-log scale, so a method training none shows a zero). Failed methods keep their
    place with a "failed" mark instead of a bar; records merged over rounds get whiskers from their
    smallest to their largest round."""
    # The Agg canvas directly, not pyplot: no global backend switch in a process that may have its own.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [str(r.get("method", "?")) for r in records]
    x = list(range(len(records)))
    fig = Figure(figsize=(max(12.0, 3.0 + 1.35 * len(records)), 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    panels = [
        ("peak_memory_mb", "Peak memory (MB)", 1.0, False),
        ("step_time_s", "Step time (s)", 1.0, False),
        ("backbone_trainable_params", "Backbone trainable params (M)", 1e-6, True),
    ]
    for ax, (key, label, scale, log) in zip(axes, panels):
        values = []
        for r in records:
            v = r.get(key)
            measured = key == "backbone_trainable_params" or _ok(r)  # counts survive a failed step
            values.append(float(v) * scale if measured and v is not None else math.nan)
        heights = [0.0 if math.isnan(v) else v for v in values]
        spread = None
        if any(r.get("round_" + key) for r in records):  # merged over rounds: whiskers span the rounds
            rounds = [[float(t) * scale for t in r.get("round_" + key) or [] if t is not None] if _ok(r) else []
                      for r in records]
            spread = [[h - min(ts, default=h) for h, ts in zip(heights, rounds)],
                      [max(ts, default=h) - h for h, ts in zip(heights, rounds)]]
        bars = ax.bar(x, heights, color=[_bar_color(n) for n in names], yerr=spread, capsize=3 if spread else 0)
        if log:
            positive = [v for v in values if v > 0]
            # Linear below the smallest non-zero count, logarithmic above: zero stays visible as zero.
            smallest = min(positive) if positive else 1e-3
            ax.set_yscale("symlog", linthresh=10.0 ** math.floor(math.log10(smallest)))
        tops = [h + up for h, up in zip(heights, spread[1])] if spread else heights  # labels above whiskers
        for bar, v, top in zip(bars, values, tops):
            text = "failed" if math.isnan(v) else (f"{v:.3g}" if v else "0")
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, top), ha="center", va="bottom",
                        fontsize=7, color="black" if not math.isnan(v) else "tab:red",
                        xytext=(0, 2), textcoords="offset points")
        ax.set_title(label)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=45, ha="right")
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# --------------------------------------------------------------------------- worker entry point
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


def _worker_main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m e3va.benchmark --method M --settings JSON --result-file PATH``: measures one method
    and writes its record (``status`` ``"failed: ..."`` and exit code 1 on an exception)."""
    parser = argparse.ArgumentParser(description="Benchmark worker: measures one tuning method.")
    parser.add_argument("--method", required=True)
    parser.add_argument("--settings", required=True, help="BenchmarkSettings as JSON")
    parser.add_argument("--result-file", required=True)
    args = parser.parse_args(argv)
    settings = BenchmarkSettings.from_json(args.settings)
    try:
        record = measure_method(args.method, settings)
        code = 0 if _ok(record) else 1
    except BaseException as e:  # MemoryError and KeyboardInterrupt too: the parent wants a reason
        traceback.print_exc()
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        record = failed_record(args.method, settings, reason)
        code = 1
    write_json(record, Path(args.result_file))
    print(summary_line(record), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(_worker_main())
