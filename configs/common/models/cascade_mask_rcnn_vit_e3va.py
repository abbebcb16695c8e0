"""Cascade Mask R-CNN on a tuned plain ViT, as ViTDet's: three cascade stages (IoU 0.5, 0.6, 0.7) of
4conv-1fc LN box heads with class-agnostic regression, on mask_rcnn_vit_e3va.py's backbone and mask head.

Choose the tuning method with one override: ``model.backbone.net.tuning=losa``.
"""
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.roi_heads import CascadeROIHeads, FastRCNNConvFCHead, FastRCNNOutputLayers

from .mask_rcnn_vit_e3va import model

for single_stage_key in ("box_head", "box_predictor", "proposal_matcher"):
    model.roi_heads.pop(single_stage_key)

# (IoU threshold, box-regression weights) of each stage, as Cascade R-CNN (Cai & Vasconcelos, 2018).
_STAGES = [(0.5, (10, 10, 5, 5)), (0.6, (20, 20, 10, 10)), (0.7, (30, 30, 15, 15))]

model.roi_heads.update(
    _target_=CascadeROIHeads,
    box_heads=[
        L(FastRCNNConvFCHead)(
            input_shape=ShapeSpec(channels=256, height=7, width=7),
            conv_dims=[256, 256, 256, 256],
            fc_dims=[1024],
            conv_norm="LN",
        )
        for _ in _STAGES
    ],
    box_predictors=[
        L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=1024),
            test_score_thresh=0.05,
            box2box_transform=L(Box2BoxTransform)(weights=weights),
            cls_agnostic_bbox_reg=True,
            num_classes="${...num_classes}",
        )
        for _, weights in _STAGES
    ],
    proposal_matchers=[
        L(Matcher)(thresholds=[iou], labels=[0, 1], allow_low_quality_matches=False) for iou, _ in _STAGES
    ],
)
