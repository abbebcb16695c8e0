"""Pascal VOC detection on Detectron2's builtin registrations (``voc_2007_*``, ``voc_2012_*``)."""
from __future__ import annotations

from detectron2.data.datasets.pascal_voc import CLASS_NAMES
from detectron2.evaluation import PascalVOCDetectionEvaluator

from .roots import require_dataset_root

__all__ = ["VOC_CLASSES", "build_voc_evaluator"]

VOC_CLASSES = tuple(CLASS_NAMES)  # the 20 classes, in Detectron2's (and the devkit's) order


def build_voc_evaluator(dataset_name: str = "voc_2007_test") -> PascalVOCDetectionEvaluator:
    """``PascalVOCDetectionEvaluator(dataset_name)`` (AP, AP50, AP75 under "bbox"), after checking
    the dataset's files.

    Use it in configs instead of the evaluator itself: the evaluator only records paths in its
    constructor and would fail on the first missing annotation file after the whole inference pass.
    """
    require_dataset_root(dataset_name)
    return PascalVOCDetectionEvaluator(dataset_name)
