"""Two tasks trained together on one frozen trunk pass per batch: E3VA Mask R-CNN and E3VA UperNet on shapes.

``e3va.multitask.MultiTaskModel`` holds the two single-task models of ``mask_rcnn_e3va.py`` and
``semseg_upernet_e3va.py`` on one nano Swin trunk: each batch runs the trunk once, with both highways beside
it, then each task's FPN and heads; the loss is the sum of the tasks' losses (``loss_weights``). The shapes
images carry both kinds of labels (``e3va.data.joint.with_semantic_labels``). Evaluation runs both tasks in one
pass (box/mask AP as ``detect/bbox``, ``detect/segm``; mIoU as ``segment/sem_seg``). At the end, one
trainable-only file per task, ``<output_dir>/<task>_trainable.pth``, loadable into the single-task config
(``train.trainable_checkpoint``) or served with tools/multitask_infer.py.

    .venv/bin/python tools/lazyconfig_train_net.py --config-file configs/Shapes/multitask_e3va.py
"""
from detectron2.config import LazyCall as L
from detectron2.data import DatasetMapper, build_detection_test_loader, build_detection_train_loader
from detectron2.data import transforms as T
from omegaconf import OmegaConf

from e3va.data.joint import with_semantic_labels
from e3va.multitask import MultiTaskModel, TaskEvaluator, task_models
from e3va.swin import NANO_IMAGE_FORMAT

from .mask_rcnn_e3va import dataloader as detect_data, lr_multiplier, model as detect_model, optimizer, train
from .semseg_upernet_e3va import dataloader as segment_data, model as segment_model

model = L(MultiTaskModel)(
    models=L(task_models)(detect=detect_model, segment=segment_model),
    loss_weights={"detect": 1.0, "segment": 1.0},
    check_weights=False,  # the base weights load into the shared trunk after construction (train.init_checkpoint)
)

# ---- data: the shapes images with their instances and their semantic labels, flipped together
dataloader = OmegaConf.create()
dataloader.train = L(build_detection_train_loader)(
    dataset=L(with_semantic_labels)(instances="shapes_train", sem_seg="shapes_sem_seg_train"),
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
    dataset=L(with_semantic_labels)(instances="shapes_val", sem_seg="shapes_sem_seg_val"),
    mapper=L(DatasetMapper)(is_train=False, augmentations=[], image_format=NANO_IMAGE_FORMAT),
    num_workers=1,
)
dataloader.evaluator = [
    L(TaskEvaluator)(task="detect", evaluator=detect_data.evaluator),
    L(TaskEvaluator)(task="segment", evaluator=segment_data.evaluator),
]
dataloader.evaluator[1].evaluator.dataset_name = "shapes_sem_seg_val"

# ---- schedule: the detector's (AdamW 1e-3, one decay step), for both tasks
train.output_dir = "./output/shapes_multitask_e3va"
