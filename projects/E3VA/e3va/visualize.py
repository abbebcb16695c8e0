"""Drawing predictions and ground truth with Detectron2's ``Visualizer``.

Every function takes and returns RGB uint8 images; a drawn image is ``scale`` times the input's size,
so the panels of one image can be put side by side (:func:`save_panels`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.structures import Instances
from detectron2.utils.visualizer import ColorMode, Visualizer

__all__ = [
    "draw_ground_truth",
    "draw_instance_predictions",
    "draw_predictions",
    "draw_semantic_predictions",
    "save_panels",
    "semantic_labels",
    "save_side_by_side",
]


def draw_instance_predictions(
    image_rgb: np.ndarray, instances: Instances, metadata, score_thresh: float = 0.5, scale: float = 2.0
) -> np.ndarray:
    """Boxes, masks and labels of the predictions scoring at least ``score_thresh``, as an RGB image."""
    keep = instances[instances.scores >= score_thresh].to("cpu")
    visualizer = Visualizer(image_rgb, metadata, scale=scale, instance_mode=ColorMode.IMAGE)
    return visualizer.draw_instance_predictions(keep).get_image()


def draw_ground_truth(image_rgb: np.ndarray, dataset_dict: Dict, metadata, scale: float = 2.0) -> np.ndarray:
    """The annotations of a Detectron2 dataset dict, as an RGB image."""
    return Visualizer(image_rgb, metadata, scale=scale).draw_dataset_dict(dataset_dict).get_image()


def semantic_labels(sem_seg: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The per-pixel class (argmax over the ``(C, H, W)`` scores) at ``height`` x ``width``, on the CPU.

    Detectron2's models already return scores at the input's size; a map of another size (e.g. a model
    that skips post-processing) is resized with nearest neighbours, so no label is invented."""
    if sem_seg.dim() != 3:
        raise ValueError(f"sem_seg must be (C, H, W) class scores, got shape {tuple(sem_seg.shape)}.")
    labels = sem_seg.argmax(dim=0).cpu()
    if tuple(labels.shape) != (height, width):
        labels = F.interpolate(labels[None, None].float(), size=(height, width), mode="nearest")[0, 0].long()
    return labels


def _with_stuff_classes(metadata, num_classes: int):
    """``metadata``, or a copy that names classes by index when it has no ``stuff_classes`` (the
    Visualizer needs them to draw a semantic map)."""
    if metadata.get("stuff_classes", None) is not None:
        return metadata
    fields = {k: v for k, v in vars(metadata).items() if k != "name"}
    names = [str(i) for i in range(num_classes)]
    return Metadata(name=f"{metadata.name} (classes by index)", **fields, stuff_classes=names)


def draw_semantic_predictions(
    image_rgb: np.ndarray, sem_seg: torch.Tensor, metadata, scale: float = 2.0, alpha: float = 0.5
) -> np.ndarray:
    """The argmax of semantic scores ``(C, H, W)`` drawn over the image, with the classes' names and
    colours from ``metadata.stuff_classes`` / ``stuff_colors`` (class indices when it has none)."""
    labels = semantic_labels(sem_seg, *image_rgb.shape[:2])
    metadata = _with_stuff_classes(metadata, int(sem_seg.shape[0]))
    visualizer = Visualizer(image_rgb, metadata, scale=scale)
    return visualizer.draw_sem_seg(labels, alpha=alpha).get_image()


def draw_predictions(
    image_rgb: np.ndarray,
    outputs: Mapping[str, Any],
    metadata,
    score_thresh: float = 0.5,
    scale: float = 2.0,
) -> List[np.ndarray]:
    """One panel per kind of prediction in a Detectron2 model's ``outputs`` for one image: the
    ``instances`` (boxes, masks, labels scoring at least ``score_thresh``), then the ``sem_seg`` argmax."""
    panels = []
    if "instances" in outputs:
        panels.append(draw_instance_predictions(image_rgb, outputs["instances"], metadata, score_thresh, scale))
    if "sem_seg" in outputs:
        panels.append(draw_semantic_predictions(image_rgb, outputs["sem_seg"], metadata, scale))
    if not panels:
        raise ValueError(
            f"Nothing to draw: the model's outputs have keys {sorted(outputs)}; expected 'instances' "
            "and/or 'sem_seg'."
        )
    return panels


def save_panels(path: Path, panels: Sequence[np.ndarray]) -> Path:
    """Writes RGB ``panels`` side by side, left to right, as one image file (PNG by its suffix).

    Panels of different heights are padded at the bottom with black."""
    if not panels:
        raise ValueError(f"No panels to write to {path}.")
    height = max(p.shape[0] for p in panels)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0))) for p in panels]
    image = np.concatenate(padded, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.ascontiguousarray(image[:, :, ::-1])):
        raise OSError(f"Could not write {path}")
    return path


def save_side_by_side(path: Path, left: np.ndarray, right: Optional[np.ndarray] = None) -> Path:
    """Writes ``left`` (and ``right`` beside it, e.g. predictions | ground truth) as a PNG."""
    return save_panels(path, [left] if right is None else [left, right])


def metadata_of(dataset_name: str):
    """Detectron2's metadata of a registered dataset (class names and colours)."""
    return MetadataCatalog.get(dataset_name)
