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
from omegaconf import OmegaConf

from e3va.data.joint import with_semantic_labels
from e3va.multitask import MultiTaskModel, TaskEvaluator, task_models

# The detector's schedule (AdamW 1e-3, one decay step) and train settings, for both tasks.
from .mask_rcnn_e3va import lr_multiplier, optimizer, train  # noqa: F401 (config entries)
from .mask_rcnn_e3va import dataloader as detect_data, model as detect_model
from .semseg_upernet_e3va import dataloader as segment_data, model as segment_model

model = L(MultiTaskModel)(
    models=L(task_models)(detect=detect_model, segment=segment_model),
    loss_weights={"detect": 1.0, "segment": 1.0},
    check_weights=False,  # the base weights load into the shared trunk after construction (train.init_checkpoint)
)

# ---- data: the detector's loaders (flip, batch 4), on the shapes images with both kinds of labels
dataloader = OmegaConf.create()
dataloader.train = detect_data.train
dataloader.train.dataset = L(with_semantic_labels)(instances="shapes_train", sem_seg="shapes_sem_seg_train")
dataloader.test = detect_data.test
dataloader.test.dataset = L(with_semantic_labels)(instances="shapes_val", sem_seg="shapes_sem_seg_val")
dataloader.evaluator = [
    L(TaskEvaluator)(task="detect", evaluator=detect_data.evaluator),
    L(TaskEvaluator)(task="segment", evaluator=segment_data.evaluator),
]
dataloader.evaluator[1].evaluator.dataset_name = "shapes_sem_seg_val"

train.output_dir = "./output/shapes_multitask_e3va"
