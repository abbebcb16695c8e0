"""ViTDet's COCO recipe (Li et al., 2022), shared by the plain-ViT configs in configs/COCO: large-scale
jitter (scale 0.1-2.0 of 1024, 1024 x 1024 crops, flip), AdamW (lr 1e-4, weight decay 0.1, layer-wise
lr decay 0.7, no decay on the positions), 100 epochs at batch 64 (184,375 iterations, steps at 163,889
and 177,546, 250 warm-up iterations), mixed precision, MAE-pretrained weights."""
from functools import partial

import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.vit import get_vit_lr_decay_rate
from detectron2.solver import WarmupParamScheduler
from fvcore.common.param_scheduler import MultiStepParamScheduler

from e3va import VIT_PRETRAINED_CHECKPOINTS

from .coco_data import dataloader  # dataset roots checked

IMAGE_SIZE = 1024

dataloader.train.mapper.image_format = "RGB"  # as MAE's pretraining; the test mapper follows it
dataloader.train.mapper.recompute_boxes = True  # the crop cuts masks: boxes are taken from them again
dataloader.train.mapper.augmentations = [
    L(T.RandomFlip)(horizontal=True),
    L(T.ResizeScale)(min_scale=0.1, max_scale=2.0, target_height=IMAGE_SIZE, target_width=IMAGE_SIZE),
    L(T.FixedSizeCrop)(crop_size=(IMAGE_SIZE, IMAGE_SIZE)),
]
dataloader.train.total_batch_size = 64
dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=IMAGE_SIZE, max_size=IMAGE_SIZE)]

optimizer = model_zoo.get_config("common/optim.py").AdamW  # lr 1e-4, weight decay 0.1
# Names under backbone.net.trunk.blocks.<i> get 0.7 ** (12 - i); side networks and heads get 1.
optimizer.params.lr_factor_func = partial(get_vit_lr_decay_rate, num_layers=12, lr_decay_rate=0.7)
optimizer.params.overrides = {"pos_embed": {"weight_decay": 0.0}}

train = model_zoo.get_config("common/train.py").train
train.init_checkpoint = VIT_PRETRAINED_CHECKPOINTS["B"]
train.amp.enabled = True
train.ddp.fp16_compression = True
train.max_iter = 184375  # 100 epochs: 184,375 iterations x 64 images / 118k images
train.eval_period = 20000
train.checkpointer.period = 20000

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[163889, 177546], num_updates=train.max_iter
    ),
    warmup_length=250 / train.max_iter,
    warmup_factor=0.001,
)
