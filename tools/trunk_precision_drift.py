#!/usr/bin/env python
"""How far a low-precision or compiled frozen trunk moves E3VA's outputs from the eager fp32 trunk's.

Builds two copies of the same E3VA Swin backbone (same weights, highway perturbed away from its zero
initialisation so the adapters contribute): the reference (fp32, eager) and a variant with
``trunk_dtype=DTYPE`` and, with ``--compile BACKEND``, its trunk compiled (``compile_trunk``). Runs both on
the same seeded images and prints, per output level, the max absolute difference and the std of the
reference output (the outputs are LayerNorm-scaled, so the std is about one). ``--time N`` also times N
forward passes of each (no autograd, after one untimed pass, which for a compiled trunk compiles it).

    python tools/trunk_precision_drift.py --size T --input-size 512 --dtype bfloat16
    python tools/trunk_precision_drift.py --size T --input-size 512 --dtype float32 --compile inductor --time 3
"""
import argparse
import json
import statistics
import time
from typing import Any, Dict, List, Optional

import torch

from e3va import E3VASwin
from e3va.backbone import TRUNK_DTYPES
from e3va.swin import SWIN_PRESETS


def _timed_forwards(model: torch.nn.Module, images: torch.Tensor, n: int) -> List[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        with torch.no_grad():
            model(images)
        times.append(time.perf_counter() - start)
    return times


def measure_drift(size: str, input_size: int, dtype: str, batch_size: int = 1, seed: int = 0,
                  device: str = "cpu", compile_backend: Optional[str] = None, time_iters: int = 0) -> Dict[str, Any]:
    """Per output level: ``max_abs_diff`` between the variant and the reference, and ``fp32_std``; with
    ``time_iters``, also ``"timing"``: the first pass of each and ``time_iters`` timed passes, in seconds."""
    if dtype == "float32" and compile_backend is None:
        raise ValueError("dtype='float32' without a compile backend would compare the reference with itself; "
                         f"pass a dtype among {[d for d in TRUNK_DTYPES if d != 'float32']} or a compile backend.")
    torch.manual_seed(seed)
    reference = E3VASwin(size, tuning="e3va", drop_path_rate=0.0).eval()
    with torch.no_grad():
        for p in reference.highway.parameters():
            p.add_(0.02 * torch.randn_like(p))
    variant = E3VASwin(size, tuning="e3va", drop_path_rate=0.0, trunk_dtype=dtype,
                       compile_trunk=compile_backend or False).eval()
    variant.load_state_dict(reference.state_dict())
    reference, variant = reference.to(device), variant.to(device)
    images = torch.randn(batch_size, 3, input_size, input_size, generator=torch.Generator().manual_seed(seed))
    images = images.to(device)
    models = {"reference": reference, "variant": variant}
    outputs, first = {}, {}
    for name, model in models.items():
        start = time.perf_counter()
        with torch.no_grad():
            outputs[name] = model(images)
        first[name] = time.perf_counter() - start  # for a compiled trunk, the compilation
    a, b = outputs["reference"], outputs["variant"]
    drift: Dict[str, Any] = {
        name: {"max_abs_diff": (a[name] - b[name]).abs().max().item(), "fp32_std": a[name].std().item()}
        for name in a
    }
    if time_iters > 0:
        times = {name: _timed_forwards(model, images, time_iters) for name, model in models.items()}
        drift["timing"] = {"first_pass_s": first, "reference_s": times["reference"], "variant_s": times["variant"],
                           "reference_median_s": statistics.median(times["reference"]),
                           "variant_median_s": statistics.median(times["variant"])}
    return drift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="T", choices=sorted(SWIN_PRESETS))
    parser.add_argument("--input-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=list(TRUNK_DTYPES))
    parser.add_argument("--compile", default=None, metavar="BACKEND",
                        help="also compile the variant's trunk with this torch.compile backend, e.g. inductor")
    parser.add_argument("--time", type=int, default=0, metavar="N", help="time N forward passes of each model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        drift = measure_drift(args.size, args.input_size, args.dtype, args.batch_size, args.seed, args.device,
                              args.compile, args.time)
    except ValueError as e:
        parser.error(str(e))
    variant = args.dtype + (f", compiled ({args.compile})" if args.compile else "")
    for name, d in drift.items():
        if name != "timing":
            print(f"{name}: max |{variant} - fp32| = {d['max_abs_diff']:.4f}  (fp32 output std {d['fp32_std']:.3f})")
    if "timing" in drift:
        t = drift["timing"]
        print(f"forward, median of {args.time}: fp32 eager {t['reference_median_s']:.3f} s, {variant} "
              f"{t['variant_median_s']:.3f} s; first pass {t['first_pass_s']['variant']:.1f} s")
    print(json.dumps(drift))


if __name__ == "__main__":
    main()
