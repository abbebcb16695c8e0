"""Detectron2's COCO dataloader (its ``common/data/coco.py``: ``coco_2017_train``, ``coco_2017_val``), with the
files checked first: Detectron2's builtin registration reads them under ``$DETECTRON2_DATASETS/coco``, and a
missing root is an error that names what is missing and the expected layout (``e3va.data.roots``) instead of
a bare FileNotFoundError on one file."""
from detectron2 import model_zoo
from detectron2.config import LazyCall as L

from e3va.data.roots import dataset_dicts

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
dataloader.train.dataset = L(dataset_dicts)(names="coco_2017_train")
dataloader.test.dataset = L(dataset_dicts)(names="coco_2017_val", filter_empty=False)
