#!/usr/bin/env python
"""How far a low-precision frozen trunk moves E3VA's outputs from the fp32 trunk's.

Builds two copies of the same E3VA Swin backbone (same weights, highway perturbed away from its zero
initialisation so the adapters contribute), one with ``trunk_dtype=float32`` and one with ``DTYPE``, runs
both on the same seeded images and prints, per output level, the max absolute difference and the std of
the fp32 output (the outputs are LayerNorm-scaled, so the std is about one).

    python tools/trunk_precision_drift.py --size T --input-size 512 --dtype bfloat16
"""
import argparse
import json
from typing import Dict

import torch

from e3va import E3VASwin
from e3va.backbone import TRUNK_DTYPES
from e3va.swin import SWIN_PRESETS


def measure_drift(size: str, input_size: int, dtype: str, batch_size: int = 1, seed: int = 0,
                  device: str = "cpu") -> Dict[str, Dict[str, float]]:
    """Per output level: ``max_abs_diff`` between the ``dtype`` and fp32 trunks, and ``fp32_std``."""
    torch.manual_seed(seed)
    reference = E3VASwin(size, tuning="e3va", drop_path_rate=0.0).eval()
    with torch.no_grad():
        for p in reference.highway.parameters():
            p.add_(0.02 * torch.randn_like(p))
    low = E3VASwin(size, tuning="e3va", drop_path_rate=0.0, trunk_dtype=dtype).eval()
    low.load_state_dict(reference.state_dict())
    reference, low = reference.to(device), low.to(device)
    images = torch.randn(batch_size, 3, input_size, input_size, generator=torch.Generator().manual_seed(seed))
    images = images.to(device)
    with torch.no_grad():
        a, b = reference(images), low(images)
    return {
        name: {"max_abs_diff": (a[name] - b[name]).abs().max().item(), "fp32_std": a[name].std().item()}
        for name in a
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="T", choices=sorted(SWIN_PRESETS))
    parser.add_argument("--input-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=[d for d in TRUNK_DTYPES if d != "float32"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    drift = measure_drift(args.size, args.input_size, args.dtype, args.batch_size, args.seed, args.device)
    for name, d in drift.items():
        print(f"{name}: max |{args.dtype} - fp32| = {d['max_abs_diff']:.4f}  (fp32 output std {d['fp32_std']:.3f})")
    print(json.dumps(drift))


if __name__ == "__main__":
    main()
