"""Mask R-CNN on ViT-B, losa-tuned, ViTDet's COCO recipe (LSJ 1024, 100 epochs, MAE ViT-B weights)."""
from ..common.coco_vit_lsj import dataloader, lr_multiplier, optimizer, train
from ..common.models.mask_rcnn_vit_e3va import model

model.backbone.net.tuning = "losa"
