"""Swin-L Faster R-CNN, E3VA-tuned, Pascal VOC (07+12 trainval -> 07 test; ImageNet-22k Swin-L, window 7).

Reports Detectron2's PascalVOCDetectionEvaluator AP, AP50 and AP75 (VOC2007 11-point metric, AP
averaged over IoU 0.50:0.95).
"""
from e3va import SWIN_PRETRAINED_URLS
from e3va.data.voc import VOC_CLASSES

from ..common.models.faster_rcnn_swin_e3va import model
from ..common.voc_swin import dataloader, lr_multiplier, optimizer, train

model.backbone.bottom_up.size = "L"
model.backbone.bottom_up.window_size = 7
model.backbone.bottom_up.drop_path_rate = 0.3
model.roi_heads.num_classes = len(VOC_CLASSES)
train.init_checkpoint = SWIN_PRETRAINED_URLS["L_in22k_w7"]
train.output_dir = "./output/voc_faster_rcnn_swin_l_e3va"
