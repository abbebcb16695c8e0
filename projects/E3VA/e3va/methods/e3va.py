"""E3VA (Yin et al.): two parallel adapters per trunk block, summed along a highway beside the frozen trunk.

For block ``j`` of a stage, the trunk computes (unchanged, without autograd)

    h_j = x_{j-1} + F1(x_{j-1})      F1 = W/SW-MSA(LN(.))      x_j = h_j + F2(h_j)      F2 = MLP(LN(.))

and the highway adds, with autograd (the paper's Eq. 10-11, ``adapter_input="sublayer_output"``),

    d_j = d_{j-1} + A_j(F1(x_{j-1})) + M_j(F2(h_j))

where ``A_j`` and ``M_j`` are the adapters beside attention and beside the MLP (``"sublayer_input"``:
``A_j(x_{j-1}) + M_j(h_j)``). Each adapter is ``up(act(down(x)))`` whose projections are dual low-rank
branches, ``W = U1 V1 + U2 V2`` (:class:`DualLowRankLinear`); ``up`` starts at zero, so the highway starts
at zero. The backbone adds the stage's side state to the stage output and carries it across the trunk's
patch merging (``e3va.backbone``, ``e3va.swin``). See projects/E3VA/README.md.

This module is the whole method: its spec (:class:`AdapterSpec`), its layers, the fused adapter function
that keeps only the adapter's input for backward, the highway and the hooks that feed it, and the
registration of ``e3va``, ``e3va_plus``, ``e3va_plusplus`` and ``e3va_fa``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..side_memory import CompactInput
from .base import (
    ACTIVATIONS,
    SideNetwork,
    SideTaps,
    TrunkLayout,
    TuningMethod,
    TuningOptions,
    check_choice,
    register_tuning_method,
)

__all__ = [
    "ADAPTER_ARRANGEMENTS",
    "ADAPTER_INPUTS",
    "AdapterHighway",
    "AdapterSpec",
    "DualLowRankLinear",
    "HighwayAdapter",
    "HighwayTaps",
    "attach_highway",
]

# What each highway adapter reads from its trunk block (projects/E3VA/README.md, "Taps"):
# "sublayer_output": the paper's (Eq. 10-11), the attention's and the MLP's outputs, exactly what the block
#   adds to its residual stream (after stochastic depth, when the trunk has it);
# "sublayer_input": the block's input beside attention, the post-attention residual beside the MLP (what
#   files trained before the paper's taps were made with).
ADAPTER_INPUTS = ("sublayer_output", "sublayer_input")
# "parallel" (the paper's): both adapters read the trunk. "stacked" (the paper's ablation): the adapter
# beside the MLP reads its tap plus what the adapter beside attention added in the same block.
ADAPTER_ARRANGEMENTS = ("parallel", "stacked")


@dataclass(frozen=True)
class AdapterSpec:
    """Shape of every highway adapter: bottleneck width = ``bottleneck_ratio`` x the stage's width.

    ``train_down_input_factors=False`` keeps the down projection's input-side factors ``V1, V2`` at
    their random initialisation (as LoRA-FA freezes LoRA's ``A``): the adapter then needs only the
    rank-``2r`` projection of its input for backward, not the input itself. ``adapter_input`` and
    ``arrangement`` say what the adapters read (``ADAPTER_INPUTS``, ``ADAPTER_ARRANGEMENTS``).
    """

    rank: int
    bottleneck_ratio: float = 0.5
    activation: str = "gelu"
    train_down_input_factors: bool = True
    adapter_input: str = "sublayer_output"
    arrangement: str = "parallel"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"Adapter rank must be a positive integer, got {self.rank!r}.")
        if not self.bottleneck_ratio > 0:
            raise ValueError(f"bottleneck_ratio must be > 0, got {self.bottleneck_ratio!r}.")
        check_choice("adapter_input", self.adapter_input, ADAPTER_INPUTS)
        check_choice("adapter arrangement", self.arrangement, ADAPTER_ARRANGEMENTS)


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
        """Initialises so that every entry of ``W`` has variance ``1 / in_features`` (LeCun's fan-in scaling;
        a default ``nn.Linear`` draws a third of that), or so that ``W`` is exactly zero.

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
        check_choice("activation", activation, sorted(ACTIVATIONS))
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


class AdapterHighway(nn.Module):
    """The trainable E3VA highway: two parallel adapters per trunk block, grouped by stage."""

    def __init__(
        self,
        stage_dims: Sequence[int],
        depths: Sequence[int],
        spec: AdapterSpec,
        *,
        fused: bool = True,
        saved_input_dtype: str = "bfloat16",
    ) -> None:
        super().__init__()
        self.spec = spec
        self.beside_attn = nn.ModuleList()
        self.beside_mlp = nn.ModuleList()
        for dim, depth in zip(stage_dims, depths):
            bottleneck = max(1, int(round(dim * spec.bottleneck_ratio)))
            make = lambda: HighwayAdapter(  # noqa: E731
                dim, bottleneck, spec.rank, spec.activation, fused=fused, saved_input_dtype=saved_input_dtype,
                train_down_input_factors=spec.train_down_input_factors,
            )
            self.beside_attn.append(nn.ModuleList([make() for _ in range(depth)]))
            self.beside_mlp.append(nn.ModuleList([make() for _ in range(depth)]))


class HighwayTaps(SideTaps):
    """Feeds the trunk's activations to the highway's adapters while the trunk runs.

    With ``adapter_input="sublayer_output"`` (the paper's), the adapter beside attention reads the
    attention's output ``F1(x_{j-1})`` and the one beside the MLP the MLP's output ``F2(h_j)``, in token
    layout: the two values the block adds to its residual stream. Both pass through the block's
    ``drop_path`` module (identity without stochastic depth), in that order, so a forward hook on it
    reads them exactly as the block adds them, whatever the attention's windowing and padding. With
    ``"sublayer_input"``, pre-hooks on the block and on its ``norm2`` read ``x_{j-1}`` and ``h_j``.
    The trunk's code and parameters stay exactly as released. Each adapter runs at once (with autograd
    on, inside the trunk's no-grad pass), so the activation can be freed as the trunk moves on and only
    what the adapter saves for backward stays alive. Parallel adapters (the paper's) are summed, and the
    state entering the stage is added at the end, ``d_end = d_start + sum``; stacked ones feed the adapter
    beside the MLP its tap plus the output of the adapter beside attention of the same block.
    """

    def __init__(self, blocks_by_stage: Sequence[Sequence[nn.Module]], highway: AdapterHighway) -> None:
        super().__init__()
        self.total: Optional[torch.Tensor] = None
        self._total_is_ours = False  # True once `total` is a buffer of this class's own, safe to add to in place
        self.carried: Optional[torch.Tensor] = None
        self.stacked = highway.spec.arrangement == "stacked"
        self._attn_out: Optional[torch.Tensor] = None  # stacked only: the block's attention-side adapter output
        for blocks, attn_adapters, mlp_adapters in zip(blocks_by_stage, highway.beside_attn, highway.beside_mlp):
            for block, beside_attn, beside_mlp in zip(blocks, attn_adapters, mlp_adapters):
                if highway.spec.adapter_input == "sublayer_input":
                    block.register_forward_pre_hook(self._feed_input(beside_attn, first=True))
                    block.norm2.register_forward_pre_hook(self._feed_input(beside_mlp, first=False))
                else:
                    calls = [0]  # how many sub-layer outputs of this block have passed, this forward
                    block.register_forward_pre_hook(lambda module, args, calls=calls: calls.__setitem__(0, 0))
                    block.drop_path.register_forward_hook(self._feed_output(beside_attn, beside_mlp, calls))

    def _feed_input(self, adapter: nn.Module, first: bool):
        def hook(module: nn.Module, args) -> None:
            if self.active:
                self._run(adapter, args[0], first)

        return hook

    def _feed_output(self, beside_attn: nn.Module, beside_mlp: nn.Module, calls: list):
        def hook(module: nn.Module, args, output: torch.Tensor) -> None:
            if not self.active:
                return
            if calls[0] > 1:
                raise RuntimeError(
                    "A trunk block called its drop_path more than twice in one forward; the sub-layer-output "
                    "taps expect Detectron2's Swin/ViT blocks (attention, then MLP). Use adapter_input="
                    "'sublayer_input' for this trunk."
                )
            first = calls[0] == 0
            calls[0] += 1
            self._run(beside_attn if first else beside_mlp, output, first)

        return hook

    def _run(self, adapter: nn.Module, tap: torch.Tensor, first: bool) -> None:
        with self.side_mode(tap):
            x = tap.float()
            if self.stacked and not first and self._attn_out is not None:
                x = x + self._attn_out
            out = adapter(x)
            if self.stacked:
                self._attn_out = out if first else None
            self._accumulate(out)

    def _accumulate(self, out: torch.Tensor) -> None:
        # In place after the first addition: a sum keeps nothing for backward, and this saves an N x C
        # buffer per adapter (fresh kernel pages each time under a low mmap threshold). The first
        # adapter's output is not added to in place: autograd forbids it for a custom function's output.
        if self.total is None:
            self.total = out
        elif self._total_is_ours:
            self.total.add_(out)
        else:
            self.total, self._total_is_ours = self.total + out, True

    def begin(self, carried: Optional[torch.Tensor]) -> None:
        self.carried, self.total, self._total_is_ours, self._attn_out = carried, None, False, None

    def end(self) -> torch.Tensor:
        delta = self.total if self.carried is None else self.carried + self.total
        self.carried = self.total = None
        return delta


def attach_highway(spec: AdapterSpec, layout: TrunkLayout, options: TuningOptions) -> SideNetwork:
    """Builds the highway for ``layout``'s trunk, shaped by ``spec`` and the options given, and hooks it on."""
    given = options.given(("rank", "bottleneck_ratio", "activation", "adapter_input"))
    if options.adapter_arrangement is not None:
        given["arrangement"] = options.adapter_arrangement
    spec = dataclasses.replace(spec, **given)
    highway = AdapterHighway(layout.stage_dims, layout.depths, spec, fused=options.fused_adapters,
                             saved_input_dtype=options.saved_input_dtype)
    record = {"adapter_input": spec.adapter_input}
    if spec.arrangement != "parallel":  # "parallel" is not recorded: it is all that older files knew
        record["arrangement"] = spec.arrangement
    return SideNetwork("highway", highway, lambda trunk: HighwayTaps(trunk.blocks_by_stage, highway), record,
                       layout)


def _register(name: str, spec: AdapterSpec) -> None:
    register_tuning_method(TuningMethod(
        name, train_out_norms=True, attach=functools.partial(attach_highway, spec),
        options=("rank", "bottleneck_ratio", "activation", "adapter_input", "adapter_arrangement"), spec=spec,
    ))


# Ranks 8/16/32 with a bottleneck of half the stage width reproduce the paper's trainable parameter
# counts on Swin-B exactly (1.20 M / 2.35 M / 4.66 M, output norms included): see projects/E3VA/README.md.
_register("e3va", AdapterSpec(rank=8))
_register("e3va_plus", AdapterSpec(rank=16))
_register("e3va_plusplus", AdapterSpec(rank=32))
# Beyond the paper: e3va with frozen random down-projection input factors, which keeps a rank-16 projection
# of each adapter's input for backward instead of the input (the activation memory of a frozen trunk's
# highway is mostly those inputs). It meets a frozen trunk's memory on Swin but, in the transfer study,
# loses E3VA's accuracy gain: an experiment, not a recommendation.
_register("e3va_fa", AdapterSpec(rank=8, train_down_input_factors=False))
