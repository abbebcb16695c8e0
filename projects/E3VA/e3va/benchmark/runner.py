"""Every method in its own process: :func:`run_method_isolated` runs :func:`~e3va.benchmark.measure.measure_method`
in a fresh ``python -m e3va.benchmark`` (a process's allocator caches and high-water marks would otherwise
leak from one method into the next); :func:`run_benchmark` does that for every method, over interleaved
rounds, and :func:`merge_rounds` reports per method the median over rounds."""
from __future__ import annotations

import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from .settings import RECORD_FIELDS, BenchmarkSettings, base_record, failed_record, record_ok

__all__ = [
    "MALLOC_MMAP_THRESHOLD",
    "merge_rounds",
    "paired_time_ratios",
    "round_order",
    "run_benchmark",
    "run_method_isolated",
    "worker_environment",
]

# glibc serves allocations of at least this many bytes with mmap and returns them to the kernel on free,
# so on the CPU the peak resident set tracks live tensors (see e3va.benchmark.measure).
MALLOC_MMAP_THRESHOLD = "131072"


def worker_environment(device: str, base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The environment of a worker: ``base`` (default ``os.environ``), plus, on the CPU,
    ``MALLOC_MMAP_THRESHOLD_`` unless the caller already set it."""
    env = dict(os.environ if base is None else base)
    if torch.device(device).type == "cpu":
        env.setdefault("MALLOC_MMAP_THRESHOLD_", MALLOC_MMAP_THRESHOLD)
    return env


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
        return {**base_record(method, settings), **record}
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
        failed = [r for r in runs if not record_ok(r)]
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
