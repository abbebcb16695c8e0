#!/usr/bin/env python
"""Splits a trained detector into its small per-task part, or merges that part back into a full checkpoint.

Export (full checkpoint -> trainable-only)::

    python tools/export_trainable.py --config-file configs/COCO/cascade_mask_rcnn_swin_b_e3va.py \\
        --weights output/model_final.pth --output task_e3va.pth

The base the task file records (its fingerprint) is the frozen part of FULL.pth, i.e. the pretrained
trunk the run started from. Merge (base + trainable-only -> full, for deployment)::

    python tools/export_trainable.py --config-file CFG --weights swin_base_patch4_window7_224_22k.pth \\
        --merge task_e3va.pth --output model_full.pth

``KEY=VALUE`` overrides after the options apply to the config (e.g. the tuning method it was trained with).
"""
import argparse
import sys
from pathlib import Path

from detectron2.config import instantiate

from e3va import E3VACheckpointer, save_trainable
from e3va.atomic import atomic_torch_save, refuse_overwriting_inputs
from e3va.overrides import load_config
from e3va.trainable import config_record, full_checkpoint
from e3va.engine.params import format_trainable_parameters


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="the LazyConfig the weights were trained with")
    parser.add_argument("--weights", required=True,
                        help="export: the full trained checkpoint; merge: the base (pretrained) weights")
    parser.add_argument("--merge", default="", help="a trainable-only file to merge onto --weights")
    parser.add_argument("--output", required=True)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="LazyConfig overrides, KEY=VALUE")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        refuse_overwriting_inputs(args.output, weights=args.weights, merge=args.merge, config_file=args.config_file)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    cfg = load_config(args.config_file, args.opts)
    model = instantiate(cfg.model)
    checkpointer = E3VACheckpointer(model)
    checkpointer.load(args.weights)
    output = Path(args.output)
    if args.merge:
        checkpointer.load(args.merge)  # refuses a task file made on other base weights or another method
        atomic_torch_save(full_checkpoint(model, __author__="e3va export_trainable --merge"), output)
        print(f"Merged {args.merge} onto {args.weights}: wrote {output} ({output.stat().st_size / 2**20:.1f} MiB)")
    else:
        save_trainable(model, output, config=config_record(cfg))
        print(f"{format_trainable_parameters(model)}")
        print(f"Wrote the trainable part of {args.weights} to {output} ({output.stat().st_size / 2**20:.2f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
