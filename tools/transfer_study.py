#!/usr/bin/env python
"""Accuracy of tuning methods side by side on the embedded shapes task, over seeds, each method at the
backbone learning rate chosen for it on a validation split.

Every run trains ``configs/Shapes/mask_rcnn_e3va.py`` from the project's pretrained Swin "nano" through
``tools/demo.py`` (its own process, Detectron2's engine and COCOEvaluator). For each method:

1. with ``--lr-sweep`` (or a method's own list, ``--backbone-lr full=1e-4:3e-4``), one run per backbone
   learning rate (seed: the first of ``--seeds``), evaluated on
   ``shapes_minival``, never on the reported split; the best box AP there (mask AP breaks ties) is chosen.
   The heads keep the config's learning rate; only the tuned backbone's trainable parameters (side network
   or trunk) train at the swept rate (``e3va.engine.lr.BackboneLRFactor``);
2. one run per seed at the chosen rate, evaluated on ``shapes_val``. A sweep run also evaluates its final
   model on ``shapes_val`` (unread by the choice), so the first seed at the chosen rate reuses that training.

Writes ``DIR/transfer.json`` (every run and the per-method summary), ``DIR/transfer.md`` (mean ± std
over seeds, per-seed values, chosen rate, peak RSS, s/iter) and ``DIR/transfer.png`` (AP against peak
training memory, as the paper's Figure 1). Resumable: a finished run (its ``run.json`` and the demo's
summary, for the same parameters) is kept and skipped, so an interrupted study continues where it stopped.

    python tools/transfer_study.py --methods fixed,e3va,full --seeds 0,1,2 --lr-sweep 3e-4,1e-3,3e-3 \\
        --output docs/transfer_study
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from e3va import TUNING_METHODS
from e3va.atomic import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
HEAD_LR = 1e-3  # configs/Shapes/mask_rcnn_e3va.py's optimizer.lr: the heads' rate for every method
TEST_SPLIT, VALIDATION_SPLIT = "shapes_val", "shapes_minival"


def parse_list(text: str, kind, what: str) -> list:
    """``"a,b,c"`` as a list of ``kind``; a clear error for an empty list, a bad item or a repeat."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    try:
        values = [kind(t) for t in items]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be a comma-separated list of {kind.__name__}, got {text!r}")
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"{what} must be a non-empty list without repeats, got {text!r}")
    return values


def run_dir(out: Path, method: str, lr: float, seed: int, split: str) -> Path:
    stage = "sweep" if split == VALIDATION_SPLIT else "runs"
    return out / stage / method / f"lr{lr:g}" / f"seed{seed}"


def train_and_evaluate(
    out: Path, method: str, lr: float, seed: int, split: str, max_iter: Optional[int], opts: Sequence[str],
    only_finished: bool = False,
) -> Dict:
    """One training and evaluation in its own process (skipped when already done with the same
    parameters); returns the demo's summary with the run's parameters, or the failure. With
    ``only_finished``, a run not done yet is reported as missing instead of trained."""
    params = {"method": method, "backbone_lr": lr, "seed": seed, "split": split, "max_iter": max_iter,
              "opts": list(opts)}
    where = run_dir(out, method, lr, seed, split)
    summary_file, record_file = where / "demo_summary.json", where / "run.json"
    if record_file.is_file() and summary_file.is_file():
        record = json.loads(record_file.read_text())
        if record.get("params") == params:
            return record
    if only_finished:
        return {"params": params, "status": "missing"}
    iters = [] if max_iter is None else ["--max-iter", str(max_iter)]
    # The study owns its run directories: one without a finished record is a killed or failed run, retrained.
    overrides = [f"train.seed={seed}", f"optimizer.params.lr_factor_func.factor={lr / HEAD_LR!r}",
                 "train.allow_overwrite=True"]
    also = []
    if split != TEST_SPLIT:
        overrides += [f"dataloader.test.dataset.names={split}", f"dataloader.evaluator.dataset_name={split}"]
        # Read only for the run the sweep then picks (see reused_sweep_run): it saves that seed's retraining.
        also = ["--also-evaluate", TEST_SPLIT]
    cmd = [sys.executable, str(REPO / "tools" / "demo.py"), "--tuning", method, *iters, "--output-dir", str(where),
           "--num-images", "0", *also, *overrides, *opts]
    where.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    with open(where / "train.log", "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
    if code != 0 or not summary_file.is_file():
        return {"params": params, "status": f"failed (exit {code}, see {where / 'train.log'})"}
    record = {"params": params, "status": "ok", "load_before": load_before, "load_after": os.getloadavg(),
              **json.loads(summary_file.read_text())}
    atomic_write_json(record, record_file)
    return record


def reused_sweep_run(sweep: List[Dict], lr: float, seed: int) -> Optional[Dict]:
    """The test-split record of the sweep's own run at ``lr`` and ``seed``, when that run also evaluated the
    test split: the same training as a test run would repeat. The choice of ``lr`` never saw these values."""
    for record in sweep:
        params = record["params"]
        also = record.get("also_evaluated", {}).get(TEST_SPLIT)
        if record["status"] == "ok" and also and params["backbone_lr"] == lr and params["seed"] == seed:
            return {**record, **also, "params": {**params, "split": TEST_SPLIT}, "reused_from": VALIDATION_SPLIT}
    return None


def choose_lr(sweep: List[Dict]) -> Optional[float]:
    """The backbone learning rate of the sweep run with the best validation box AP (then mask AP)."""
    ok = [r for r in sweep if r["status"] == "ok" and r.get("bbox_AP") is not None]
    if not ok:
        return None
    best = max(ok, key=lambda r: (r["bbox_AP"], r.get("segm_AP") or 0.0))
    return best["params"]["backbone_lr"]


def mean_std(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """Mean and sample standard deviation (None with fewer than two values)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def summarise(method: str, lr: Optional[float], sweep: List[Dict], runs: List[Dict], lr_source: str = "") -> Dict:
    """Per-method record: chosen rate (and how it was set), the sweep's validation APs, and mean ± std over
    the seeds."""
    ok = [r for r in runs if r["status"] == "ok"]
    return {
        "method": method,
        "chosen_backbone_lr": lr,
        "lr_source": lr_source,
        "sweep": {f"{r['params']['backbone_lr']:g}": r.get("bbox_AP") for r in sweep if r["status"] == "ok"},
        "seeds": [r["params"]["seed"] for r in ok],
        "bbox_AP": mean_std([r.get("bbox_AP") for r in ok]),
        "segm_AP": mean_std([r.get("segm_AP") for r in ok]),
        "bbox_AP_per_seed": [r.get("bbox_AP") for r in ok],
        "segm_AP_per_seed": [r.get("segm_AP") for r in ok],
        "peak_rss_mb": mean_std([r.get("peak_rss_mb") for r in ok]),
        "s_per_iter": mean_std([r.get("mean_iter_time_s") for r in ok]),
        "backbone_trainable_params": ok[0]["backbone_trainable_params"] if ok else None,
        "failed": [r["status"] for r in runs + sweep if r["status"] not in ("ok", "missing")],
        "missing_seeds": [r["params"]["seed"] for r in runs if r["status"] == "missing"],
        "missing_sweep": [r["params"]["backbone_lr"] for r in sweep if r["status"] == "missing"],
    }


def _pm(stat: Dict, spec: str = ".1f") -> str:
    if stat["mean"] is None:
        return "n/a"
    return format(stat["mean"], spec) + ("" if stat["std"] is None else f" ± {stat['std']:{spec}}")


def markdown(summaries: List[Dict], command: str) -> str:
    """The table: mean ± sample std over seeds, per-seed values, chosen learning rate."""
    lines = [
        f"Command: `{command}`",
        "",
        "| method | backbone LR | box AP | mask AP | box AP per seed | backbone trainable "
        "| peak RSS (MB) | s / iter |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for s in summaries:
        per_seed = ", ".join("n/a" if v is None else f"{v:.1f}" for v in s["bbox_AP_per_seed"])
        params = "n/a" if s["backbone_trainable_params"] is None else f"{s['backbone_trainable_params']:,d}"
        lr = "n/a" if s["chosen_backbone_lr"] is None else f"{s['chosen_backbone_lr']:g} ({s['lr_source']})"
        if s["backbone_trainable_params"] == 0:
            lr = "— (nothing trains)"
        lines.append(f"| {s['method']} | {lr} | {_pm(s['bbox_AP'])} | {_pm(s['segm_AP'])} | {per_seed} | {params} "
                     f"| {_pm(s['peak_rss_mb'], '.0f')} | {_pm(s['s_per_iter'], '.2f')} |")
    failed = [f"{s['method']}: {f}" for s in summaries for f in s["failed"] if f != "missing"]
    if failed:
        lines += ["", "Failed runs: " + "; ".join(failed)]
    missing = [f"{s['method']} sweep at {lr:g}" for s in summaries for lr in s.get("missing_sweep", [])]
    missing += [f"{s['method']} seed {seed}" for s in summaries for seed in s["missing_seeds"]]
    if missing:
        lines += ["", "Not run yet (the table covers the seeds listed per method): " + ", ".join(missing)]
    sweeps = [s for s in summaries if s["sweep"]]
    if sweeps:
        lines += ["", "Validation (shapes_minival) box AP of the sweep:", ""]
        lines += [f"- {s['method']}: " + ", ".join(f"lr {k}: {v:.1f}" for k, v in s["sweep"].items()) for s in sweeps]
    return "\n".join(lines) + "\n"


def plot(summaries: List[Dict], path: Path) -> None:
    """Box AP (mean, ± std) against peak training memory, one labelled point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for s in summaries:
        if s["bbox_AP"]["mean"] is None or s["peak_rss_mb"]["mean"] is None:
            continue
        x, y = s["peak_rss_mb"]["mean"], s["bbox_AP"]["mean"]
        ax.errorbar(x, y, yerr=s["bbox_AP"]["std"] or 0.0, xerr=s["peak_rss_mb"]["std"] or 0.0, fmt="o", capsize=3)
        ax.annotate(s["method"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("peak training memory (process peak RSS, MB)")
    ax.set_ylabel("box AP on shapes_val (mean ± std over seeds)")
    ax.set_title("Shapes transfer: accuracy against training memory")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def study(methods: Sequence[str], seeds: Sequence[int], sweep_lrs: Sequence[float], max_iter: Optional[int],
          out: Path, opts: Sequence[str], command: str,
          method_lrs: Optional[Dict[str, Union[float, Sequence[float]]]] = None,
          only_finished: bool = False) -> List[Dict]:
    """Runs (or resumes) the study and rewrites its outputs after every method. ``method_lrs`` gives some
    methods their own rates instead of ``sweep_lrs``: one rate is given (no sweep), several are that
    method's own sweep (e.g. a lower range for full fine-tuning)."""
    summaries = []
    runs_all = []
    own_lrs = {m: [v] if isinstance(v, (int, float)) else list(v) for m, v in (method_lrs or {}).items()}
    empty = [m for m, rates in own_lrs.items() if not rates]
    if empty:
        raise ValueError(f"method_lrs gives {empty} no rate; give one rate, or several to sweep.")
    for method in methods:
        rates = own_lrs.get(method, sweep_lrs)
        # One value is nothing to choose from: it is the rate, with no validation run.
        candidates = rates if len(rates) > 1 else []
        sweep = [train_and_evaluate(out, method, lr, seeds[0], VALIDATION_SPLIT, max_iter, opts, only_finished)
                 for lr in candidates]
        if method in own_lrs and not candidates:
            lr, source = rates[0], "given"
        elif any(r["status"] != "ok" for r in sweep):
            # A sweep with a run missing or failed has chosen nothing: picking among the rest would be another sweep.
            lr, source = None, "sweep unfinished"
        elif candidates:
            lr, source = choose_lr(sweep), "chosen on shapes_minival"
        else:
            lr, source = (sweep_lrs[0], "given") if sweep_lrs else (HEAD_LR, "the heads' rate")
        runs = [] if lr is None else [
            reused_sweep_run(sweep, lr, s) or train_and_evaluate(out, method, lr, s, TEST_SPLIT, max_iter, opts,
                                                                 only_finished)
            for s in seeds]
        summary = summarise(method, lr, sweep, runs, source)
        summaries.append(summary)
        runs_all += sweep + runs
        print(f"{method:>14}: lr {lr}  box AP {_pm(summary['bbox_AP'])}  mask AP {_pm(summary['segm_AP'])}", flush=True)
        atomic_write_json({"command": command, "methods": summaries, "runs": runs_all}, out / "transfer.json")
        (out / "transfer.md").write_text(markdown(summaries, command))
        plot(summaries, out / "transfer.png")
    return summaries


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="fixed,e3va,full")
    parser.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--lr-sweep", default="", help="backbone learning rates to choose from on shapes_minival, "
                        "e.g. 3e-4,1e-3,3e-3; one value: that rate, no sweep; empty: the heads' rate (1e-3)")
    parser.add_argument("--backbone-lr", default="", help="METHOD=LR,...: these methods' backbone rate, no sweep "
                        "(e.g. full=1e-4); METHOD=LR:LR:...: that method's own sweep instead of --lr-sweep's "
                        "(e.g. full=1e-4:3e-4)")
    parser.add_argument("--only-finished", action="store_true",
                        help="train nothing: tabulate the finished runs and list the missing ones")
    parser.add_argument("--max-iter", type=int, default=None, help="default: the Shapes config's train.max_iter")
    parser.add_argument("--output", default=str(REPO / "output" / "transfer"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="LazyConfig overrides for every run")
    args = parser.parse_args(argv)
    try:
        methods = parse_list(args.methods, str, "--methods")
        seeds = parse_list(args.seeds, int, "--seeds")
        sweep = parse_list(args.lr_sweep, float, "--lr-sweep") if args.lr_sweep.strip() else []
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    unknown = [m for m in methods if m not in TUNING_METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid: {', '.join(sorted(TUNING_METHODS))}")
    if any(s < 0 for s in seeds):
        parser.error(f"--seeds must be non-negative integers, got {seeds}")
    if any(not lr > 0 for lr in sweep):
        parser.error(f"--lr-sweep values must be positive, got {sweep}")
    method_lrs: Dict[str, List[float]] = {}
    for item in parse_list(args.backbone_lr, str, "--backbone-lr") if args.backbone_lr.strip() else []:
        method, _, value = item.partition("=")
        if method not in methods:
            parser.error(f"--backbone-lr {item!r}: {method!r} is not one of --methods {methods}")
        if method in method_lrs:
            parser.error(f"--backbone-lr names {method!r} twice; give its rates once, e.g. {method}=1e-4:3e-4")
        try:
            method_lrs[method] = parse_list(value.replace(":", ","), float, f"--backbone-lr {method}'s rates")
        except argparse.ArgumentTypeError as e:
            parser.error(f"{e}; items are METHOD=LR or METHOD=LR:LR:... (its own sweep)")
        if not all(lr > 0 for lr in method_lrs[method]):
            parser.error(f"--backbone-lr {item!r}: rates must be positive")
    command = " ".join(shlex.quote(a) for a in ["python", "tools/transfer_study.py", *(argv or sys.argv[1:])])
    study(methods, seeds, sweep, args.max_iter, Path(args.output), args.opts, command, method_lrs,
          args.only_finished)
    print(f"wrote {Path(args.output) / 'transfer.md'}")


if __name__ == "__main__":
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # comparable peak RSS across methods
    main()
