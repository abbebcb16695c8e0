"""Trainer hooks that report what E3VA is about: trainable parameters, peak memory and step time.

Ordering: Detectron2 runs the hooks' ``after_step`` in the order they were registered, and
``PeriodicWriter`` hands the storage's latest scalars to its writers (console, ``metrics.json``,
TensorBoard) in its own ``after_step``. :class:`PeakMemoryHook` therefore has to be registered
*before* the ``PeriodicWriter``; it puts its scalars on exactly the iterations the writer writes, so
they land in the same console line, ``metrics.json`` record and TensorBoard step. It warns when it
finds itself after a ``PeriodicWriter``. ``tools/lazyconfig_train_net.py`` registers it right after
``LRScheduler``, before the checkpointer and ``EvalHook``, so that its step times and summary cover
training only (no checkpoint saving, no evaluation).

In a multi-process run every process measures its own memory; the readings put into the storage (so
the console line and ``metrics.json``) and the summary's memory and time are the maximum over the ranks,
and ``e3va_summary.json`` lists each rank's values under ``per_rank``.

Detectron2's ``CommonMetricPrinter`` prints only losses, ``[metric]`` keys, times, the learning
rate and CUDA ``max_mem``; :class:`MemoryMetricPrinter` (used by :func:`default_e3va_writers`) adds
the peak-memory scalars to its console line.
"""
from __future__ import annotations

import logging
import os
import random
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from detectron2.engine.defaults import default_writers
from detectron2.engine.hooks import HookBase, PeriodicWriter
from detectron2.utils import comm
from detectron2.utils.events import CommonMetricPrinter, EventWriter, get_event_storage

from ..atomic import atomic_write_json
from .distributed import allreduce_bytes_per_step, ddp_gradient_bytes, gather_from_all_ranks, trainable_fingerprint
from .memory import DeviceLike, peak_memory_mb, reset_peak_memory
from .params import count_parameters

__all__ = [
    "MEMORY_SCALARS",
    "SUMMARY_FILENAME",
    "MemoryMetricPrinter",
    "PeakMemoryHook",
    "RandomStateHook",
    "combine_rank_summaries",
    "default_e3va_writers",
]

logger = logging.getLogger("e3va")

# The scalars PeakMemoryHook puts into the EventStorage: the first two on CUDA, the last elsewhere.
MEMORY_SCALARS = ("peak_mem_alloc_mb", "peak_mem_reserved_mb", "peak_rss_mb")
SUMMARY_FILENAME = "e3va_summary.json"
# Per-rank values of a summary that combine_rank_summaries replaces by their maximum over the ranks.
_MAX_OVER_RANKS = (*MEMORY_SCALARS, "rss_mb", "mean_iter_time_s")
_DEFAULT_PERIOD = 20  # Detectron2's default log period


class PeakMemoryHook(HookBase):
    """Puts peak memory into the EventStorage periodically; logs and saves a summary after training.

    Every ``period`` iterations (and at the last one, as ``PeriodicWriter`` does) it puts
    ``peak_mem_alloc_mb`` and ``peak_mem_reserved_mb`` on CUDA, ``peak_rss_mb`` on the CPU. The
    values are peaks since training started (on the CPU: where the kernel lets the peak resident set be
    reset, else since the process started; see :mod:`e3va.engine.memory`); they are put without
    smoothing, since a median of running peaks means nothing.

    At ``after_train`` it logs (logger ``"e3va"``) trainable / total parameters, peak memory and the
    mean wall time of an iteration, measured between its own ``before_step`` and ``after_step`` and
    skipping ``warmup_iters`` first iterations; with ``output_dir`` it also writes that summary to
    ``<output_dir>/e3va_summary.json`` (main process only). See the module docstring for ordering.

    In a multi-process run the readings and the summary are the maximum over the processes (see
    :func:`combine_rank_summaries`); the hook must then be registered in every process, since it gathers
    their readings (a collective) at each reading and after training.
    """

    def __init__(
        self,
        period: Optional[int] = None,
        output_dir: Optional[str] = None,
        device: Optional[DeviceLike] = None,
        warmup_iters: int = 3,
    ) -> None:
        """
        Args:
            period: iterations between readings; ``None`` takes the period of the trainer's
                ``PeriodicWriter`` (the log period), or 20 without one.
            output_dir: where to write ``e3va_summary.json``; ``None`` or ``""`` writes nothing.
            device: the device to measure; ``None`` takes the device of the model's parameters.
            warmup_iters: first iterations left out of the mean iteration time (allocator and
                cuDNN warm-up), as Detectron2's ``IterationTimer`` does.
        """
        if period is not None and period <= 0:
            raise ValueError(f"period must be positive, got {period}")
        self._period = period
        self._output_dir = output_dir or None
        self._device = torch.device(device) if device is not None else None
        self._warmup_iters = warmup_iters
        self._steps = 0
        self._timed_iters = 0
        self._timed_seconds = 0.0
        self._step_start: Optional[float] = None
        self.last_summary: Optional[Dict[str, Any]] = None

    @property
    def period(self) -> Optional[int]:
        """Iterations between readings (resolved at ``before_train`` when not given)."""
        return self._period

    # ---- trainer callbacks
    def before_train(self) -> None:
        if self._device is None:
            self._device = self._model_device()
        writers = self._periodic_writers()
        if self._period is None:
            # PeriodicWriter has no public accessor for its period.
            self._period = writers[0]._period if writers else _DEFAULT_PERIOD
        self._check_order(writers)
        self._steps = self._timed_iters = 0
        self._timed_seconds = 0.0
        reset_peak_memory(self._device)

    def before_step(self) -> None:
        self._step_start = time.perf_counter()

    def after_step(self) -> None:
        # Wall time without a CUDA sync of its own: SimpleTrainer reads the losses back with .item()
        # every step, which waits for the queued kernels, so the mean is right in steady state.
        if self._step_start is not None:
            elapsed = time.perf_counter() - self._step_start
            self._steps += 1
            if self._steps > self._warmup_iters:
                self._timed_iters += 1
                self._timed_seconds += elapsed
        next_iter = self.trainer.iter + 1
        # The same condition as PeriodicWriter.after_step, so each reading is written as it is taken.
        if next_iter % self._period == 0 or next_iter == self.trainer.max_iter:
            self._put_scalars()

    def after_train(self) -> None:
        summary = combine_rank_summaries(gather_from_all_ranks(self.summary()))
        self.last_summary = summary
        logger.info("Training summary: " + self.format_summary(summary))
        if self._output_dir and comm.is_main_process():
            path = os.path.join(self._output_dir, SUMMARY_FILENAME)
            atomic_write_json(summary, path)
            logger.info(f"Training summary saved to {path}")

    # ---- readings
    def summary(self) -> Dict[str, Any]:
        """Parameters, peak memory and mean iteration time of the run so far in this process,
        JSON-serialisable; also the bytes DDP all-reduces per step and a fingerprint of the trainable
        weights (equal on all ranks of a healthy multi-process run)."""
        model = getattr(self.trainer, "model", None)
        trainable, total = count_parameters(model) if model is not None else (0, 0)
        device = self._device if self._device is not None else torch.device("cpu")
        mean_time = self._timed_seconds / self._timed_iters if self._timed_iters else None
        return {
            "trainable_params": trainable,
            "total_params": total,
            "trainable_percent": 100.0 * trainable / total if total else 0.0,
            "device": str(device),
            **peak_memory_mb(device),
            "mean_iter_time_s": mean_time,
            "timed_iters": self._timed_iters,
            "warmup_iters": self._warmup_iters,
            "iterations": self._steps,
            "rank": comm.get_rank(),
            "world_size": comm.get_world_size(),
            "allreduce_bytes_per_step": allreduce_bytes_per_step(model) if model is not None else 0,
            "ddp_gradient_bytes": ddp_gradient_bytes(model) if model is not None else None,
            "trainable_sha256": trainable_fingerprint(model) if model is not None else None,
        }

    @staticmethod
    def format_summary(summary: Dict[str, Any]) -> str:
        """One line for the log."""
        keys = (*MEMORY_SCALARS, "rss_mb")
        memory = ", ".join(f"{k}={summary[k]:.1f}" for k in keys if k in summary)
        if summary.get("world_size", 1) > 1:
            memory += f" (max over {summary['world_size']} processes)"
        if summary["mean_iter_time_s"] is None:
            timing = f"too few iterations to time ({summary['iterations']}, warm-up {summary['warmup_iters']})"
        else:
            timing = (
                f"{summary['mean_iter_time_s']:.4f} s/iter over {summary['timed_iters']} iterations "
                f"(first {summary['warmup_iters']} skipped)"
            )
        return (
            f"trainable params: {summary['trainable_params']:,d} || all params: {summary['total_params']:,d} "
            f"|| trainable%: {summary['trainable_percent']:.4f} | memory (MB): {memory} | {timing}"
        )

    # ---- helpers
    def _put_scalars(self) -> None:
        # Every rank reaches this on the same iterations, so the gather cannot leave one waiting.
        all_readings = gather_from_all_ranks(peak_memory_mb(self._device))
        readings = {k: max(r[k] for r in all_readings) for k in all_readings[0]}
        storage = self.trainer.storage
        for key in MEMORY_SCALARS:
            if key in readings:
                storage.put_scalar(key, readings[key], smoothing_hint=False)

    def _model_device(self) -> torch.device:
        model = getattr(self.trainer, "model", None)
        param = next(model.parameters(), None) if model is not None else None
        return param.device if param is not None else torch.device("cpu")

    def _periodic_writers(self) -> List[PeriodicWriter]:
        return [h for h in getattr(self.trainer, "_hooks", []) if isinstance(h, PeriodicWriter)]

    def _check_order(self, writers: List[PeriodicWriter]) -> None:
        hooks = getattr(self.trainer, "_hooks", [])
        # trainer._hooks holds the hooks themselves (the trainer only gets a weak proxy).
        mine = next((i for i, h in enumerate(hooks) if h is self), None)
        if mine is not None and any(hooks.index(w) < mine for w in writers):
            logger.warning(
                "PeakMemoryHook is registered after a PeriodicWriter: its readings reach the console, "
                "metrics.json and TensorBoard one period late. Register it before the PeriodicWriter."
            )


def combine_rank_summaries(summaries: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One summary from the per-process ones (rank order): rank 0's, with memory readings and the mean
    iteration time replaced by their maximum over the ranks (the busiest process is what a machine must
    hold, the slowest what the run waits for), and ``per_rank``: each rank's own values."""
    if not summaries:
        raise ValueError("combine_rank_summaries needs at least one summary, got none.")
    combined = {k: v for k, v in summaries[0].items() if k not in ("rank", "trainable_sha256")}
    for key in _MAX_OVER_RANKS:
        values = [s[key] for s in summaries if s.get(key) is not None]
        if key in combined:
            combined[key] = max(values) if values else None
    per_rank_keys = ("rank", *_MAX_OVER_RANKS, "trainable_sha256")
    combined["per_rank"] = [{k: s[k] for k in per_rank_keys if k in s} for s in summaries]
    return combined


class RandomStateHook(HookBase):
    """Saves the random generators of the training process in checkpoints and restores them on resume.

    Detectron2 restores the model, optimizer, scheduler and iteration; the torch, NumPy and Python
    generators (proposal sampling, drop-path, augmentations in the main process) it leaves running from a
    fresh seed, so a resumed run drifts from the uninterrupted one. With this hook it does not, as long as
    the data stream itself repeats (``num_workers=0`` and a deterministic order: the sampler's position is
    not restored, and worker processes seed themselves).

    Multi-process runs: every rank draws from its own generators (Detectron2 seeds rank ``r`` with
    ``seed + r``), but only rank 0 writes checkpoints. So, on the iterations where the checkpointer saves
    (``checkpoint_period``, and the last one), every rank hands its state to all others here, before the
    checkpointer runs, and the checkpoint holds ``{"world_size": N, "ranks": [state of rank 0, ...]}``;
    on resume each rank takes its own. A checkpoint from another number of processes leaves the generators
    as seeded, with a warning.
    """

    def __init__(self, checkpoint_period: Optional[int] = None) -> None:
        """
        Args:
            checkpoint_period: the ``PeriodicCheckpointer``'s period; needed in multi-process runs (where
                the states are gathered on exactly the iterations it saves), unused in single-process ones.
        """
        if checkpoint_period is not None and checkpoint_period <= 0:
            raise ValueError(f"checkpoint_period must be positive or None, got {checkpoint_period}")
        self._period = checkpoint_period
        self._pending: Optional[Dict[str, Any]] = None
        self._gathered: Optional[Tuple[int, List[Dict[str, Any]]]] = None  # (iteration, states by rank)

    @staticmethod
    def _own_state() -> Dict[str, Any]:
        _, keys, pos, has_gauss, cached = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": list(random.getstate()[1]),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def after_step(self) -> None:
        if comm.get_world_size() == 1:
            return
        if self._period is None:
            raise ValueError("RandomStateHook needs checkpoint_period in a multi-process run; got None.")
        it = self.trainer.iter
        # fvcore's PeriodicCheckpointer.step saves on exactly these iterations.
        if (it + 1) % self._period == 0 or it >= self.trainer.max_iter - 1:
            self._gathered = (it, gather_from_all_ranks(self._own_state()))

    def state_dict(self) -> Dict[str, Any]:
        world_size = comm.get_world_size()
        if world_size == 1:
            return self._own_state()
        if self._gathered is not None and self._gathered[0] == self.trainer.iter:
            ranks: List[Optional[Dict[str, Any]]] = list(self._gathered[1])
        else:  # a save off the checkpoint period: the other ranks' states cannot be asked for now
            logger.warning(f"RandomStateHook: saving at iteration {self.trainer.iter}, off checkpoint_period="
                           f"{self._period}: only rank {comm.get_rank()}'s generators are saved.")
            ranks = [self._own_state() if r == comm.get_rank() else None for r in range(world_size)]
        return {"world_size": world_size, "ranks": ranks}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        world_size, rank = comm.get_world_size(), comm.get_rank()
        saved_world = state.get("world_size", 1) if "ranks" in state else 1
        own = state["ranks"][rank] if "ranks" in state and saved_world == world_size else None
        if saved_world == world_size == 1:
            own = state
        if own is None:
            logger.warning(
                f"RandomStateHook: the checkpoint holds the generators of {saved_world} process(es), this run has "
                f"{world_size}; rank {rank} keeps its freshly seeded generators (the resumed run will not repeat "
                "the random draws of an uninterrupted one)."
            )
        self._pending = own  # applied in before_train

    def before_train(self) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                             n["cached_gaussian"]))
        random.setstate((3, tuple(state["python"]), None))

        def restore_torch() -> None:
            torch.set_rng_state(state["torch"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])

        # The data loader's iterator is created lazily, inside the first fetch, and creating it draws from
        # torch's generator: the original run made that draw at iteration 0, before the saved state, so
        # the resumed run restores torch's generator only after its first fetch.
        if getattr(self.trainer, "_data_loader_iter_obj", 1) is None:  # SimpleTrainer, not started yet
            self.trainer._data_loader_iter_obj = _after_first_item(iter(self.trainer.data_loader), restore_torch)
        else:
            restore_torch()


def _after_first_item(iterator, action):
    """Yields ``iterator``'s items, calling ``action()`` once the first one has been produced."""
    first = next(iterator)
    action()
    yield first
    yield from iterator


class _SuffixAdapter(logging.LoggerAdapter):
    """Appends a fixed text to every message."""

    def __init__(self, logger: logging.Logger, suffix: str) -> None:
        super().__init__(logger, {})
        self._suffix = suffix

    def process(self, msg: Any, kwargs: Any):
        return f"{msg}{self._suffix}", kwargs


class MemoryMetricPrinter(CommonMetricPrinter):
    """Detectron2's ``CommonMetricPrinter`` with the peak-memory scalars at the end of its line."""

    def write(self) -> None:
        storage = get_event_storage()
        histories = storage.histories()
        extra = "  ".join(f"{k}: {histories[k].latest():.0f}M" for k in MEMORY_SCALARS if k in histories)
        if not extra:
            super().write()
            return
        # CommonMetricPrinter builds its line inside write(); wrapping its logger appends to that line
        # without copying the method.
        plain = self.logger
        self.logger = _SuffixAdapter(plain, "  " + extra)
        try:
            super().write()
        finally:
            self.logger = plain


def default_e3va_writers(output_dir: str, max_iter: Optional[int] = None) -> List[EventWriter]:
    """Detectron2's ``default_writers`` (console, ``metrics.json``, TensorBoard), with the console
    printer replaced by :class:`MemoryMetricPrinter`."""
    writers = default_writers(output_dir, max_iter)
    return [MemoryMetricPrinter(max_iter) if type(w) is CommonMetricPrinter else w for w in writers]
