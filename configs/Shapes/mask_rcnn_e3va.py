"""The embedded default: E3VA Mask R-CNN on the synthetic shapes task, on the CPU, in minutes.

The trunk is the project's own Swin "nano", pretrained on synthetic images by
tools/pretrain_nano_swin.py (no download). Everything but sizes is the COCO pipeline: Detectron2's COCO
registration, DatasetMapper, Mask R-CNN heads and COCOEvaluator.
Compare with the heads-only baseline by adding ``model.backbone.bottom_up.tuning=fixed``.
"""
import detectron2.data.transforms as T
from fvcore.common.param_scheduler import MultiStepParamScheduler
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.layers import ShapeSpec
from detectron2.solver import WarmupParamScheduler

from e3va import NANO_SWIN_WEIGHTS
from e3va.engine.lr import BackboneLRFactor
from e3va.swin import NANO_IMAGE_FORMAT, NANO_PIXEL_MEAN, NANO_PIXEL_STD
from e3va.data.shapes import SHAPES_CLASSES, build_shapes_evaluator

from ..common.models.mask_rcnn_swin_e3va import model

# ---- model: the nano trunk and heads scaled to 128-pixel images with 16-64 pixel objects
CHANNELS = 64
model.backbone.bottom_up.size = "nano"
model.backbone.bottom_up.drop_path_rate = 0.0
model.update(pixel_mean=list(NANO_PIXEL_MEAN), pixel_std=list(NANO_PIXEL_STD), input_format=NANO_IMAGE_FORMAT)
model.backbone.out_channels = CHANNELS
model.proposal_generator.head.in_channels = CHANNELS
model.proposal_generator.anchor_generator.sizes = [[8], [16], [32], [64], [128]]
model.proposal_generator.batch_size_per_image = 128
model.proposal_generator.pre_nms_topk = (600, 300)
model.proposal_generator.post_nms_topk = (300, 100)
model.roi_heads.num_classes = len(SHAPES_CLASSES)
model.roi_heads.batch_size_per_image = 128
model.roi_heads.box_head.input_shape = ShapeSpec(channels=CHANNELS, height=7, width=7)
model.roi_heads.box_head.fc_dims = [256, 256]
model.roi_heads.box_predictor.input_shape = ShapeSpec(channels=256)
model.roi_heads.mask_head.input_shape = ShapeSpec(channels=CHANNELS, width=14, height=14)
model.roi_heads.mask_head.conv_dims = [CHANNELS] * 5

# ---- data: Detectron2's COCO path on the generated shapes_train / shapes_val
dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="shapes_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[L(T.RandomFlip)(horizontal=True)],
        image_format=NANO_IMAGE_FORMAT,
        use_instance_mask=True,
    ),
    total_batch_size=4,
    num_workers=1,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="shapes_val", filter_empty=False),
    mapper=L(DatasetMapper)(is_train=False, augmentations=[], image_format=NANO_IMAGE_FORMAT),
    num_workers=1,
)
dataloader.evaluator = L(build_shapes_evaluator)(dataset_name="shapes_val")

# ---- schedule: AdamW, short warm-up, one decay step
optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.lr = 1e-3
optimizer.weight_decay = 0.05
# The tuned backbone's trainable parameters (side network, or trunk parameters) train at factor x lr;
# tools/transfer_study.py chooses the factor per method on shapes_minival.
optimizer.params.lr_factor_func = L(BackboneLRFactor)(factor=1.0)

MAX_ITER = 500  # about 4 minutes of training on 2 cores of a fast CPU, 7 on a slow one

train = model_zoo.get_config("common/train.py").train
train.device = "cpu"
train.seed = 0  # seeded model init, data order and augmentation: the same run gives the same AP on one machine
train.max_iter = MAX_ITER
train.init_checkpoint = str(NANO_SWIN_WEIGHTS)
train.output_dir = "./output/shapes_mask_rcnn_e3va"
train.log_period = 20
train.eval_period = MAX_ITER
train.checkpointer.period = MAX_ITER

# Milestones and warm-up are fractions of train.max_iter for Detectron2's LR multiplier, so the schedule
# keeps its shape when an override changes max_iter.
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1], milestones=[int(0.8 * MAX_ITER), MAX_ITER]),
    warmup_length=25 / MAX_ITER,
    warmup_factor=0.01,
)
