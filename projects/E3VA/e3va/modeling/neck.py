"""What sits between the E3VA Swin and a dense head that brings its own feature fusion (UperNet).

``IdentityNeck`` holds the bottom-up network under ``bottom_up``, as Detectron2's ``FPN`` does, and
passes its features through unchanged. Every model then keeps the E3VA Swin at ``model.backbone.bottom_up``,
so the tuning method stays one override on every config (``model.backbone.bottom_up.tuning=...``) and
the trunk's parameters keep the prefix ``backbone.bottom_up.trunk.`` that the tools expect.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from detectron2.modeling.backbone import Backbone

from ..swin import swin_output_shape

__all__ = ["IdentityNeck", "swin_output_shape"]



class IdentityNeck(Backbone):
    """A Detectron2 ``Backbone`` returning the features ``in_features`` of ``bottom_up`` as they are.

    Args:
        bottom_up: the backbone whose features are passed on (an ``E3VASwin``).
        in_features: which of its outputs to return; None for all of them.
    """

    def __init__(self, bottom_up: Backbone, in_features: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        self.bottom_up = bottom_up
        shapes = bottom_up.output_shape()
        self.in_features = list(in_features) if in_features is not None else list(shapes)
        unknown = [f for f in self.in_features if f not in shapes]
        if unknown or not self.in_features:
            raise ValueError(
                f"IdentityNeck(in_features={self.in_features!r}): the bottom-up network outputs {sorted(shapes)}."
            )
        self._out_features = list(self.in_features)
        self._out_feature_channels = {f: shapes[f].channels for f in self.in_features}
        self._out_feature_strides = {f: shapes[f].stride for f in self.in_features}

    @property
    def size_divisibility(self) -> int:
        return self.bottom_up.size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return self.bottom_up.padding_constraints

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.bottom_up(x)
        return {f: features[f] for f in self.in_features}
