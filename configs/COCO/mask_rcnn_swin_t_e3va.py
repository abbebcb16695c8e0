"""Swin-T Mask R-CNN, E3VA-tuned, COCO 3x (ImageNet-1k Swin-T weights)."""
from e3va import SWIN_PRETRAINED_URLS

from ..common.coco_swin_3x import dataloader, lr_multiplier, optimizer, train
from ..common.models.mask_rcnn_swin_e3va import model

model.backbone.bottom_up.size = "T"
model.backbone.bottom_up.drop_path_rate = 0.2
train.init_checkpoint = SWIN_PRETRAINED_URLS["T_in1k_w7"]
