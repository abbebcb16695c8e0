"""COCO recipe of the Swin detection papers, shared by configs/COCO: multi-scale training
(short side 480-800, long side <= 1333, flip), AdamW (lr 1e-4, weight decay 0.05), the 3x schedule
(36 epochs at batch 16), mixed precision on the GPU."""
import detectron2.data.transforms as T
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from .coco_data import dataloader  # dataset roots checked
from .models.swin_input import SWIN_IMAGE_FORMAT

dataloader.train.mapper.image_format = SWIN_IMAGE_FORMAT  # the test mapper follows it
dataloader.train.mapper.augmentations = [
    L(T.ResizeShortestEdge)(
        short_edge_length=tuple(range(480, 801, 32)), sample_style="choice", max_size=1333
    ),
    L(T.RandomFlip)(horizontal=True),
]
dataloader.train.total_batch_size = 16

optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.lr = 1e-4
optimizer.weight_decay = 0.05

lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_3x

train = model_zoo.get_config("common/train.py").train
train.max_iter = 270000  # 3x: 36 COCO epochs at a total batch of 16
train.amp.enabled = True
train.eval_period = 30000
train.checkpointer.period = 30000
