"""Pascal VOC detection recipe, shared by configs/VOC: Detectron2's VOC schedule (18k iterations at batch
16, steps at 12k and 16k; trained on VOC2007+2012 trainval, tested on VOC2007 test) with the Swin pieces
of coco_swin_3x.py: multi-scale training (short side 480-800, long side <= 1333, flip; test at 800),
AdamW (lr 1e-4, weight decay 0.05), mixed precision on the GPU.

The datasets are Detectron2's builtin registrations, found under $DETECTRON2_DATASETS:
VOC2007/{JPEGImages,Annotations,ImageSets/Main} and VOC2012/{...}. ``e3va.data.roots.dataset_dicts`` and
``build_voc_evaluator`` check that layout first and say what is missing.
"""
from fvcore.common.param_scheduler import MultiStepParamScheduler
from detectron2.config import LazyCall as L
from detectron2.solver import WarmupParamScheduler

from e3va.data.roots import dataset_dicts
from e3va.data.voc import build_voc_evaluator

from .coco_swin_3x import dataloader, optimizer, train

VOC_TRAIN = ("voc_2007_trainval", "voc_2012_trainval")
VOC_TEST = "voc_2007_test"

dataloader.train.dataset = L(dataset_dicts)(names=VOC_TRAIN)
dataloader.train.mapper.use_instance_mask = False  # VOC detection has boxes only
dataloader.test.dataset = L(dataset_dicts)(names=VOC_TEST, filter_empty=False)
dataloader.evaluator = L(build_voc_evaluator)(dataset_name="${..test.dataset.names}")

# Detectron2's configs/PascalVOC-Detection/faster_rcnn_R_50_FPN.yaml: 18k iterations at batch 16
# (about 17 epochs of the 16.5k trainval images), lr x0.1 at 12k and 16k, 1000 warm-up iterations.
MAX_ITER = 18000
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(values=[1.0, 0.1, 0.01], milestones=[12000, 16000, MAX_ITER]),
    warmup_length=1000 / MAX_ITER,
    warmup_method="linear",
    warmup_factor=0.001,
)

train.max_iter = MAX_ITER
train.eval_period = 6000
train.checkpointer.period = 6000
