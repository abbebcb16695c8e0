"""Single-image inference from a LazyConfig: Detectron2's ``DefaultPredictor``, for LazyConfig files.

``DefaultPredictor`` reads a yacs config (``INPUT.MIN_SIZE_TEST``, ``MODEL.WEIGHTS``, ...). Here the same
steps come from a LazyConfig: the model is ``cfg.model``, the test-time resizing is
``cfg.dataloader.test.mapper.augmentations`` (what evaluation uses), the input format is
``cfg.model.input_format``, the device ``train.device`` (checked as training checks it), and the weights
load through ``E3VACheckpointer`` (full checkpoints, Swin classification weights, trainable-only parts).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from detectron2.config import instantiate
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from omegaconf import DictConfig, OmegaConf

from .checkpoint import E3VACheckpointer
from .engine.training import resolve_device

__all__ = ["LazyPredictor", "config_device", "input_format_of", "test_augmentations"]

logger = logging.getLogger("e3va")

_FORMATS = ("BGR", "RGB", "L")  # what detection_utils.read_image and convert_image_to_rgb both handle


def input_format_of(cfg: DictConfig) -> str:
    """The model's input format: ``cfg.model.input_format``, else the test mapper's ``image_format``,
    else Detectron2's default, BGR."""
    for key in ("model.input_format", "dataloader.test.mapper.image_format"):
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            if value not in _FORMATS:
                raise ValueError(f"{key}={value!r} is not supported here; expected one of {list(_FORMATS)}.")
            return value
    return "BGR"


def test_augmentations(cfg: DictConfig) -> List[T.Augmentation]:
    """The config's test-time augmentations (``cfg.dataloader.test.mapper.augmentations``), instantiated;
    ``[]`` when the config has none (the image goes in at its own size)."""
    augmentations = OmegaConf.select(cfg, "dataloader.test.mapper.augmentations", default=None)
    return [] if augmentations is None else list(instantiate(augmentations))


def config_device(cfg: DictConfig) -> torch.device:
    """``train.device`` checked by :func:`e3va.engine.training.resolve_device` (a CUDA config without
    CUDA is an error that names the ``train.device=cpu`` override); without one, CUDA when available."""
    if OmegaConf.select(cfg, "train.device", default=None) is not None:
        return resolve_device(cfg)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LazyPredictor:
    """Builds ``cfg.model``, loads ``weights`` (in order: e.g. base weights, then a trainable-only part)
    and predicts one image at a time, at the image's own resolution."""

    def __init__(
        self,
        cfg: DictConfig,
        weights: Union[str, Sequence[str]],
        device: Optional[torch.device] = None,
    ) -> None:
        self.device = device if device is not None else config_device(cfg)
        self.input_format = input_format_of(cfg)
        self.augmentations = T.AugmentationList(test_augmentations(cfg))
        self.model = instantiate(cfg.model).to(self.device).eval()
        checkpointer = E3VACheckpointer(self.model)
        for path in [weights] if isinstance(weights, str) else list(weights):
            checkpointer.load(path)

    def read(self, path: str) -> np.ndarray:
        """The image file as an HWC uint8 array in the model's input format (EXIF orientation applied)."""
        return detection_utils.read_image(path, format=self.input_format)

    def to_rgb(self, image: np.ndarray) -> np.ndarray:
        """An image in the model's input format, as RGB for drawing."""
        return detection_utils.convert_image_to_rgb(image, self.input_format)

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> Dict[str, Any]:
        """The model's outputs for one HWC image in the model's input format (``instances``, ``sem_seg``,
        ...), resized back to the image's size by the model's own post-processing."""
        height, width = image.shape[:2]
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)  # e.g. ResizeShortestEdge(800, 1333), as in evaluation
        resized = aug_input.image
        if resized.ndim == 2:  # "L" format: one channel
            resized = resized[:, :, None]
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))).float().to(self.device)
        return self.model([{"image": tensor, "height": height, "width": width}])[0]
