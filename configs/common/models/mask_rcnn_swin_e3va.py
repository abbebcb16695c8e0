"""Mask R-CNN with FPN on an E3VA-tuned Swin: Detectron2's model-zoo Mask R-CNN, Swin bottom-up.

Choose the tuning method with one override: ``model.backbone.bottom_up.tuning=e3va_plus``
(see ``e3va.TUNING_METHODS``: full, fixed, e3va, e3va_plus, e3va_plusplus, ...).
"""
from detectron2 import model_zoo

from .e3va_swin import e3va_swin
from .swin_input import use_swin_input

model = use_swin_input(model_zoo.get_config("common/models/mask_rcnn_fpn.py").model)
model.backbone.bottom_up = e3va_swin()
model.backbone.in_features = "${.bottom_up.out_features}"
