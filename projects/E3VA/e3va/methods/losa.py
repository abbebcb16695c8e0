"""LoSA, the low-rank side network (Mercea et al., CVPR 2024), beside a frozen Swin or ViT trunk.

The trunk's block outputs ``b_l`` are computed without autograd; a side state starts at zero and is
refined block by block,

    a_l = a_{l-1} + g_l(b_l + a_{l-1}),

and the head reads ``b_L + a_L``. ``g_l`` is a low-rank mixer (:class:`LowRankMixer`): a token-mixing
MLP then a channel-mixing MLP, each ``d -> r -> d`` and residual, with zero-initialised last
projections, so ``g_l = 0`` and the backbone returns the trunk's features at initialisation.

On Swin the state lives per stage, crosses the trunk's frozen patch merging at stage ends as E3VA's
highway does, and tokens are mixed within the trunk's own ``window_size x window_size`` windows, which
keeps the token count fixed for any input size. On a plain ViT (``e3va.vit``) there is one stage and
no merging; tokens mix within the ViTDet window (14 x 14). See projects/E3VA/README.md ("LoSA").

This module is the whole method: its spec, its mixers, the side network, the hooks that run it, and the
registration of ``losa``.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..side_memory import CompactInput, RecomputedFromCompactInput
from .base import ACTIVATIONS, SideNetwork, SideTaps, TrunkLayout, TuningMethod, TuningOptions, check_choice
from .base import register_tuning_method

__all__ = ["LoSASideNetwork", "LoSASpec", "LoSATaps", "LowRankMLP", "LowRankMixer", "attach_losa", "mix_in_windows"]

# (block, block output) -> (H, W), the token grid of a block's output, for the window partition.
GridOf = Callable[[nn.Module, torch.Tensor], Tuple[int, int]]


@dataclass(frozen=True)
class LoSASpec:
    """Shape of every LoSA low-rank mixer: hidden width ``rank`` of its token- and channel-mixing MLPs."""

    rank: int
    activation: str = "gelu"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoSA rank must be a positive integer, got {self.rank!r}.")


class LowRankMLP(nn.Module):
    """``fc2(act(fc1(x)))`` along the last dimension, ``dim -> rank -> dim``; ``fc2`` starts at zero."""

    def __init__(self, dim: int, rank: int, activation: str = "gelu") -> None:
        super().__init__()
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank!r}.")
        check_choice("activation", activation, sorted(ACTIVATIONS))
        self.fc1 = nn.Linear(dim, rank)
        self.act = ACTIVATIONS[activation]()
        self.fc2 = nn.Linear(rank, dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LowRankMixer(nn.Module):
    """LoSA's ``g``: token mixing then channel mixing, each a residual low-rank MLP.

    For ``z`` of shape ``(..., N, C)`` (``N = num_tokens``)::

        u = z + T(z)       T mixes the N tokens of each channel (N -> r -> N)
        v = u + M(u)       M mixes the C channels of each token (C -> r -> C)

    and the mixer returns the update ``g(z) = v - z = T(z) + M(u)``, which is exactly zero at
    initialisation (both last projections start at zero).
    """

    def __init__(self, dim: int, num_tokens: int, rank: int, activation: str = "gelu") -> None:
        super().__init__()
        self.dim, self.num_tokens = dim, num_tokens
        self.token_mlp = LowRankMLP(num_tokens, rank, activation)
        self.channel_mlp = LowRankMLP(dim, rank, activation)

    def _expected(self) -> str:
        side = math.isqrt(self.num_tokens)
        window = f" (a {side}x{side} window)" if side * side == self.num_tokens else ""
        return f"(..., {self.num_tokens}, {self.dim}): {self.num_tokens} tokens{window} of {self.dim} channels"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() < 2 or z.shape[-2:] != (self.num_tokens, self.dim):
            raise ValueError(f"LowRankMixer expects inputs of shape {self._expected()}, got {tuple(z.shape)}.")
        t = self.token_mlp(z.transpose(-1, -2)).transpose(-1, -2)
        return t + self.channel_mlp(z + t)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_tokens={self.num_tokens}, rank={self.token_mlp.fc1.out_features}"


def mix_in_windows(mixer: LowRankMixer, x: torch.Tensor, H: int, W: int, window_size: int) -> torch.Tensor:
    """``mixer`` on each ``window_size x window_size`` window of the ``H x W`` token map ``x``.

    ``x`` is ``(B, H*W, C)`` (Swin's flat tokens) or ``(B, H, W, C)`` (ViT's); the result has its shape.
    The map is padded with zeros to a multiple of the window (bottom and right, as Swin and ViTDet pad)
    and the result cropped back. A zero token adds nothing to a token-mixing projection, so the padding
    does not change what the real tokens receive.
    """
    if window_size * window_size != mixer.num_tokens:
        raise ValueError(
            f"The trunk's window is {window_size}x{window_size} ({window_size * window_size} tokens), but this "
            f"LoSA mixer expects {mixer._expected()}; build the backbone with the window size its LoSA "
            "weights were trained with."
        )
    B, C = x.shape[0], x.shape[-1]
    if x.dim() not in (3, 4) or x.shape[1:-1].numel() != H * W:
        raise ValueError(f"Expected (B, {H}*{W}, C) or (B, {H}, {W}, C) tokens, got {tuple(x.shape)}.")
    w = window_size
    pad_b, pad_r = (-H) % w, (-W) % w
    grid = F.pad(x.reshape(B, H, W, C), (0, 0, 0, pad_r, 0, pad_b))
    Hp, Wp = H + pad_b, W + pad_r
    windows = grid.view(B, Hp // w, w, Wp // w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, C)
    out = mixer(windows)
    out = out.view(B, Hp // w, Wp // w, w, w, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
    return out[:, :H, :W].reshape(x.shape)


class LoSASideNetwork(nn.Module):
    """The trainable LoSA side network: one :class:`LowRankMixer` per trunk block, by stage.

    ``refine`` computes one step ``a_l = a_{l-1} + g_l(b_l + a_{l-1})``; the backbones (``E3VASwin``,
    ``E3VAViT``) call it from a forward hook on each trunk block while the trunk runs without autograd.

    Args:
        stage_dims, depths: the trunk's stage widths and block counts.
        window_size: the trunk's window; each mixer mixes ``window_size ** 2`` tokens.
        rank: hidden width of both MLPs of every mixer.
        fused: run each mixer through a function that keeps only its input (``saved_input_dtype``) for
            backward and recomputes the rest there; False for the plain autograd graph.
    """

    def __init__(
        self,
        stage_dims: Sequence[int],
        depths: Sequence[int],
        window_size: int,
        rank: int,
        activation: str = "gelu",
        *,
        fused: bool = True,
        saved_input_dtype: str = "bfloat16",
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.fused = fused
        self.compact = CompactInput(saved_input_dtype)
        self.mixers = nn.ModuleList(
            nn.ModuleList(LowRankMixer(dim, window_size**2, rank, activation) for _ in range(depth))
            for dim, depth in zip(stage_dims, depths)
        )

    def refine(
        self, mixer: LowRankMixer, b: torch.Tensor, state: Optional[torch.Tensor], H: int, W: int
    ) -> torch.Tensor:
        """``a + g(b + a)`` (``a = 0`` when ``state`` is None) for a block output ``b`` on an ``H x W``
        token grid, of shape (B, H*W, C) or (B, H, W, C); tokens mix within ``self.window_size`` windows."""
        z = b if state is None else b + state
        fn = functools.partial(mix_in_windows, mixer, H=H, W=W, window_size=self.window_size)
        params = [p for p in mixer.parameters() if p.requires_grad]
        # Fused only in training: it saves memory for a backward; inference (eval mode, or autograd off) runs
        # plain ops, which trace and export. The backbone's hooks turn autograd on, so eval mode is the signal.
        if self.fused and self.training and torch.is_grad_enabled() and (z.requires_grad or params):
            g = RecomputedFromCompactInput.apply(fn, self.compact.pack(z), z, *params)
        else:
            g = fn(z)
        return g if state is None else state + g


class LoSATaps(SideTaps):
    """Runs LoSA's side network: a forward hook on each block reads its output ``b_l`` and refines the
    state, ``a_l = a_{l-1} + g_l(b_l + a_{l-1})``, while the trunk moves on."""

    def __init__(
        self, blocks_by_stage: Sequence[Sequence[nn.Module]], side: LoSASideNetwork, grid_of: GridOf
    ) -> None:
        super().__init__()
        self.side = side
        self.grid_of = grid_of
        self.state: Optional[torch.Tensor] = None
        for blocks, mixers in zip(blocks_by_stage, side.mixers):
            for block, mixer in zip(blocks, mixers):
                block.register_forward_hook(self._refine(mixer))

    def _refine(self, mixer: nn.Module):
        def hook(block: nn.Module, args, output: torch.Tensor) -> None:
            if self.active:
                with self.side_mode(output):
                    H, W = self.grid_of(block, output)
                    self.state = self.side.refine(mixer, output.float(), self.state, H, W)

        return hook

    def begin(self, carried: Optional[torch.Tensor]) -> None:
        self.state = carried

    def end(self) -> torch.Tensor:
        state, self.state = self.state, None
        return state


def attach_losa(spec: LoSASpec, layout: TrunkLayout, options: TuningOptions) -> SideNetwork:
    """Builds LoSA's side network for ``layout``'s trunk (``rank`` and ``activation`` may be overridden)."""
    spec = dataclasses.replace(spec, **options.given(("rank", "activation")))
    side = LoSASideNetwork(layout.stage_dims, layout.depths, layout.window_size, spec.rank, spec.activation,
                           fused=options.fused_adapters, saved_input_dtype=options.saved_input_dtype)
    return SideNetwork("losa", side, lambda trunk: LoSATaps(trunk.blocks_by_stage, side, trunk.grid_of), {}, layout)


# LoSA (Mercea et al., CVPR 2024). Rank 45 gives 1.21 M trainable parameters on Swin-B (window 7, output
# norms included), e3va's budget (1.20 M).
_SPEC = LoSASpec(rank=45)
register_tuning_method(TuningMethod("losa", train_out_norms=True, attach=functools.partial(attach_losa, _SPEC),
                                    options=("rank", "activation"), spec=_SPEC))
