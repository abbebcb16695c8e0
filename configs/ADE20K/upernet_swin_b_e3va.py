"""UperNet on an E3VA-tuned Swin-B, ADE20K-150 semantic segmentation, 512x512 crops, 160k iterations.

Swin's segmentation recipe (Liu et al., 2021; mmsegmentation's
``upernet_swin_base_patch4_window12_512x512_160k_ade20k_pretrain_384x384_22K``) through Detectron2's own
pieces: ``SemanticSegmentor`` with ``e3va.modeling.UperNetHead`` (512 channels, SyncBN), the builtin
``ade20k_sem_seg_train`` / ``ade20k_sem_seg_val`` registration (150 classes, ignore 255), the
``DatasetMapper`` with multi-scale resize (short side 256-1024, long side <= 2048), 512x512
``RandomCrop_CategoryAreaConstraint`` (no class over 75% of a crop: mmsegmentation's ``cat_max_ratio``)
and flip, as Detectron2's sem-seg / Mask2Former ADE20K recipes (no photometric distortion),
``SemSegEvaluator`` (mIoU, fwIoU, mACC, pACC) on the whole image at short side 512. AdamW (lr 6e-5,
weight decay 0.01, none on norms and position-bias tables), poly decay after a 1500-iteration linear
warm-up, batch 16 (2 per GPU on 8 GPUs), mixed precision. Trunk: ImageNet-22k Swin-B, window 12 (the
384x384 release, as the recipe), drop path 0.3. Swin's recipe also trains an auxiliary FCN head on
stage 3 (loss weight 0.4); this config does not.

    export DETECTRON2_DATASETS=/path/to/datasets   # holds ADEChallengeData2016 (Detectron2's layout,
                                                   # annotations_detectron2/ from prepare_ade20k_sem_seg.py)
    .venv/bin/python tools/lazyconfig_train_net.py --num-gpus 8 --config-file configs/ADE20K/upernet_swin_b_e3va.py

The tuning method is the usual one override, ``model.backbone.bottom_up.tuning=e3va_plus`` (the Swin is
``model.backbone.bottom_up``; ``model.backbone`` is an ``IdentityNeck``). With one image per GPU add
``model.sem_seg_head.norm=GN`` (batch norm cannot train the PPM's 1x1 branch on one image). For
Detectron2's lighter ``SemSegFPNHead`` on an FPN instead of UperNet, import ``model_fpn as model`` from
configs/common/models/semantic_seg_swin_e3va.py and set its ``num_classes`` and Swin as below.
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
)
from detectron2.evaluation import SemSegEvaluator
from detectron2.solver import WarmupParamScheduler

from e3va import SWIN_PRETRAINED_URLS
from e3va.data.roots import dataset_dicts
from e3va.data.sem_seg import load_sem_seg_label

from ..common.models.semantic_seg_swin_e3va import model

CROP = 512
MAX_ITER = 160000

# ---- model: Swin-B, window 12 (the 384x384 ImageNet-22k release)
model.backbone.bottom_up.size = "B"
model.backbone.bottom_up.window_size = 12
model.backbone.bottom_up.drop_path_rate = 0.3
model.sem_seg_head.num_classes = 150

# ---- data: Detectron2's builtin ADE20K registration and DatasetMapper (sem_seg_file_name -> "sem_seg");
# dataset_dicts checks the files first: a missing root names the expected layout (e3va.data.roots).
dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(dataset_dicts)(names="ade20k_sem_seg_train"),
    mapper=L(DatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(
                short_edge_length=[int(CROP * r / 10) for r in range(5, 21)],  # 0.5x - 2.0x of 512
                max_size=4 * CROP,
                sample_style="choice",
            ),
            L(T.RandomCrop_CategoryAreaConstraint)(
                crop_type="absolute", crop_size=(CROP, CROP), single_category_max_area=0.75, ignored_category=255
            ),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="RGB",
    ),
    total_batch_size=16,
    num_workers=4,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(dataset_dicts)(names="ade20k_sem_seg_val", filter_empty=False),
    mapper=L(DatasetMapper)(
        is_train=False,
        augmentations=[L(T.ResizeShortestEdge)(short_edge_length=CROP, max_size=4 * CROP)],
        image_format="RGB",
    ),
    num_workers=4,
)
# Detectron2's own label reader fails under NumPy 2; see e3va.data.sem_seg.
dataloader.evaluator = L(SemSegEvaluator)(
    dataset_name="${..test.dataset.names}", sem_seg_loading_fn=load_sem_seg_label
)

# ---- optimizer and schedule: Swin's UperNet recipe
optimizer = model_zoo.get_config("common/optim.py").AdamW
optimizer.lr = 6e-5
optimizer.betas = (0.9, 0.999)
optimizer.weight_decay = 0.01
optimizer.params.weight_decay_norm = 0.0
optimizer.params.overrides = {
    "absolute_pos_embed": {"weight_decay": 0.0},
    "relative_position_bias_table": {"weight_decay": 0.0},
}

lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(PolynomialDecayParamScheduler)(base_value=1.0, power=1.0),
    warmup_length=1500 / MAX_ITER,
    warmup_factor=1e-6,
)

train = model_zoo.get_config("common/train.py").train
train.max_iter = MAX_ITER
train.amp.enabled = True
train.init_checkpoint = SWIN_PRETRAINED_URLS["B_in22k_w12"]
train.output_dir = "./output/ade20k_upernet_swin_b_e3va"
train.eval_period = 16000
train.checkpointer.period = 16000
