"""Swin Transformer trunks: the architecture presets and the official pretrained weights.

The trunk itself is Detectron2's ``SwinTransformer`` (the detection port of the official code), used
unmodified, so that official checkpoints keep their parameter names.
"""
from __future__ import annotations

from typing import Any, Dict

from detectron2.modeling.backbone.swin import SwinTransformer

__all__ = [
    "NANO_IMAGE_FORMAT",
    "NANO_PIXEL_MEAN",
    "NANO_PIXEL_STD",
    "SWIN_PRESETS",
    "SWIN_PRETRAINED_URLS",
    "swin_preset",
    "build_swin_trunk",
]

# Embed dims, depths and heads of Swin-T/S/B/L as in the Swin paper (Liu et al., 2021, Table 1).
# "nano" is not a paper model: it is the small trunk the project pretrains itself for the CPU demo.
SWIN_PRESETS: Dict[str, Dict[str, Any]] = {
    "T": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "S": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "B": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "L": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    "nano": dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)),
}

_RELEASE = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
# Official ImageNet classification checkpoints (Microsoft release format: {"model": state_dict}).
SWIN_PRETRAINED_URLS: Dict[str, str] = {
    "T_in1k_w7": _RELEASE + "swin_tiny_patch4_window7_224.pth",
    "S_in1k_w7": _RELEASE + "swin_small_patch4_window7_224.pth",
    "B_in1k_w7": _RELEASE + "swin_base_patch4_window7_224.pth",
    "B_in1k_w12": _RELEASE + "swin_base_patch4_window12_384.pth",
    "B_in22k_w7": _RELEASE + "swin_base_patch4_window7_224_22k.pth",
    "B_in22k_w12": _RELEASE + "swin_base_patch4_window12_384_22k.pth",
    "L_in22k_w7": _RELEASE + "swin_large_patch4_window7_224_22k.pth",
    "L_in22k_w12": _RELEASE + "swin_large_patch4_window12_384_22k.pth",
}

SUPPORTED_WINDOW_SIZES = (7, 12)

# The official releases were trained on RGB images in 0-255 normalised by ImageNet's mean and std
# (Detectron2's ``imagenet_rgb256_mean/std``). The project's nano trunk was pretrained on Detectron2's
# default channel order, BGR, with the same statistics (tools/pretrain_nano_swin.py); a model built on
# it must normalise its input the same way.
NANO_IMAGE_FORMAT = "BGR"
NANO_PIXEL_MEAN = (103.530, 116.280, 123.675)
NANO_PIXEL_STD = (57.375, 57.120, 58.395)


def swin_preset(size: str) -> Dict[str, Any]:
    """Returns a copy of the architecture of Swin-``size`` (one of ``SWIN_PRESETS``)."""
    if size not in SWIN_PRESETS:
        raise ValueError(f"Unknown Swin size {size!r}; expected one of {sorted(SWIN_PRESETS)}.")
    return dict(SWIN_PRESETS[size])


def build_swin_trunk(
    size: str = "T",
    *,
    window_size: int = 7,
    drop_path_rate: float = 0.2,
    out_indices: tuple = (0, 1, 2, 3),
) -> SwinTransformer:
    """Builds Detectron2's Swin Transformer with the preset ``size`` and window ``window_size``.

    The trunk pads its input to the patch size and every stage to the window size, and crops the outputs
    back, so any input size works.
    """
    if window_size not in SUPPORTED_WINDOW_SIZES:
        raise ValueError(
            f"Unsupported window_size={window_size!r}; the Swin releases use {SUPPORTED_WINDOW_SIZES}."
        )
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}.")
    return SwinTransformer(
        **swin_preset(size),
        window_size=window_size,
        drop_path_rate=drop_path_rate,
        out_indices=tuple(out_indices),
    )
