"""Plain ViT trunks (ViTDet's) with a tuning method beside them: ``E3VAViT``.

The trunk is Detectron2's ``ViT`` (ViTDet, Li et al. 2022), used unmodified: windowed attention in most
blocks, global attention in a few, decomposed relative positions, one stride-16 output that ViTDet's
``SimpleFeaturePyramid`` turns into a pyramid. It has a single stage and no patch merging, so a side
network runs along all its blocks and is added to the last one's output:

* ``e3va``: two parallel adapters per block, ``d_j = d_{j-1} + A_j(F1_j) + M_j(F2_j)`` (the attention's and
  the MLP's outputs; ``adapter_input="sublayer_input"``: ``A_j(x_{j-1}) + M_j(h_j)``), output
  ``x_L + d_L`` (there is no norm between ViTDet's trunk and its pyramid; the pyramid's own LayerNorms
  train with the heads);
* ``losa``: ``a_l = a_{l-1} + g_l(b_l + a_{l-1})``, tokens mixed within 14 x 14 windows (ViTDet's
  window), output ``b_L + a_L``.

The baselines (``full``, ``fixed``, ``lora``, ...) are the same methods as on Swin (``e3va.methods``).
"""
from __future__ import annotations

import inspect
from functools import partial
from typing import Any, Dict, Optional, Sequence

import torch
from detectron2.modeling.backbone.vit import ViT
from torch import nn

from .backbone import SideTunedBackbone, pick_preset
from .methods import TrunkLayout, TuningOptions
from .methods.base import with_tuning_options

__all__ = ["VIT_PRESETS", "VIT_PRETRAINED_CHECKPOINTS", "E3VAViT", "build_vit_trunk", "vit_preset"]

# Width, depth, heads, ViTDet's stochastic depth and the blocks with global attention (ViTDet, Sec. 4:
# four evenly spaced global blocks; the others use 14 x 14 windows). "nano" is for tests only.
VIT_PRESETS: Dict[str, Dict[str, Any]] = {
    "B": dict(embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.1, global_blocks=(2, 5, 8, 11)),
    "L": dict(embed_dim=1024, depth=24, num_heads=16, drop_path_rate=0.4, global_blocks=(5, 11, 17, 23)),
    "H": dict(embed_dim=1280, depth=32, num_heads=16, drop_path_rate=0.5, global_blocks=(7, 15, 23, 31)),
    "nano": dict(embed_dim=48, depth=4, num_heads=2, drop_path_rate=0.0, global_blocks=(1, 3)),
}

# MAE-pretrained ImageNet-1k weights as ViTDet loads them (MAE's own names, matched to the model's by
# Detectron2's suffix heuristics; ViT-H is the patch-14 release resized to patch 16 by ViTDet).
VIT_PRETRAINED_CHECKPOINTS: Dict[str, str] = {
    size: f"detectron2://ImageNetPretrained/MAE/{name}.pth?matching_heuristics=True"
    for size, name in {
        "B": "mae_pretrain_vit_base",
        "L": "mae_pretrain_vit_large",
        "H": "mae_pretrain_vit_huge_p14to16",
    }.items()
}


# vit_preset(size): a copy of the architecture of ViT-``size`` (one of VIT_PRESETS).
vit_preset = partial(pick_preset, VIT_PRESETS, architecture="ViT")


def build_vit_trunk(
    size: str = "B",
    *,
    img_size: int = 1024,
    patch_size: int = 16,
    window_size: int = 14,
    drop_path_rate: Optional[float] = None,
    use_rel_pos: bool = True,
    residual_block_indexes: Sequence[int] = (),
    pretrain_img_size: int = 224,
    out_feature: str = "last_feat",
) -> ViT:
    """Detectron2's ``ViT`` as ViTDet builds it, with the preset ``size`` (its drop-path rate unless given)."""
    preset = vit_preset(size)
    if window_size <= 0:
        raise ValueError(f"window_size must be positive, got {window_size!r} (ViTDet uses 14).")
    depth = preset["depth"]
    bad = [i for i in residual_block_indexes if not 0 <= i < depth]
    if bad:
        raise ValueError(f"residual_block_indexes {bad} out of range for ViT-{size}'s {depth} blocks.")
    dpr = preset["drop_path_rate"] if drop_path_rate is None else drop_path_rate
    if not 0.0 <= dpr < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {dpr!r}.")
    return ViT(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=preset["embed_dim"],
        depth=depth,
        num_heads=preset["num_heads"],
        drop_path_rate=dpr,
        window_size=window_size,
        mlp_ratio=4,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        window_block_indexes=[i for i in range(depth) if i not in preset["global_blocks"]],
        residual_block_indexes=list(residual_block_indexes),
        use_rel_pos=use_rel_pos,
        pretrain_img_size=pretrain_img_size,
        pretrain_use_cls_token=True,
        out_feature=out_feature,
    )


# The trunk builder's keyword arguments and defaults, which E3VAViT passes through.
_TRUNK_DEFAULTS = {name: p.default for name, p in inspect.signature(build_vit_trunk).parameters.items()
                   if p.kind is p.KEYWORD_ONLY}


@with_tuning_options(takes_from=build_vit_trunk)
class E3VAViT(SideTunedBackbone):
    """ViTDet's plain ViT for Detectron2, tuned with a method of ``e3va.methods`` (E3VA by default).

    A drop-in for ``SimpleFeaturePyramid``'s ``net``: one output, ``out_feature``, of stride
    ``patch_size`` and ``embed_dim`` channels.

    Args:
        size: ViT preset, one of ``VIT_PRESETS`` (B, L, H, nano).
        tuning: tuning method name, one of ``e3va.TUNING_METHODS``.
        **kwargs: the trunk's arguments, as :func:`build_vit_trunk` (img_size, patch_size, window_size, also
            LoSA's token-mixing window, drop_path_rate, use_rel_pos, residual_block_indexes,
            pretrain_img_size, out_feature), and the tuning options, ``e3va.methods.TuningOptions``, as
            ``E3VASwin`` (a plain ViT has no patch merging, so ``highway_downsample`` and
            ``highway_merging`` do not apply and are refused).
    """

    def __init__(self, size: str = "B", *, tuning: str = "e3va", **kwargs: Any) -> None:
        super().__init__()
        trunk_args = {**_TRUNK_DEFAULTS, **{k: kwargs.pop(k) for k in list(kwargs) if k in _TRUNK_DEFAULTS}}
        self.trunk = build_vit_trunk(size, **trunk_args)
        # The trunk's own output names, channels and strides are the backbone's (Backbone.output_shape).
        self._out_features = list(self.trunk._out_features)
        self._out_feature_channels = dict(self.trunk._out_feature_channels)
        self._out_feature_strides = dict(self.trunk._out_feature_strides)
        layout = TrunkLayout(
            self.trunk,
            blocks_by_stage=[list(self.trunk.blocks)],
            stage_dims=[self._out_feature_channels[trunk_args["out_feature"]]],
            window_size=trunk_args["window_size"],
            grid_of=lambda block, output: (output.shape[1], output.shape[2]),  # ViT blocks map (B, H, W, C)
        )
        self._attach_tuning(tuning, layout, TuningOptions.from_kwargs(type(self), kwargs))

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        self._check_image(x)
        name = self._out_features[0]
        with self._trunk_pass(x)(), self._side_stage(None):
            features = self.trunk(x)[name]  # (B, C, H, W), the trunk's own forward
        features = features.float()
        if self._taps is not None:
            features = features + self._taps.end().permute(0, 3, 1, 2)
        return {name: features}
