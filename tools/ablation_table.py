#!/usr/bin/env python
"""The table of the paper's ablations (§4.3) on the shapes task, from the runs the study left on disk.

Reads, per variant, ``DIR/<variant>/transfer.json`` (tools/transfer_study.py: box / mask AP over seeds) and
``DIR/swin_b_memory/<variant>/results.json`` (tools/benchmark_tuning.py on Swin-B: trainable backbone
parameters, peak training memory), ``DIR/swin_b_time/round<k>/<variant>/results.json`` (the same tool, every
variant once per round, rounds interleaved: the step's CPU time, which a busy host inflates less than the
wall time of a one-thread step), and the reference e3va row from ``--reference``: the study's
e3va runs at the ablations' rate, 1e-3 (``DIR/paper/runs`` links to the study's runs, so that
``tools/transfer_study.py --methods e3va --backbone-lr e3va=1e-3 --only-finished --output DIR/paper`` assembles
them without training). Prints a Markdown table, one row per variant, with the paper's stated direction;
a missing run is shown as such, never guessed.

    python tools/ablation_table.py --ablations docs/ablations --reference docs/ablations/paper/transfer.json
"""
from __future__ import annotations

import argparse
import json
from statistics import median
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

# (folder, override, the paper's stated direction)
VARIANTS: List[Tuple[str, str, str]] = [
    ("paper", "—", "—"),
    ("sublayer_input", "`adapter_input=sublayer_input`", "the paper's taps read the sub-layer outputs"),
    ("stacked", "`adapter_arrangement=stacked`", "parallel is better and faster"),
    ("direct", "`highway_downsample=direct`", "— (the paper's literal reading of the crossing)"),
    ("merging", "`highway_merging=trainable`", "many more parameters, no significant gain"),
    ("frozen_norms", "`train_out_norms=False`", "training the norms helps, at no memory cost"),
    ("drop_path", "`drop_path_rate=0.2` (Swin-B: 0.3)", "— (not in the paper)"),
]


def _load(path: Path) -> Optional[Any]:
    return json.loads(path.read_text()) if path.is_file() else None


def _ap(summary: Optional[Dict[str, Any]], key: str) -> str:
    if summary is None or not summary.get(f"{key}_per_seed"):
        return "not run"
    stats = summary[key]
    return f"{stats['mean']:.1f}" + (f" ± {stats['std']:.1f}" if stats.get("std") is not None else "")


def _transfer(path: Path) -> Optional[Dict[str, Any]]:
    study = _load(path)
    if study is None:
        return None
    rows = [m for m in study["methods"] if m["method"] == "e3va"]
    return rows[0] if rows else None


def _swin_b(path: Path) -> Optional[Dict[str, Any]]:
    results = _load(path)
    rows = [r for r in results or [] if r.get("method") == "e3va" and r.get("status") == "ok"]
    return rows[0] if rows else None


def step_times(time_dir: Path) -> Dict[str, Tuple[float, Optional[float], int]]:
    """Per variant: (median CPU time of a step in s, median ratio to the paper's e3va within the same round or None
    when no round has that reading, rounds).

    The host's speed drifts over a day more than most variants differ, so a variant is compared only with the
    e3va reading of its own round; a round without that reading does not count towards the ratio.
    """
    per_round: Dict[str, List[float]] = {}
    ratios: Dict[str, List[float]] = {}
    for round_dir in sorted(time_dir.glob("round*")):
        readings = {name: _swin_b(round_dir / name / "results.json") for name, _, _ in VARIANTS}
        reference = readings.get("paper")
        for name, bench in readings.items():
            if bench is None:
                continue
            per_round.setdefault(name, []).append(bench["step_cpu_time_s"])
            if reference is not None:
                ratios.setdefault(name, []).append(bench["step_cpu_time_s"] / reference["step_cpu_time_s"])
    return {name: (median(times), median(ratios[name]) if name in ratios else None, len(times))
            for name, times in per_round.items()}


def _step_cells(steps: Dict[str, Tuple[float, Optional[float], int]], name: str) -> Tuple[str, str]:
    if name not in steps:
        return "not run", "not run"
    median, ratio, rounds = steps[name]
    return (f"{median:.1f} ({rounds} round{'s' if rounds > 1 else ''})",
            "no e3va reading in its rounds" if ratio is None else f"{ratio:.2f}")


def table(ablations: Path, reference: Path) -> str:
    lines = ["| variant | override | box AP | mask AP | seeds | Swin-B backbone trainable (M) "
             "| Swin-B peak memory (MB) | Swin-B step, CPU (s) | step / e3va's | paper's direction |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---|"]
    steps = step_times(ablations / "swin_b_time")
    for name, override, direction in VARIANTS:
        shapes = _transfer(reference if name == "paper" else ablations / name / "transfer.json")
        bench = _swin_b(ablations / "swin_b_memory" / name / "results.json")
        seeds = ", ".join(str(s) for s in shapes["seeds"] if s not in shapes.get("missing_seeds", [])) if shapes else ""
        params = f"{bench['backbone_trainable_params'] / 1e6:.2f}" if bench else "not run"
        memory = f"{bench['peak_memory_mb']:.0f}" if bench else "not run"
        step, ratio = _step_cells(steps, name)
        label = "e3va (the paper's)" if name == "paper" else name
        lines.append(f"| {label} | {override} | {_ap(shapes, 'bbox_AP')} | {_ap(shapes, 'segm_AP')} | {seeds} "
                     f"| {params} | {memory} | {step} | {ratio} | {direction} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ablations", type=Path, default=Path("docs/ablations"))
    parser.add_argument("--reference", type=Path, default=Path("docs/ablations/paper/transfer.json"))
    args = parser.parse_args(argv)
    text = table(args.ablations, args.reference)
    print(text)
    return text


if __name__ == "__main__":
    main()
