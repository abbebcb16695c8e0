"""The tuning methods, one module per family; importing this package registers them all.

Select one with a single override, e.g. ``model.backbone.bottom_up.tuning=e3va_plus`` (Swin + FPN configs) or
``model.backbone.net.tuning=losa`` (ViT + SimpleFeaturePyramid configs). See :mod:`e3va.methods.base` for
what a method is and how to add one.
"""
from .base import (
    METHOD_OPTIONS,
    SIDE_NETWORK_OPTIONS,
    TUNING_METHODS,
    SideNetwork,
    SideTaps,
    TrunkLayout,
    TuningMethod,
    TuningOptions,
    check_choice,
    get_tuning_method,
    register_tuning_method,
)

# Registration order is the order of TUNING_METHODS: the baselines, then the side networks.
from . import trunk_params, in_trunk  # noqa: E402,I001
from .e3va import ADAPTER_ARRANGEMENTS, ADAPTER_INPUTS, AdapterHighway, AdapterSpec, DualLowRankLinear, HighwayAdapter
from .losa import LoSASideNetwork, LoSASpec, LowRankMixer

__all__ = [
    "ADAPTER_ARRANGEMENTS",
    "ADAPTER_INPUTS",
    "METHOD_OPTIONS",
    "SIDE_NETWORK_OPTIONS",
    "TUNING_METHODS",
    "AdapterHighway",
    "AdapterSpec",
    "DualLowRankLinear",
    "HighwayAdapter",
    "LoSASideNetwork",
    "LoSASpec",
    "LowRankMixer",
    "SideNetwork",
    "SideTaps",
    "TrunkLayout",
    "TuningMethod",
    "TuningOptions",
    "check_choice",
    "get_tuning_method",
    "register_tuning_method",
]
