#!/usr/bin/env python
"""Bytes that DDP all-reduces per training step, for every tuning method of a LazyConfig detector.

DDP sends one gradient per trainable parameter each step (``e3va.engine.distributed.allreduce_bytes_per_step``;
tests/test_distributed.py checks it against DDP's own bucket total), so the figure is the trainable bytes of
the whole detector: the tuned backbone (trunk part + side network) plus FPN and heads. Builds the models on
the CPU; nothing trains.

    python tools/ddp_allreduce_bytes.py --config-file configs/COCO/mask_rcnn_swin_b_e3va.py \\
        [--methods fixed,e3va,full] [--json OUT.json] [overrides ...]
"""
from __future__ import annotations

import argparse
import json
from typing import Dict, List

from detectron2.config import LazyConfig, instantiate

from e3va import TUNING_METHODS, backbone_config_key
from e3va.backbone import find_tuned_backbone
from e3va.overrides import apply_overrides
from e3va.engine.distributed import allreduce_bytes_per_step

_MB = 2.0**20


def method_bytes(cfg, method: str) -> Dict[str, float]:
    """``{"method", "total_bytes", "backbone_bytes", "rest_bytes"}`` of ``cfg.model`` tuned with ``method``."""
    node = cfg
    key = backbone_config_key(cfg)
    for part in key.split(".")[:-1]:
        node = node[part]
    node[key.split(".")[-1]].tuning = method
    model = instantiate(cfg.model)
    name, backbone = find_tuned_backbone(model)
    total = allreduce_bytes_per_step(model)
    in_backbone = allreduce_bytes_per_step(backbone)
    return {"method": method, "total_bytes": total, "backbone_bytes": in_backbone, "rest_bytes": total - in_backbone}


def table(rows: List[Dict[str, float]]) -> str:
    """A Markdown table of :func:`method_bytes` rows, in MiB, with each method's total against ``fixed``'s."""
    fixed = next((r["total_bytes"] for r in rows if r["method"] == "fixed"), None)
    lines = ["| method | all-reduced per step (MiB) | of which tuned backbone | FPN + heads | vs. fixed |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['total_bytes'] / fixed:.2f}x" if fixed else "-"
        lines.append(f"| {r['method']} | {r['total_bytes'] / _MB:.2f} | {r['backbone_bytes'] / _MB:.2f} | "
                     f"{r['rest_bytes'] / _MB:.2f} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--methods", default=",".join(TUNING_METHODS), help="comma-separated tuning methods")
    parser.add_argument("--json", default="", help="also write the rows to this file")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, key=value")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in TUNING_METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid: {', '.join(TUNING_METHODS)}")
    rows = []
    for method in methods:
        cfg = apply_overrides(LazyConfig.load(args.config_file), args.opts)
        rows.append(method_bytes(cfg, method))
        print(f"{method}: {rows[-1]['total_bytes']:,d} bytes", flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": args.config_file, "overrides": args.opts, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
