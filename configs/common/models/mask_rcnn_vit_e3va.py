"""Mask R-CNN on a tuned plain ViT: Detectron2's ViTDet Mask R-CNN (SimpleFeaturePyramid, LN heads),
its ``ViT`` replaced by ``e3va.E3VAViT`` (the same trunk, with a tuning method beside it).

Choose the tuning method with one override: ``model.backbone.net.tuning=losa`` (see ``e3va.TUNING_METHODS``).
ViT-B, windows of 14 with global attention in blocks 2, 5, 8, 11, drop-path 0.1, 1024 input, as ViTDet.
"""
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from e3va import E3VAViT

model = model_zoo.get_config("common/models/mask_rcnn_vitdet.py").model  # RGB, ImageNet mean/std, as MAE
model.backbone.net = L(E3VAViT)(
    size="B", tuning="e3va", img_size=1024, window_size=14, drop_path_rate=0.1, out_feature="last_feat"
)
