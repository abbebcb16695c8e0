"""The E3VA adapter: a bottleneck whose down and up projections are dual low-rank branches."""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "SAVED_INPUT_DTYPES",
    "CompactInput",
    "DualLowRankLinear",
    "HighwayAdapter",
    "Packed",
    "RecomputedFromCompactInput",
]

SAVED_INPUT_DTYPES: Dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
}

ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "identity": nn.Identity,
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


NUM_BRANCHES = 2  # "dual" low-rank branches: W = U1 V1 + U2 V2


class DualLowRankLinear(nn.Module):
    """A linear layer whose weight is the sum of two rank-``rank`` products, ``W = U1 V1 + U2 V2``.

    The two branches are stored stacked (``u``: 2 x out x r, ``v``: 2 x r x in). ``W`` is formed once
    per forward (it is only ``out x in``) so autograd keeps the layer input and ``W``, as a plain
    ``nn.Linear`` would, rather than an extra rank-sized activation per branch.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        *,
        bias: bool = True,
        zero_init: bool = False,
        train_v: bool = True,
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank!r}.")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.u = nn.Parameter(torch.empty(NUM_BRANCHES, out_features, rank))
        v = torch.empty(NUM_BRANCHES, rank, in_features)
        if train_v:
            self.v = nn.Parameter(v)
        else:  # a fixed random basis: a buffer, so that it is saved with the parameters that depend on it
            self.register_buffer("v", v)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.reset_parameters(zero_init=zero_init)

    def reset_parameters(self, zero_init: bool = False) -> None:
        """Initialises so that ``W`` has the variance of a default ``nn.Linear`` (or is exactly zero).

        Zero-initialising ``u`` (not ``v``) keeps the gradient of ``u`` non-zero at the first step.
        """
        nn.init.normal_(self.v, std=1.0 / math.sqrt(self.in_features))
        if zero_init:
            nn.init.zeros_(self.u)
        else:
            nn.init.normal_(self.u, std=1.0 / math.sqrt(NUM_BRANCHES * self.rank))
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def weight(self) -> torch.Tensor:
        """The dense ``out x in`` weight ``U1 V1 + U2 V2``."""
        return torch.einsum("bor,bri->oi", self.u, self.v)

    def factors(self) -> tuple:
        """``(U, V)`` with ``W = U @ V``: the branches side by side, ``U = [U1 U2]``, ``V = [V1; V2]``."""
        return self.u.permute(1, 0, 2).reshape(self.out_features, -1), self.v.reshape(-1, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, branches={NUM_BRANCHES}"


class _LowRankAdapterFunction(torch.autograd.Function):
    """``up(act(down(x)))`` through the low-rank factors, keeping only ``x`` (compactly) for backward.

    A plain autograd graph keeps, per adapter, the fp32 input, the bottleneck pre-activation and the
    activation: about twice the input's size. Here ``x`` alone is saved, as ``compact`` says, and the
    cheap rank-``2r`` products are recomputed in backward. ``x`` is a frozen-trunk activation: it needs
    no gradient, so none is returned for it. When ``v_down`` needs no gradient either, only its
    projection ``t = x V_down^T`` (rank ``2r`` instead of the input's width) is kept.
    """

    @staticmethod
    def forward(ctx, x, v_down, u_down, b_down, v_up, u_up, b_up, act, compact):
        # F.linear adds the bias within the product (addmm), without a separate pass and buffer.
        t = F.linear(x, v_down)
        z = F.linear(t, u_down, b_down)
        out = F.linear(F.linear(act(z), v_up), u_up, b_up)
        ctx.act = act
        ctx.compute_dtype = x.dtype
        ctx.kept_input = ctx.needs_input_grad[1]  # V_down's gradient needs x itself
        kept = x if ctx.kept_input else t
        ctx.save_for_backward(*compact.pack(kept), v_down, u_down, b_down, v_up, u_up)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        stored, scale, v_down, u_down, b_down, v_up, u_up = ctx.saved_tensors
        kept = CompactInput.unpack(stored, scale, ctx.compute_dtype).flatten(0, -2)
        g = grad_out.flatten(0, -2)
        x, t = (kept, kept @ v_down.t()) if ctx.kept_input else (None, kept)  # t: N x 2r
        with torch.enable_grad():
            z = torch.addmm(b_down, t, u_down.t()).detach().requires_grad_()  # a graph from z to act(z) only
            a = ctx.act(z)
        s = a.detach() @ v_up.t()  # N x 2r
        g_s = g @ u_up  # N x 2r
        g_a = g_s @ v_up  # N x k
        (g_z,) = torch.autograd.grad(a, z, g_a)
        g_t = g_z @ u_down if ctx.kept_input else None  # N x 2r
        return (
            None,
            g_t.t() @ x if ctx.kept_input else None,  # v_down
            g_z.t() @ t,  # u_down
            g_z.sum(0),  # b_down
            g_s.t() @ a.detach(),  # v_up
            g.t() @ s,  # u_up
            g.sum(0),  # b_up
            None,
            None,
        )


class HighwayAdapter(nn.Module):
    """``up(act(down(x)))`` with dual low-rank projections; its output starts at exactly zero.

    No skip connection inside: the adapter sits beside a trunk sub-layer, and the highway's running
    sum plays the role of the skip connection. Reading a frozen activation (no gradient wanted for
    ``x``) in training, it runs through :class:`_LowRankAdapterFunction`, which saves only ``x``, as
    ``saved_input_dtype`` says (:class:`CompactInput`); ``fused=False`` gives the plain graph.
    ``train_down_input_factors=False`` freezes the down projection's ``V1, V2`` at their random
    initialisation (a buffer); the function then keeps the rank-``2r`` ``x V^T`` instead of ``x``.
    """

    def __init__(
        self,
        dim: int,
        bottleneck: int,
        rank: int,
        activation: str = "gelu",
        *,
        fused: bool = True,
        saved_input_dtype: str = "bfloat16",
        train_down_input_factors: bool = True,
    ) -> None:
        super().__init__()
        self.fused = fused
        self.compact = CompactInput(saved_input_dtype)
        if bottleneck <= 0:
            raise ValueError(f"bottleneck width must be positive, got {bottleneck!r} for dim={dim}.")
        if activation not in ACTIVATIONS:
            raise ValueError(f"Unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}.")
        self.down = DualLowRankLinear(dim, bottleneck, rank, train_v=train_down_input_factors)
        self.act = ACTIVATIONS[activation]()
        self.up = DualLowRankLinear(bottleneck, dim, rank, zero_init=True)

    def uses_fused_path(self, x: torch.Tensor) -> bool:
        """True iff ``x`` goes through :class:`_LowRankAdapterFunction`: only to save memory for a backward
        in training. Inference (eval mode, or autograd off) takes plain tensor ops, which trace and export;
        eval mode is the signal that counts inside the backbone, whose hooks turn autograd on."""
        return self.fused and self.training and torch.is_grad_enabled() and not x.requires_grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_fused_path(x):
            return self.up(self.act(self.down(x)))
        u_down, v_down = self.down.factors()
        u_up, v_up = self.up.factors()
        return _LowRankAdapterFunction.apply(
            x, v_down, u_down, self.down.bias, v_up, u_up, self.up.bias, self.act, self.compact
        )


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
