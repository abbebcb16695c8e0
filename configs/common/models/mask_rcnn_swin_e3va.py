"""Mask R-CNN with FPN on an E3VA-tuned Swin: Detectron2's model-zoo Mask R-CNN, Swin bottom-up.

Choose the tuning method with one override: ``model.backbone.bottom_up.tuning=e3va_plus``
(see ``e3va.TUNING_METHODS``: full, fixed, e3va, e3va_plus, e3va_plusplus, ...).
"""
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from e3va import E3VASwin

from .swin_input import use_swin_input

model = use_swin_input(model_zoo.get_config("common/models/mask_rcnn_fpn.py").model)
model.backbone.bottom_up = L(E3VASwin)(
    size="T",
    tuning="e3va",
    window_size=7,
    drop_path_rate=0.2,
    out_features=("p0", "p1", "p2", "p3"),
)
model.backbone.in_features = "${.bottom_up.out_features}"
