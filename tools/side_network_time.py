#!/usr/bin/env python
"""What a side network adds to the backbone's time in a training step, measured step against step.

``tools/benchmark_tuning.py`` times whole detector steps, one method per process, minutes apart; on a
host whose speed drifts by 10-20% within minutes that cannot resolve a 10% difference. This tool builds
the Swin backbone once per method in one process (same trunk weights), and times, for each iteration,
every method's backbone pass one right after the other, in an order rotated every iteration:

* forward with the trunk as the method runs it (no autograd for a frozen trunk);
* backward from a fixed random gradient on every output, as the FPN would send (nothing for ``fixed``,
  whose outputs need no gradient);
* an AdamW step over the backbone's trainable parameters.

It reports each method's median time and the median (and quartiles) of its difference from ``fixed`` in
the same iteration. The heads and FPN cost the same for every method that starts from the same weights,
so a detector's step-time ratio is ``1 + overhead / fixed_step_time`` (``fixed_step_time`` from
``tools/benchmark_tuning.py``).

    python tools/side_network_time.py --size T --input-size 512 --batch-size 2 --methods fixed,e3va,losa \\
        --iters 20 --warmup 2 --output docs/benchmarks/side_network_time
"""
import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from e3va import SWIN_PRESETS, E3VASwin, TUNING_METHODS
from e3va.atomic import atomic_write_json
from e3va.checkpoint_io import align_with_wrapped_layers

REFERENCE = "fixed"


def _quartiles(values: Sequence[float]) -> List[float]:
    if len(values) < 2:
        return [values[0]] * 3
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q2, q3]


def _backbone_step(model: E3VASwin, optimizer: Optional[torch.optim.Optimizer], images: torch.Tensor,
                   upstream: Dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    outputs = model(images)
    loss = sum((outputs[k] * upstream[k]).sum() for k in sorted(outputs))
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def measure_side_network_time(size: str, methods: Sequence[str], input_size: int = 512, batch_size: int = 2,
                              iters: int = 20, warmup: int = 2, seed: int = 0) -> Dict[str, Any]:
    """Per method: ``times_s`` (one per iteration), their median, and the per-iteration ``overhead_s``
    against ``fixed`` with its median and quartiles. See the module docstring."""
    unknown = [m for m in methods if m not in TUNING_METHODS]
    if unknown:
        raise ValueError(f"unknown tuning method(s) {unknown}; valid names: {', '.join(TUNING_METHODS)}")
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}.")
    methods = [REFERENCE] + [m for m in dict.fromkeys(methods) if m != REFERENCE]
    torch.manual_seed(seed)
    reference = E3VASwin(size, tuning=REFERENCE, drop_path_rate=0.0).train()
    models = {REFERENCE: reference}
    for method in methods[1:]:
        model = E3VASwin(size, tuning=method, drop_path_rate=0.0).train()
        # The trunk (and its norms) of `fixed`, also where a method wraps trunk layers (PEFT's LoRA).
        state = align_with_wrapped_layers(reference.state_dict(), model.state_dict().keys())
        unexpected = model.load_state_dict(state, strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"{method}: the fixed backbone's {unexpected[:5]} have no counterpart.")
        models[method] = model
    trainable = {m: [p for p in model.parameters() if p.requires_grad] for m, model in models.items()}
    optimizers = {m: torch.optim.AdamW(params, lr=1e-4) if params else None for m, params in trainable.items()}
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, input_size, input_size, generator=gen)
    with torch.no_grad():
        shapes = {k: v.shape for k, v in reference(images).items()}
    upstream = {k: torch.randn(shape, generator=gen) for k, shape in shapes.items()}

    times: Dict[str, List[float]] = {m: [] for m in methods}
    for i in range(warmup + iters):
        for method in methods[i % len(methods):] + methods[: i % len(methods)]:
            elapsed = _backbone_step(models[method], optimizers[method], images, upstream)
            if i >= warmup:
                times[method].append(elapsed)
    results: Dict[str, Any] = {}
    for method in methods:
        overhead = [t - f for t, f in zip(times[method], times[REFERENCE])]
        results[method] = {
            "trainable_params": sum(p.numel() for p in trainable[method]),
            "times_s": times[method],
            "median_s": statistics.median(times[method]),
            "overhead_s": overhead,
            "overhead_quartiles_s": _quartiles(overhead),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="T", choices=sorted(SWIN_PRESETS))
    parser.add_argument("--methods", default="fixed,e3va", help="comma-separated; fixed is always measured")
    parser.add_argument("--input-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="directory for swin_<size>_<input size>.json")
    args = parser.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    try:
        results = measure_side_network_time(args.size, methods, args.input_size, args.batch_size, args.iters,
                                            args.warmup, args.seed)
    except ValueError as e:
        parser.error(str(e))
    for method, r in results.items():
        q1, q2, q3 = r["overhead_quartiles_s"]
        print(f"{method:>14}: backbone step {r['median_s']:.3f} s (median of {len(r['times_s'])}); "
              f"minus fixed's in the same iteration: {q2:+.3f} s (quartiles {q1:+.3f}, {q3:+.3f})")
    if args.output:
        record = {"size": args.size, "input_size": args.input_size, "batch_size": args.batch_size,
                  "iters": args.iters, "warmup": args.warmup, "seed": args.seed,
                  "num_threads": torch.get_num_threads(), "torch_version": torch.__version__,
                  "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "results": results}
        atomic_write_json(record, Path(args.output) / f"swin_{args.size.lower()}_{args.input_size}.json")
    print(json.dumps({m: {"median_s": r["median_s"], "overhead_median_s": r["overhead_quartiles_s"][1]}
                      for m, r in results.items()}))


if __name__ == "__main__":
    main()
