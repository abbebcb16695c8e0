#!/usr/bin/env python
"""Accuracy of every tuning method side by side, on the embedded shapes task.

Each method trains ``configs/Shapes/mask_rcnn_e3va.py`` for the same number of iterations from the
project's own pretrained Swin "nano" (through ``tools/demo.py``, each in a fresh process), then is
evaluated with Detectron2's COCOEvaluator. Writes ``DIR/transfer.json`` and ``DIR/transfer.md``: COCO box
and mask AP with trainable backbone parameters, peak memory (process peak RSS) and mean iteration time.

    python tools/transfer_study.py --methods fixed,e3va,full --output output/transfer   # --max-iter N
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

from e3va import TUNING_METHODS

REPO = Path(__file__).resolve().parents[1]


def run_method(method: str, max_iter: Optional[int], out_dir: Path, opts: List[str]) -> Dict:
    """Trains and evaluates one method in its own process; returns its demo summary (or the failure)."""
    iters = [] if max_iter is None else ["--max-iter", str(max_iter)]
    cmd = [sys.executable, str(REPO / "tools" / "demo.py"), "--tuning", method, *iters,
           "--output-dir", str(out_dir), "--num-images", "0", *opts]
    log = out_dir.parent / f"{method}.log"
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    summary = out_dir / "demo_summary.json"
    if code != 0 or not summary.is_file():
        return {"tuning": method, "status": f"failed (exit {code}, see {log})"}
    return {**json.loads(summary.read_text()), "status": "ok"}


def _fmt(value, spec: str) -> str:
    """``value`` formatted, or "n/a" (e.g. no iteration time after too short a run)."""
    return "n/a" if value is None else format(value, spec)


def markdown(records: List[Dict], command: str) -> str:
    """The AP table, with the command that produced it."""
    lines = [
        f"Command: `{command}`",
        "",
        "| method | backbone trainable | box AP | mask AP | peak RSS (MB) | s / iter |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"| {r['tuning']} | {r['status']} | | | | |")
            continue
        lines.append(
            f"| {r['tuning']} | {r['backbone_trainable_params'] / 1e6:.3f} M | {_fmt(r['bbox_AP'], '.1f')} | "
            f"{_fmt(r['segm_AP'], '.1f')} | {_fmt(r.get('peak_rss_mb'), '.0f')} | "
            f"{_fmt(r['mean_iter_time_s'], '.3f')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(TUNING_METHODS))
    parser.add_argument("--max-iter", type=int, default=None, help="default: the Shapes config's train.max_iter")
    parser.add_argument("--output", default=str(REPO / "output" / "transfer"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="LazyConfig overrides for every run")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in TUNING_METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid: {', '.join(TUNING_METHODS)}")
    out = Path(args.output)
    records = []
    for method in methods:
        record = run_method(method, args.max_iter, out / method, args.opts)
        records.append(record)
        if record["status"] == "ok":
            print(f"{method:>14}: box AP {_fmt(record['bbox_AP'], '.1f')}  mask AP {_fmt(record['segm_AP'], '.1f')}  "
                  f"peak RSS {_fmt(record.get('peak_rss_mb'), '.0f')} MB  "
                  f"{_fmt(record['mean_iter_time_s'], '.3f')} s/iter", flush=True)
        else:
            print(f"{method:>14}: {record['status']}", flush=True)
        (out / "transfer.json").write_text(json.dumps(records, indent=2))
    command = " ".join(shlex.quote(a) for a in ["python", "tools/transfer_study.py", *sys.argv[1:]])
    (out / "transfer.md").write_text(markdown(records, command))
    print(f"wrote {out / 'transfer.md'}")


if __name__ == "__main__":
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # comparable peak RSS across methods
    main()
