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
from PIL import Image
from detectron2.config import instantiate
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from omegaconf import DictConfig, OmegaConf

from .checkpoint import E3VACheckpointer
from .engine.training import resolve_device

__all__ = [
    "ImageReadError", "LazyPredictor", "config_device", "input_format_of", "model_input", "read_image",
    "test_augmentations",
]

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


class ImageReadError(OSError):
    """An image file that cannot be read (missing, truncated, corrupted, or no image at all)."""


# Pillow's modes for one-channel images deeper than 8 bits (a 16-bit PNG opens as "I;16" or "I").
_DEEP_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def read_image(path: str, format: str = "BGR") -> np.ndarray:
    """Detectron2's ``read_image`` (HWC uint8 in ``format``, EXIF orientation applied), except that a 16-bit
    grayscale image is scaled from its 16-bit range to 8 bits: Pillow's conversion would clip every value
    above 255 (a white picture). A file that cannot be read raises :class:`ImageReadError` naming it."""
    try:
        with Image.open(path) as probe:
            deep = probe.mode in _DEEP_GRAY_MODES
        if not deep:
            return detection_utils.read_image(path, format=format)
        with Image.open(path) as image:
            gray = np.asarray(detection_utils._apply_exif_orientation(image), dtype=np.float32)
    except (OSError, ValueError, SyntaxError) as error:  # Pillow raises all three for damaged files
        raise ImageReadError(f"{path} cannot be read as an image ({type(error).__name__}: {error}).") from error
    gray8 = np.clip(np.rint(gray / 257.0), 0, 255).astype(np.uint8)  # 65535 -> 255, 257 -> 1
    return gray8[:, :, None] if format == "L" else np.repeat(gray8[:, :, None], 3, axis=2)


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
        """The image file as an HWC uint8 array in the model's input format (see :func:`read_image`)."""
        return read_image(path, format=self.input_format)

    def to_rgb(self, image: np.ndarray) -> np.ndarray:
        """An image in the model's input format, as RGB for drawing."""
        return detection_utils.convert_image_to_rgb(image, self.input_format)

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> Dict[str, Any]:
        """The model's outputs for one HWC image in the model's input format (``instances``, ``sem_seg``,
        ...), resized back to the image's size by the model's own post-processing."""
        return self.model([model_input(image, self.augmentations, self.device)])[0]


def model_input(image: np.ndarray, augmentations: T.AugmentationList, device: torch.device) -> Dict[str, Any]:
    """A Detectron2 model's input dict for one HWC image: resized by ``augmentations`` (the config's test-time
    ones, e.g. ResizeShortestEdge(800, 1333), as in evaluation), with the original ``height`` and ``width``
    that the model's post-processing resizes its outputs back to."""
    height, width = image.shape[:2]
    aug_input = T.AugInput(image)
    augmentations(aug_input)
    resized = aug_input.image
    if resized.ndim == 2:  # "L" format: one channel
        resized = resized[:, :, None]
    tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))).float().to(device)
    return {"image": tensor, "height": height, "width": width}
