"""Swin-L Cascade Mask R-CNN, E3VA-tuned, COCO 3x (ImageNet-22k Swin-L weights, window 7).

The paper's headline: Swin-L Cascade Mask R-CNN trains with E3VA on a single consumer GPU.
"""
from e3va import SWIN_PRETRAINED_URLS

from ..common.coco_swin_3x import dataloader, lr_multiplier, optimizer, train
from ..common.models.cascade_mask_rcnn_swin_e3va import model

model.backbone.bottom_up.size = "L"
model.backbone.bottom_up.drop_path_rate = 0.3
train.init_checkpoint = SWIN_PRETRAINED_URLS["L_in22k_w7"]
