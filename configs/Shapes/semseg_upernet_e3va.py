"""E3VA UperNet semantic segmentation on the synthetic shapes task, on the CPU, in minutes.

The ADE20K pipeline (configs/ADE20K/upernet_swin_b_e3va.py) at the shapes' scale: Detectron2's
``SemanticSegmentor`` with ``e3va.modeling.UperNetHead`` on the project's Swin "nano" trunk
(``e3va.NANO_SWIN_WEIGHTS``, read by ``E3VACheckpointer``; no download), the ``shapes_sem_seg_train`` /
``shapes_sem_seg_val`` datasets (Detectron2's ``load_sem_seg``; classes circle, square, triangle, star,
background; generated on first use), the ``DatasetMapper`` with multi-scale resize, crop and flip,
``SemSegEvaluator`` (mIoU, pACC), AdamW with poly decay after a warm-up.

    .venv/bin/python tools/lazyconfig_train_net.py --config-file configs/Shapes/semseg_upernet_e3va.py

Tuning method: ``model.backbone.bottom_up.tuning=fixed`` (heads only), ``lora``, ... The head uses
GroupNorm (the batch is small, and the PPM's 1x1 branch would see 4 values per channel under batch norm).
Input is BGR with ImageNet mean and std, what tools/pretrain_nano_swin.py pretrained the trunk on.
"""
import detectron2.data.transforms as T
from fvcore.common.param_scheduler import PolynomialDecayParamScheduler
from omegaconf import OmegaConf
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.evaluation import SemSegEvaluator
from detectron2.solver import WarmupParamScheduler

from e3va import NANO_SWIN_WEIGHTS
from e3va.swin import NANO_IMAGE_FORMAT, NANO_PIXEL_MEAN, NANO_PIXEL_STD
from e3va.data.sem_seg import load_sem_seg_label
from e3va.data.shapes import SHAPES_SEM_SEG_CLASSES, SHAPES_SEM_SEG_IGNORE

from ..common.models.semantic_seg_swin_e3va import model

SIZE = 128
MAX_ITER = 1000

# ---- model: the nano trunk, a 64-channel UperNet
model.backbone.bottom_up.size = "nano"
model.backbone.bottom_up.drop_path_rate = 0.0
model.sem_seg_head.num_classes = len(SHAPES_SEM_SEG_CLASSES)
model.sem_seg_head.ignore_value = SHAPES_SEM_SEG_IGNORE
model.sem_seg_head.conv_dims = 64
model.sem_seg_head.norm = "GN"
model.pixel_mean = list(NANO_PIXEL_MEAN)  # BGR, as the nano trunk's pretraining
model.pixel_std = list(NANO_PIXEL_STD)

# ---- data: Detectron2's sem-seg path on the generated shapes_sem_seg_train / shapes_sem_seg_val
dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(get_detection_dataset_dicts)(names="shapes_sem_seg_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(
                short_edge_length=[int(SIZE * r / 8) for r in range(6, 13)],  # 0.75x - 1.5x
                max_size=2 * SIZE,
                sample_style="choice",
            ),
            L(T.RandomCrop_CategoryAreaConstraint)(
                crop_type="absolute", crop_size=(SIZE, SIZE), single_category_max_area=1.0,
                ignored_category=SHAPES_SEM_SEG_IGNORE,
            ),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format=NANO_IMAGE_FORMAT,
    ),
    total_batch_size=4,
    num_workers=1,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="shapes_sem_seg_val", filter_empty=False),
    mapper=L(DatasetMapper)(is_train=False, augmentations=[], image_format=NANO_IMAGE_FORMAT),
    num_workers=1,
)
# Detectron2's own label reader fails under NumPy 2; see e3va.data.sem_seg.
dataloader.evaluator = L(SemSegEvaluator)(
    dataset_name="${..test.dataset.names}", sem_seg_loading_fn=load_sem_seg_label
)

# ---- schedule: AdamW, poly decay after a short warm-up
optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.lr = 1e-3
optimizer.weight_decay = 0.01

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(PolynomialDecayParamScheduler)(base_value=1.0, power=1.0),
    warmup_length=50 / MAX_ITER,
    warmup_factor=0.01,
)

train = model_zoo.get_config("common/train.py").train
train.device = "cpu"
train.max_iter = MAX_ITER
train.init_checkpoint = str(NANO_SWIN_WEIGHTS)
train.output_dir = "./output/shapes_semseg_upernet_e3va"
train.log_period = 20
train.eval_period = MAX_ITER
train.checkpointer.period = MAX_ITER
