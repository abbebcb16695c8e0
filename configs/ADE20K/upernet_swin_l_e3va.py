"""UperNet on an E3VA-tuned Swin-L, ADE20K-150, 512x512 crops, 160k iterations.

The Swin-B recipe (configs/ADE20K/upernet_swin_b_e3va.py: data, AdamW lr 6e-5 / weight decay 0.01, poly
schedule with warm-up, batch 16, SemSegEvaluator) with the ImageNet-22k Swin-L trunk, window 12 (the
384x384 release), drop path 0.3, as mmsegmentation's
``upernet_swin_large_patch4_window12_512x512_pretrain_384x384_22K_160k_ade20k``.
Tuning method: ``model.backbone.bottom_up.tuning=...``.
"""
from e3va import SWIN_PRETRAINED_URLS

from .upernet_swin_b_e3va import dataloader, lr_multiplier, model, optimizer, train

model.backbone.bottom_up.size = "L"
model.backbone.bottom_up.window_size = 12
model.backbone.bottom_up.drop_path_rate = 0.3
train.init_checkpoint = SWIN_PRETRAINED_URLS["L_in22k_w12"]
train.output_dir = "./output/ade20k_upernet_swin_l_e3va"
