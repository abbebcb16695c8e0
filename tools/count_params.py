#!/usr/bin/env python
"""Trainable backbone parameters of every tuning method on a Swin size, as the paper's tables count them.

    python tools/count_params.py --size B [--methods e3va,e3va_plus,...]
"""
import argparse

from e3va import SWIN_PRESETS, TUNING_METHODS, E3VASwin
from e3va.engine.params import count_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="B", choices=sorted(SWIN_PRESETS))
    parser.add_argument("--methods", default=",".join(TUNING_METHODS))
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in TUNING_METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid: {', '.join(TUNING_METHODS)}")
    print(f"| Swin-{args.size} method | trainable backbone params | % of the trunk |")
    print("|---|---:|---:|")
    trunk_total = None
    for method in methods:
        backbone = E3VASwin(args.size, tuning=method)
        trainable, _ = count_parameters(backbone)
        if trunk_total is None:
            trunk_total = count_parameters(backbone.trunk)[1]
        print(f"| {method} | {trainable:,d} ({trainable / 1e6:.2f} M) | {100 * trainable / trunk_total:.2f} % |")


if __name__ == "__main__":
    main()
