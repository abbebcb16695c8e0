"""Drawing predictions and ground truth with Detectron2's ``Visualizer``."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import cv2
import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.structures import Instances
from detectron2.utils.visualizer import ColorMode, Visualizer

__all__ = ["draw_ground_truth", "draw_instance_predictions", "save_side_by_side"]


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


def save_side_by_side(path: Path, left: np.ndarray, right: Optional[np.ndarray] = None) -> Path:
    """Writes ``left`` (and ``right`` beside it, e.g. predictions | ground truth) as a PNG."""
    image = left if right is None else np.concatenate([left, right], axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image[:, :, ::-1]):
        raise OSError(f"Could not write {path}")
    return path


def metadata_of(dataset_name: str):
    """Detectron2's metadata of a registered dataset (class names and colours)."""
    return MetadataCatalog.get(dataset_name)
