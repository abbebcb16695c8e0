#!/usr/bin/env python
"""File size of a config's full checkpoint against its trainable-only one (what a task costs to store).

Sizes do not depend on the weights' values, so the model is built with its initial weights and both files
are written to a temporary directory::

    python tools/checkpoint_sizes.py --config-file configs/COCO/cascade_mask_rcnn_swin_b_e3va.py \\
        --tuning e3va,e3va_plus,e3va_plusplus,full

The last line is JSON: one record per tuning method.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from detectron2.config import LazyConfig, instantiate

from e3va import backbone_config_key, find_tuned_backbone, save_trainable
from e3va.overrides import apply_overrides
from e3va.trainable import config_record, trainable_state_dict
from e3va.engine.params import count_parameters


def measure(config_file: str, tuning: str, opts=()) -> dict:
    """Bytes of ``{"model": state_dict}`` and of the trainable-only file, for one tuning method."""
    cfg = apply_overrides(LazyConfig.load(config_file), list(opts))
    cfg = LazyConfig.apply_overrides(cfg, [f"{backbone_config_key(cfg)}.tuning={tuning}"])
    model = instantiate(cfg.model)
    trainable, total = count_parameters(model)
    with tempfile.TemporaryDirectory() as tmp:
        full, task = Path(tmp) / "full.pth", Path(tmp) / "task.pth"
        torch.save({"model": model.state_dict()}, full)
        save_trainable(model, task, config=config_record(cfg))
        bottom_up = find_tuned_backbone(model)[0] + "."
        return {"config": config_file, "tuning": tuning, "trainable_params": trainable, "total_params": total,
                "full_bytes": full.stat().st_size, "trainable_only_bytes": task.stat().st_size,
                # tensor bytes of the backbone (trunk + side network + output norms), without the FPN and heads
                "backbone_full_bytes": _tensor_bytes(model.state_dict(), bottom_up),
                "backbone_trainable_bytes": _tensor_bytes(trainable_state_dict(model), bottom_up)}


def _tensor_bytes(state, prefix: str) -> int:
    return sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith(prefix))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--tuning", default="e3va", help="comma-separated tuning methods")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="LazyConfig overrides, KEY=VALUE")
    args = parser.parse_args(argv)
    records = []
    for tuning in [t for t in args.tuning.split(",") if t]:
        r = measure(args.config_file, tuning, args.opts)
        records.append(r)
        print(f"{tuning:14s} full {r['full_bytes'] / 2**20:8.1f} MiB   trainable-only "
              f"{r['trainable_only_bytes'] / 2**20:7.2f} MiB   ({100 * r['trainable_only_bytes'] / r['full_bytes']:.1f}%); "
              f"backbone alone {r['backbone_full_bytes'] / 2**20:.1f} MiB -> {r['backbone_trainable_bytes'] / 2**20:.2f} MiB "
              f"({100 * r['backbone_trainable_bytes'] / r['backbone_full_bytes']:.1f}%)", flush=True)
    print(json.dumps(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
