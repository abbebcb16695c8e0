"""E3VA: parameter-, memory- and time-efficient visual adapters for Detectron2.

Importing the package registers its Detectron2 pieces: the yacs backbone builders, the UperNet
semantic-segmentation head, and the synthetic ``shapes_*`` datasets (generated lazily, on first use).
"""
from pathlib import Path

from .methods import (
    ADAPTER_INPUTS,
    TUNING_METHODS,
    AdapterHighway,
    AdapterSpec,
    DualLowRankLinear,
    HighwayAdapter,
    LoSASideNetwork,
    LoSASpec,
    LowRankMixer,
    TuningMethod,
    TuningOptions,
    get_tuning_method,
    register_tuning_method,
)
from .backbone import HIGHWAY_DOWNSAMPLES, SideTunedBackbone, backbone_config_key, find_tuned_backbone
from .swin import SWIN_PRESETS, SWIN_PRETRAINED_URLS, E3VASwin, build_swin_trunk
from .vit import VIT_PRESETS, VIT_PRETRAINED_CHECKPOINTS, E3VAViT, build_vit_trunk
from . import modeling  # registers UperNetHead in Detectron2's SEM_SEG_HEADS_REGISTRY
from .checkpoint import E3VACheckpointer
from .checkpoint_io import CheckpointReadError, read_checkpoint_file
from .data.shapes import register_shapes_datasets
from .config import add_e3va_config, build_e3va_swin_backbone, build_e3va_swin_fpn_backbone
from .trainable import TrainableCheckpointError, load_trainable, save_trainable

register_shapes_datasets()  # cheap: the images are generated on first use

# The project's own small pretrained trunk (Swin "nano", made by tools/pretrain_nano_swin.py).
NANO_SWIN_WEIGHTS = Path(__file__).parent / "weights" / "swin_nano_shapes_pretrained.pth"

__all__ = [
    "ADAPTER_INPUTS",
    "AdapterHighway",
    "AdapterSpec",
    "CheckpointReadError",
    "DualLowRankLinear",
    "E3VACheckpointer",
    "E3VASwin",
    "E3VAViT",
    "HIGHWAY_DOWNSAMPLES",
    "HighwayAdapter",
    "LoSASideNetwork",
    "LoSASpec",
    "LowRankMixer",
    "NANO_SWIN_WEIGHTS",
    "SWIN_PRESETS",
    "SWIN_PRETRAINED_URLS",
    "SideTunedBackbone",
    "TUNING_METHODS",
    "TrainableCheckpointError",
    "TuningMethod",
    "TuningOptions",
    "VIT_PRESETS",
    "VIT_PRETRAINED_CHECKPOINTS",
    "add_e3va_config",
    "backbone_config_key",
    "build_e3va_swin_backbone",
    "build_e3va_swin_fpn_backbone",
    "build_swin_trunk",
    "build_vit_trunk",
    "find_tuned_backbone",
    "get_tuning_method",
    "load_trainable",
    "read_checkpoint_file",
    "register_tuning_method",
    "save_trainable",
]
