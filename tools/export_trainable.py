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

Refused before anything is written: an ``--output`` equal to an input; an export whose ``--weights`` lacks
tensors the model trains (pretrained weights, nothing trained: the task file would hold random heads); a
trainable-only file given to export, or a merge whose ``--weights`` and ``--merge`` look swapped.
"""
import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List

from detectron2.config import instantiate

from e3va import CheckpointReadError, E3VACheckpointer, save_trainable
from e3va.atomic import atomic_torch_save, refuse_overwriting_inputs
from e3va.overrides import load_config
from e3va.trainable import (config_record, full_checkpoint, is_trainable_checkpoint, missing_trainable,
                            trainable_state_dict)
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


def _modules(names: List[str], shown: int = 8) -> str:
    """``names`` counted by module, e.g. ``backbone.bottom_up (104), roi_heads.box_head (4)``."""
    counts = Counter(".".join(n.split(".")[:2]) for n in names)
    listed = ", ".join(f"{module} ({n})" for module, n in counts.most_common(shown))
    return listed + (f" and {len(counts) - shown} more" if len(counts) > shown else "")


def check_inputs(checkpointer: E3VACheckpointer, model: Any, args: argparse.Namespace) -> None:
    """Raises ValueError, naming what is wrong, for inputs that would make a wrong file: swapped merge
    arguments, a trainable-only file to export, or export ``--weights`` without what the model trains."""
    weights: Dict[str, Any] = checkpointer.peek(args.weights)  # memory-mapped: nothing is loaded yet
    if args.merge:
        task = checkpointer.peek(args.merge)
        if is_trainable_checkpoint(weights) and not is_trainable_checkpoint(task):
            raise ValueError(
                f"--weights {args.weights} is a trainable-only task file and --merge {args.merge} is not: the "
                "arguments look swapped. --weights takes the base (pretrained) weights, --merge the task file."
            )
        if not is_trainable_checkpoint(task):
            raise ValueError(f"--merge {args.merge} is not a trainable-only task file (one this tool exports).")
        return
    if is_trainable_checkpoint(weights):
        raise ValueError(
            f"--weights {args.weights} is already a trainable-only task file. Export takes the full checkpoint "
            "a training run wrote (e.g. model_final.pth); to make a full one from it, add --merge with the base."
        )
    missing = missing_trainable(model, weights.get("model", weights))
    if missing:
        trained = len(missing) < len(trainable_state_dict(model))  # some of it: another config or method
        raise ValueError(
            f"--weights {args.weights} lacks {len(missing)} of the tensors this model trains: "
            f"{_modules(missing)}; e.g. {missing[:2]}. "
            + ("Was it trained with another config or tuning method (overrides after the options)? "
               if trained else "It holds no trained detector (pretrained weights?): the task file would hold "
               "random heads. ")
            + "Export the checkpoint a training run of this config wrote (train.output_dir/model_final.pth)."
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        refuse_overwriting_inputs(args.output, weights=args.weights, merge=args.merge, config_file=args.config_file)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    cfg = load_config(args.config_file, args.opts)
    model = instantiate(cfg.model)
    checkpointer = E3VACheckpointer(model)
    try:
        check_inputs(checkpointer, model, args)
    except (ValueError, OSError, CheckpointReadError) as err:
        raise SystemExit(f"error: {err}") from err
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
