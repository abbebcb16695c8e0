#!/usr/bin/env python
"""Converts Swin classification weights into a file Detectron2's DetectionCheckpointer loads as is.

    python tools/convert_pretrained.py SRC DST [--source auto|official|timm] [--size T|S|B|L|nano]
                                       [--window-size 7|12] [--prefix backbone.bottom_up.trunk.]

SRC is a local checkpoint (official Swin release or timm), an http(s) URL, or a timm model name such as
swin_base_patch4_window7_224.ms_in22k. DST gets {"model": {prefix + trunk key: tensor}, ...} holding
every key of the trunk: bias tables are interpolated to --window-size, index buffers come from the
trunk, and the output norms norm0..norm3 (which classification checkpoints lack) are set to LayerNorm's
initialisation, weight 1 and bias 0. Then, with the matching config
(model.backbone.bottom_up.size=SIZE, window_size=WINDOW):

    DetectionCheckpointer(model).load(DST)     # or train.init_checkpoint=DST
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from e3va.atomic import atomic_torch_save, refuse_overwriting_inputs
from e3va.swin_weights import (
    adapt_to_trunk,
    infer_swin_architecture,
    load_swin_pretrained,
    swin_preset_name,
)
from e3va.swin import SUPPORTED_WINDOW_SIZES, SWIN_PRESETS, build_swin_trunk

DEFAULT_PREFIX = "backbone.bottom_up.trunk."


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="checkpoint file, http(s) URL or timm model name")
    parser.add_argument("dst", help="where to write the Detectron2 checkpoint (.pth)")
    parser.add_argument("--source", default="auto", choices=("auto", "official", "timm"),
                        help="layout of SRC's keys (default: detected from them)")
    parser.add_argument("--size", choices=sorted(SWIN_PRESETS),
                        help="Swin size of the model (default: inferred from SRC's shapes)")
    parser.add_argument("--window-size", type=int, choices=SUPPORTED_WINDOW_SIZES,
                        help="window of the model (default: SRC's window)")
    parser.add_argument("--prefix", default=DEFAULT_PREFIX,
                        help=f"name of the trunk inside the detector (default: {DEFAULT_PREFIX})")
    return parser.parse_args(argv)


def _size(arg: Optional[str], arch: dict) -> str:
    if arg is not None:
        return arg  # a wrong size is reported by adapt_to_trunk, naming both architectures
    size = swin_preset_name(arch)
    if size is None:
        raise ValueError(
            f"SRC is a Swin with embed_dim={arch['embed_dim']}, depths={arch['depths']}, "
            f"num_heads={arch['num_heads']}, which is none of the sizes {sorted(SWIN_PRESETS)}."
        )
    return size


def _window(arg: Optional[int], arch: dict) -> int:
    if arg is not None:
        return arg
    window = arch["window_size"]  # a tuple when SRC's stages use different windows
    if window not in SUPPORTED_WINDOW_SIZES:
        raise ValueError(
            f"SRC uses window_size={window}; pass --window-size {' or '.join(map(str, SUPPORTED_WINDOW_SIZES))} "
            "to interpolate its relative-position-bias tables to a window the trunk supports."
        )
    return window


def convert(args: argparse.Namespace) -> None:
    """Reads, adapts and writes; raises ValueError on a source that does not fit."""
    refuse_overwriting_inputs(args.dst, src=args.src)
    state_dict = load_swin_pretrained(args.src, fmt=args.source)
    arch = infer_swin_architecture(state_dict)
    size, window = _size(args.size, arch), _window(args.window_size, arch)
    # drop_path_rate does not change any parameter; 0 keeps the throwaway trunk simple.
    trunk = build_swin_trunk(size, window_size=window, drop_path_rate=0.0)
    adapted, report = adapt_to_trunk(state_dict, trunk)
    atomic_torch_save(
        {
            "model": {args.prefix + key: value for key, value in adapted.items()},
            "__author__": "e3va convert_pretrained",
            "matching_heuristics": False,
        },
        args.dst,
    )
    print(f"{args.src}: Swin-{size}, window {arch['window_size']} -> trunk window {window}")
    for line in report.lines():
        print("  " + line)
    print(f"wrote {len(adapted)} tensors under '{args.prefix}' to {args.dst}")
    print(f"load with model.backbone.bottom_up.size={size} model.backbone.bottom_up.window_size={window}")


def main(argv: Optional[List[str]] = None) -> None:
    try:
        convert(parse_args(argv))
    except ValueError as err:  # bad input: say why, without a traceback
        raise SystemExit(f"error: {err}") from err


if __name__ == "__main__":
    main(sys.argv[1:])
