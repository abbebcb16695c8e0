"""Swin-B Mask R-CNN, E3VA-tuned, COCO 3x (ImageNet-22k Swin-B weights, window 7)."""
from e3va import SWIN_PRETRAINED_URLS

from ..common.coco_swin_3x import dataloader, lr_multiplier, optimizer, train
from ..common.models.mask_rcnn_swin_e3va import model

model.backbone.bottom_up.size = "B"
model.backbone.bottom_up.drop_path_rate = 0.3
train.init_checkpoint = SWIN_PRETRAINED_URLS["B_in22k_w7"]
