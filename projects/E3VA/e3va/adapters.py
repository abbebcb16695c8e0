"""The E3VA adapter: a bottleneck whose down and up projections are dual low-rank branches."""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DualLowRankLinear", "HighwayAdapter", "ACTIVATIONS"]

ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "identity": nn.Identity,
}

NUM_BRANCHES = 2  # "dual" low-rank branches: W = U1 V1 + U2 V2


class DualLowRankLinear(nn.Module):
    """A linear layer whose weight is the sum of two rank-``rank`` products, ``W = U1 V1 + U2 V2``.

    The two branches are stored stacked (``u``: 2 x out x r, ``v``: 2 x r x in). ``W`` is formed once
    per forward (it is only ``out x in``) so autograd keeps the layer input and ``W``, as a plain
    ``nn.Linear`` would, rather than an extra rank-sized activation per branch.
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, *, bias: bool = True, zero_init: bool = False
    ) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank!r}.")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.u = nn.Parameter(torch.empty(NUM_BRANCHES, out_features, rank))
        self.v = nn.Parameter(torch.empty(NUM_BRANCHES, rank, in_features))
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, branches={NUM_BRANCHES}"


class HighwayAdapter(nn.Module):
    """``up(act(down(x)))`` with dual low-rank projections; its output starts at exactly zero.

    No skip connection inside: the adapter sits beside a trunk sub-layer, and the highway's running
    sum plays the role of the skip connection.
    """

    def __init__(self, dim: int, bottleneck: int, rank: int, activation: str = "gelu") -> None:
        super().__init__()
        if bottleneck <= 0:
            raise ValueError(f"bottleneck width must be positive, got {bottleneck!r} for dim={dim}.")
        if activation not in ACTIVATIONS:
            raise ValueError(f"Unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}.")
        self.down = DualLowRankLinear(dim, bottleneck, rank)
        self.act = ACTIVATIONS[activation]()
        self.up = DualLowRankLinear(bottleneck, dim, rank, zero_init=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))
