"""Yacs support: ``add_e3va_config`` and the ``build_e3va_swin_fpn_backbone`` registered builder.

LazyConfig users do not need this module: they name ``e3va.E3VASwin`` directly (see configs/).
"""
from __future__ import annotations

from detectron2.config import CfgNode as CN
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from .backbone import E3VASwin

__all__ = ["add_e3va_config", "build_e3va_swin_backbone", "build_e3va_swin_fpn_backbone"]


def add_e3va_config(cfg: CN) -> CN:
    """Adds ``MODEL.E3VA`` (defaults as ``E3VASwin``); set ``MODEL.BACKBONE.NAME`` to a builder below."""
    cfg.MODEL.E3VA = CN()
    cfg.MODEL.E3VA.SIZE = "T"
    cfg.MODEL.E3VA.TUNING = "e3va"
    cfg.MODEL.E3VA.WINDOW_SIZE = 7
    cfg.MODEL.E3VA.DROP_PATH_RATE = 0.2
    cfg.MODEL.E3VA.OUT_FEATURES = ["p0", "p1", "p2", "p3"]
    # 0 / 0.0 / "" keep the tuning method's own adapter shape.
    cfg.MODEL.E3VA.RANK = 0
    cfg.MODEL.E3VA.BOTTLENECK_RATIO = 0.0
    cfg.MODEL.E3VA.ACTIVATION = ""
    cfg.MODEL.E3VA.ADAPTER_INPUT = ""  # "" = the method's own ("sublayer_output" for e3va*); or "sublayer_input"
    cfg.MODEL.E3VA.ADAPTER_ARRANGEMENT = ""  # "" = "parallel"; or "stacked"
    cfg.MODEL.E3VA.HIGHWAY_DOWNSAMPLE = ""  # "" = "difference" for side networks; or "direct"
    cfg.MODEL.E3VA.SAVED_INPUT_DTYPE = "bfloat16"
    cfg.MODEL.E3VA.TRUNK_DTYPE = "float32"
    cfg.MODEL.E3VA.COMPILE_TRUNK = ""  # a torch.compile backend for the frozen trunk, e.g. "inductor"; "" = off
    return cfg


@BACKBONE_REGISTRY.register()
def build_e3va_swin_backbone(cfg: CN, input_shape: ShapeSpec) -> E3VASwin:
    """The E3VA Swin backbone alone (outputs p0..p3)."""
    if input_shape.channels != 3:
        raise ValueError(f"E3VASwin takes 3-channel images, but the input has {input_shape.channels} channels.")
    e = cfg.MODEL.E3VA
    return E3VASwin(
        e.SIZE,
        tuning=e.TUNING,
        window_size=e.WINDOW_SIZE,
        drop_path_rate=e.DROP_PATH_RATE,
        out_features=tuple(e.OUT_FEATURES),
        rank=e.RANK or None,
        bottleneck_ratio=e.BOTTLENECK_RATIO or None,
        activation=e.ACTIVATION or None,
        adapter_input=e.ADAPTER_INPUT or None,
        adapter_arrangement=e.ADAPTER_ARRANGEMENT or None,
        highway_downsample=e.HIGHWAY_DOWNSAMPLE or None,
        saved_input_dtype=e.SAVED_INPUT_DTYPE,
        trunk_dtype=e.TRUNK_DTYPE,
        compile_trunk=e.COMPILE_TRUNK or False,
    )


@BACKBONE_REGISTRY.register()
def build_e3va_swin_fpn_backbone(cfg: CN, input_shape: ShapeSpec) -> FPN:
    """The E3VA Swin backbone under Detectron2's FPN; ``MODEL.FPN.IN_FEATURES`` names p0..p3."""
    return FPN(
        bottom_up=build_e3va_swin_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
