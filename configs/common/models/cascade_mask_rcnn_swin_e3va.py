"""Cascade Mask R-CNN with FPN on an E3VA-tuned Swin (Detectron2's model-zoo Cascade R-CNN heads)."""
from detectron2 import model_zoo

from .mask_rcnn_swin_e3va import model as _mask_rcnn
from .swin_input import use_swin_input

model = use_swin_input(model_zoo.get_config("common/models/cascade_rcnn.py").model)
model.backbone = _mask_rcnn.backbone
