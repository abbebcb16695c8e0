#!/usr/bin/env python
"""Trainable backbone parameters of every tuning method on a Swin or ViT size, as the paper's tables count them.

    python tools/count_params.py --size B [--trunk swin|vit] [--methods e3va,e3va_plus,...]
"""
import argparse

from e3va import SWIN_PRESETS, TUNING_METHODS, VIT_PRESETS, E3VASwin, E3VAViT
from e3va.engine.params import count_parameters

TRUNKS = {"swin": (E3VASwin, SWIN_PRESETS, "Swin"), "vit": (E3VAViT, VIT_PRESETS, "ViT")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trunk", default="swin", choices=sorted(TRUNKS))
    parser.add_argument("--size", default="B", help="a preset of the trunk (Swin: T S B L nano; ViT: B L H nano)")
    parser.add_argument("--methods", default=",".join(TUNING_METHODS))
    args = parser.parse_args()
    backbone_cls, presets, label = TRUNKS[args.trunk]
    if args.size not in presets:
        parser.error(f"unknown {label} size {args.size!r}; valid: {', '.join(presets)}")
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in TUNING_METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid: {', '.join(TUNING_METHODS)}")
    print(f"| {label}-{args.size} method | trainable backbone params | % of the trunk |")
    print("|---|---:|---:|")
    trunk_total = None
    for method in methods:
        backbone = backbone_cls(args.size, tuning=method)
        trainable, _ = count_parameters(backbone)
        if trunk_total is None:
            trunk_total = count_parameters(backbone.trunk)[1]
        print(f"| {method} | {trainable:,d} ({trainable / 1e6:.2f} M) | {100 * trainable / trunk_total:.2f} % |")


if __name__ == "__main__":
    main()
