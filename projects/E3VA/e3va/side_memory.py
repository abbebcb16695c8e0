"""How side networks keep a frozen trunk's activations for backward, whatever the method.

A side network reads activations of a trunk that runs without autograd; to train, it must keep what its
backward needs. :class:`CompactInput` stores such an activation compactly (``saved_input_dtype``: fp32,
bf16, or fp8 scaled per token) and :class:`RecomputedFromCompactInput` runs a cheap layer keeping only that
compact copy, recomputing the rest in backward. E3VA's adapters, LoSA's mixers, the frozen patch merging a
side network crosses and the norms before the FPN all use them.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

__all__ = ["SAVED_INPUT_DTYPES", "CompactInput", "Packed", "RecomputedFromCompactInput"]

SAVED_INPUT_DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
}

# What CompactInput.pack returns: the stored tensor and, for fp8, its per-token scale.
Packed = Tuple[torch.Tensor, Optional[torch.Tensor]]


class CompactInput:
    """How the side networks' autograd functions keep a frozen activation for backward (``saved_input_dtype``).

    "float32" keeps it exactly, "bfloat16" halves it. "float8_e4m3fn" quarters it: each token (row of
    the last dimension) is divided by its own scale, ``max|x| / 448``, so that it fills fp8's range
    (e4m3 has no infinity, and 3 mantissa bits: about 3% relative rounding), and the scale is kept in
    fp32 beside it. Only gradients see the rounding; forward outputs are computed from the exact input.
    """

    def __init__(self, name: str) -> None:
        if name not in SAVED_INPUT_DTYPES:
            raise ValueError(f"Unknown saved_input_dtype {name!r}; expected one of {sorted(SAVED_INPUT_DTYPES)}.")
        self.name = name
        self.dtype = SAVED_INPUT_DTYPES[name]
        self.scaled = self.dtype.itemsize == 1

    def pack(self, x: torch.Tensor) -> Packed:
        """``(stored, scale)``, to pass to ``ctx.save_for_backward``; ``scale`` is None unless scaled."""
        x = x.detach()  # a copy for backward: no graph of its own (it would hold on to ``x``)
        if not self.scaled:
            return x.to(self.dtype), None
        amax = torch.linalg.vector_norm(x, ord=math.inf, dim=-1, keepdim=True, dtype=torch.float32)
        scale = (amax / torch.finfo(self.dtype).max).clamp_min(torch.finfo(torch.float32).tiny)
        return (x / scale).to(self.dtype), scale

    @staticmethod
    def unpack(stored: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The activation back in ``dtype`` (the one it was computed in)."""
        x = stored.to(dtype)
        return x if scale is None else x * scale.to(dtype)

    def __repr__(self) -> str:
        return f"CompactInput({self.name!r})"



class RecomputedFromCompactInput(torch.autograd.Function):
    """``fn(z)``, keeping only ``packed`` (``z`` as :meth:`CompactInput.pack` stored it) for backward and
    running ``fn`` again there.

    For cheap layers beside a frozen trunk, whose plain graph would keep several fp32 intermediates: LoSA's
    mixers (their input, transposed copies and hidden activations), and the layers that read a stage's
    adapted output (the frozen patch merging the side network crosses, the trainable norms before the FPN),
    which can share one ``packed``. ``params`` are ``fn``'s trainable parameters, passed so that autograd
    returns their gradients (none for a frozen layer).
    """

    @staticmethod
    def forward(ctx, fn, packed, z, *params):
        ctx.fn, ctx.params, ctx.compute_dtype = fn, params, z.dtype
        ctx.save_for_backward(*packed)
        with torch.no_grad():
            return fn(z)

    @staticmethod
    def backward(ctx, grad_out):
        stored, scale = ctx.saved_tensors
        needs = ctx.needs_input_grad[2:]
        with torch.enable_grad(), torch.autocast(grad_out.device.type, enabled=False):
            z = CompactInput.unpack(stored, scale, ctx.compute_dtype).detach().requires_grad_(needs[0])
            out = ctx.fn(z)
        inputs = [t for t, need in zip((z, *ctx.params), needs) if need]
        grads = iter(torch.autograd.grad(out, inputs, grad_out, allow_unused=True))
        return (None, None, *[next(grads) if need else None for need in needs])
