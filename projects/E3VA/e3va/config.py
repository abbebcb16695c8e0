"""Yacs support: ``add_e3va_config`` and the ``build_e3va_swin_fpn_backbone`` registered builder.

LazyConfig users do not need this module: they name ``e3va.E3VASwin`` directly (see configs/).
"""
from __future__ import annotations

import dataclasses

from detectron2.config import CfgNode as CN
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from .methods import TuningOptions, check_choice
from .swin import E3VASwin

__all__ = ["add_e3va_config", "build_e3va_swin_backbone", "build_e3va_swin_fpn_backbone"]

# The yacs value that stands for "the method's own" (None in TuningOptions; False for compile_trunk).
_YACS_UNSET = {"rank": 0, "bottleneck_ratio": 0.0, "activation": "", "adapter_input": "",
               "adapter_arrangement": "", "highway_downsample": "", "highway_merging": "", "compile_trunk": "",
               "train_out_norms": ""}


def add_e3va_config(cfg: CN) -> CN:
    """Adds ``MODEL.E3VA`` (defaults as ``E3VASwin``); set ``MODEL.BACKBONE.NAME`` to a builder below."""
    cfg.MODEL.E3VA = CN()
    cfg.MODEL.E3VA.SIZE = "T"
    cfg.MODEL.E3VA.TUNING = "e3va"
    cfg.MODEL.E3VA.WINDOW_SIZE = 7
    cfg.MODEL.E3VA.DROP_PATH_RATE = 0.2
    cfg.MODEL.E3VA.OUT_FEATURES = ["p0", "p1", "p2", "p3"]
    # One key per tuning option (e3va.methods.TuningOptions), upper-cased; 0 / 0.0 / "" keep the
    # method's own value (e.g. ADAPTER_INPUT "" = "sublayer_output" for e3va*, HIGHWAY_DOWNSAMPLE "" =
    # "difference"), and COMPILE_TRUNK names a torch.compile backend ("" = off).
    for field in dataclasses.fields(TuningOptions):
        setattr(cfg.MODEL.E3VA, field.name.upper(), _YACS_UNSET.get(field.name, field.default))
    return cfg


@BACKBONE_REGISTRY.register()
def build_e3va_swin_backbone(cfg: CN, input_shape: ShapeSpec) -> E3VASwin:
    """The E3VA Swin backbone alone (outputs p0..p3)."""
    if input_shape.channels != 3:
        raise ValueError(f"E3VASwin takes 3-channel images, but the input has {input_shape.channels} channels.")
    e = cfg.MODEL.E3VA
    options = {}
    for field in dataclasses.fields(TuningOptions):
        value = e[field.name.upper()]
        # yacs cannot hold None (nor a bool where a string may come): its "unset" values map back.
        options[field.name] = field.default if value == _YACS_UNSET.get(field.name, object()) else value
    if isinstance(options["train_out_norms"], str):  # yacs has no tri-state bool: "", "true" or "false"
        flag = options["train_out_norms"].lower()
        options["train_out_norms"] = {"true": True, "false": False}[check_choice("TRAIN_OUT_NORMS", flag, ("true", "false"))]
    return E3VASwin(
        e.SIZE,
        tuning=e.TUNING,
        window_size=e.WINDOW_SIZE,
        drop_path_rate=e.DROP_PATH_RATE,
        out_features=tuple(e.OUT_FEATURES),
        **options,
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
