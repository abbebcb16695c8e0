#!/usr/bin/env python
"""What storing the side network's inputs compactly (``saved_input_dtype``) saves, and what it costs.

Builds the same tuned Swin backbone once per storage dtype (same weights; the side network perturbed
away from its zero initialisation so that every gradient path carries signal), runs one forward and
backward on the same seeded images, and reports, per dtype:

* ``saved_mb``: what autograd keeps for backward during the forward pass (the backbone's activation
  memory in a training step; the trunk itself keeps nothing);
* the drift of the trainable parameters' gradients from exact (float32) storage: the relative L2 error
  of all of them together, their cosine, and the worst relative L2 error of a single tensor.

Outputs are identical whatever the dtype (the forward pass uses the exact input), so only gradients are
compared.

    python tools/saved_input_drift.py --size B --input-size 512 --tuning e3va --output docs/benchmarks/saved_input_drift
"""
import argparse
import json
from pathlib import Path
from typing import Dict, Sequence

import torch

from e3va import SWIN_PRESETS, E3VASwin
from e3va.atomic import atomic_write_json
from e3va.engine.memory import bytes_saved_for_backward
from e3va.side_memory import SAVED_INPUT_DTYPES

_MB = 1024 * 1024


def _gradients(model: torch.nn.Module, images: torch.Tensor, seed: int) -> Dict[str, torch.Tensor]:
    """Gradients of a fixed random linear functional of every output (the same for every model)."""
    outputs = model(images)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((out * torch.randn(out.shape, generator=gen)).sum() for _, out in sorted(outputs.items()))
    loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def measure(size: str, input_size: int, tuning: str, dtypes: Sequence[str], batch_size: int = 2,
            seed: int = 0) -> Dict[str, Dict[str, float]]:
    """Per dtype: ``saved_mb`` and the gradient drift from float32 storage (see the module docstring)."""
    torch.manual_seed(seed)
    reference = E3VASwin(size, tuning=tuning, drop_path_rate=0.0, saved_input_dtype="float32").train()
    side = reference.side_network
    if side is None:
        raise ValueError(f"tuning={tuning!r} has no side network; use e3va, e3va_plus, e3va_plusplus or losa.")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in side.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    images = torch.randn(batch_size, 3, input_size, input_size, generator=torch.Generator().manual_seed(seed))
    state = reference.state_dict()
    results: Dict[str, Dict[str, float]] = {}
    exact = None
    for dtype in ["float32", *[d for d in dtypes if d != "float32"]]:
        model = reference if dtype == "float32" else E3VASwin(
            size, tuning=tuning, drop_path_rate=0.0, saved_input_dtype=dtype).train()
        model.load_state_dict(state)
        saved = bytes_saved_for_backward(model, images)
        grads = _gradients(model, images, seed)
        if exact is None:
            exact = grads
        flat_exact = torch.cat([g.flatten() for g in exact.values()]).double()
        flat = torch.cat([grads[n].flatten() for n in exact]).double()
        results[dtype] = {
            "saved_mb": saved / _MB,
            "grad_rel_l2": ((flat - flat_exact).norm() / flat_exact.norm()).item(),
            "grad_cosine": torch.nn.functional.cosine_similarity(flat, flat_exact, dim=0).item(),
            "worst_tensor_rel_l2": max(
                ((grads[n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in exact.items()
            ),
        }
        del model
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="T", choices=sorted(SWIN_PRESETS))
    parser.add_argument("--input-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--tuning", default="e3va")
    parser.add_argument("--dtypes", default=",".join(SAVED_INPUT_DTYPES),
                        help=f"comma-separated, among {', '.join(SAVED_INPUT_DTYPES)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="directory for <size>_<tuning>_<input size>.json")
    args = parser.parse_args()
    dtypes = [d for d in args.dtypes.split(",") if d]
    unknown = [d for d in dtypes if d not in SAVED_INPUT_DTYPES]
    if unknown:
        parser.error(f"unknown dtype(s) {unknown}; valid: {', '.join(SAVED_INPUT_DTYPES)}")
    results = measure(args.size, args.input_size, args.tuning, dtypes, args.batch_size, args.seed)
    for dtype, r in results.items():
        print(f"{dtype:>14}: saved for backward {r['saved_mb']:.1f} MB  gradient rel. L2 error "
              f"{r['grad_rel_l2']:.4f} (cosine {r['grad_cosine']:.5f}, worst tensor {r['worst_tensor_rel_l2']:.4f})")
    if args.output:
        record = {"size": args.size, "input_size": args.input_size, "batch_size": args.batch_size,
                  "tuning": args.tuning, "seed": args.seed, "results": results}
        atomic_write_json(record, Path(args.output) / f"{args.size.lower()}_{args.tuning}_{args.input_size}.json")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
