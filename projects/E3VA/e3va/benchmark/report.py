"""What a benchmark reports: a console line per method (:func:`summary_line`), ``results.json``
(:func:`write_results_json`), a paper-style markdown table (:func:`format_markdown_table`,
:func:`write_markdown`) and bar charts (:func:`plot_results`)."""
from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from ..atomic import atomic_open, atomic_write_json, atomic_write_text
from .runner import paired_time_ratios
from .settings import record_ok

__all__ = ["format_markdown_table", "load_note", "plot_results", "summary_line", "write_markdown", "write_results_json"]


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
    if not record_ok(record):
        return f"{name} {params}  {record.get('status')}"
    return f"{name} {params}  peak memory {record['peak_memory_mb']:8.1f} MB  step {record['step_time_s']:7.3f} s"


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
    return atomic_write_json(list(records), path)


def _reference(records: Sequence[Mapping[str, Any]], method: str) -> Optional[Mapping[str, Any]]:
    return next((r for r in records if r.get("method") == method and record_ok(r)), None)


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
        ok = record_ok(r)
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
    return atomic_write_text(format_markdown_table(records, meta, **kwargs), path)


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
            measured = key == "backbone_trainable_params" or record_ok(r)  # counts survive a failed step
            values.append(float(v) * scale if measured and v is not None else math.nan)
        heights = [0.0 if math.isnan(v) else v for v in values]
        spread = None
        if any(r.get("round_" + key) for r in records):  # merged over rounds: whiskers span the rounds
            rounds = [[float(t) * scale for t in r.get("round_" + key) or [] if t is not None] if record_ok(r) else []
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
    with atomic_open(path, "wb") as f:  # a file object hides the name, so the format is said
        fig.savefig(f, dpi=120, format=path.suffix.lstrip(".") or "png")
    return path
