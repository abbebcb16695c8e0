"""Faster R-CNN with FPN on an E3VA-tuned Swin: the Mask R-CNN of mask_rcnn_swin_e3va.py without its
mask branch (Detectron2's StandardROIHeads turns the mask head off when ``mask_in_features`` is None).

Choose the tuning method with one override: ``model.backbone.bottom_up.tuning=e3va_plus``.
"""
from .mask_rcnn_swin_e3va import model

model.roi_heads.mask_in_features = None
model.roi_heads.mask_pooler = None
model.roi_heads.mask_head = None
