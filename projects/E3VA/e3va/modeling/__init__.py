"""Dense-prediction pieces for E3VA backbones in Detectron2.

Importing this module registers ``UperNetHead`` in Detectron2's ``SEM_SEG_HEADS_REGISTRY`` (yacs:
``MODEL.SEM_SEG_HEAD.NAME = "UperNetHead"``). LazyConfig files name the classes directly; see
configs/common/models/semantic_seg_swin_e3va.py.
"""
from .neck import IdentityNeck, swin_output_shape
from .upernet import PyramidPoolingModule, UperNetHead

__all__ = ["IdentityNeck", "PyramidPoolingModule", "UperNetHead", "swin_output_shape"]
