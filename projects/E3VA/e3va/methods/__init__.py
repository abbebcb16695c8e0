"""The tuning methods, one module per family; importing this package registers them all.

Select one with a single override, e.g. ``model.backbone.bottom_up.tuning=e3va_plus`` (Swin + FPN configs) or
``model.backbone.net.tuning=losa`` (ViT + SimpleFeaturePyramid configs). See :mod:`e3va.methods.base` for
what a method is and how to add one.
"""
from . import base
from .base import *  # noqa: F401,F403 (the protocol and registry, as base.__all__ lists them)

# Registration order is the order of TUNING_METHODS: the baselines, then the side networks.
from . import trunk_params, in_trunk  # noqa: E402,I001
from . import e3va, losa
from .e3va import *  # noqa: F401,F403
from .losa import *  # noqa: F401,F403

__all__ = [*base.__all__, *e3va.__all__, *losa.__all__]
