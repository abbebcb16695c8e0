"""Semantic segmentation ground truth for Detectron2's ``SemSegEvaluator``, with NumPy 2.

``SemSegEvaluator`` reads each label file with ``load_image_into_numpy_array``, which calls
``np.array(image, copy=False, dtype=int)``. NumPy 2 made ``copy=False`` mean "never copy" and raises
``ValueError: Unable to avoid copy`` on that call (a PIL image converted to another dtype cannot be
viewed without a copy), so the stock evaluator fails on its first image. The configs pass
:func:`load_sem_seg_label` instead::

    dataloader.evaluator = L(SemSegEvaluator)(dataset_name=..., sem_seg_loading_fn=load_sem_seg_label)
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
from detectron2.utils.file_io import PathManager
from PIL import Image

__all__ = ["load_sem_seg_label"]


def load_sem_seg_label(
    filename: str, copy: bool = False, dtype: Optional[Union[np.dtype, str, type]] = None
) -> np.ndarray:
    """The label image ``filename`` as a numpy array of ``dtype``, as ``SemSegEvaluator`` expects.

    Same signature as Detectron2's ``load_image_into_numpy_array``; ``copy`` is accepted for that
    and ignored (the array never shares memory with the closed file's image).
    """
    with PathManager.open(filename, "rb") as f:
        return np.array(Image.open(f), dtype=dtype)
