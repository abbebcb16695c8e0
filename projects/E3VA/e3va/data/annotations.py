"""Dropping instance annotations that cannot train anything, with a count in the log.

Detectron2's ``DatasetMapper`` clips each box to the image and drops the empty ones per batch, silently
(``filter_empty_instances``); an image whose annotations are all such boxes still trains, with no
instance at all. Dropping them once, when the dataset is loaded, says how many there were, and lets
Detectron2's ``filter_images_with_only_crowd_annotations`` drop the images left without annotations.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional

from detectron2.structures import BoxMode

__all__ = ["drop_degenerate_boxes", "is_degenerate_box"]

logger = logging.getLogger(__name__)

_ABSOLUTE_MODES = (BoxMode.XYXY_ABS, BoxMode.XYWH_ABS)  # the only modes Detectron2's mapper takes for boxes


def is_degenerate_box(annotation: Mapping[str, Any], width: Optional[int], height: Optional[int]) -> bool:
    """True when the annotation's box is empty once clipped to its ``width`` x ``height`` image (as
    Detectron2's mapper clips it): zero (or negative) width or height, or wholly outside the image.
    Boxes in other modes (relative, rotated) and annotations without a box are kept."""
    box, mode = annotation.get("bbox"), annotation.get("bbox_mode", BoxMode.XYWH_ABS)
    if box is None or len(box) != 4 or BoxMode(mode) not in _ABSOLUTE_MODES:
        return False
    x0, y0, x1, y1 = BoxMode.convert(list(map(float, box)), BoxMode(mode), BoxMode.XYXY_ABS)
    if width is not None and height is not None:
        x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height))
    return not (x1 > x0 and y1 > y0)


def drop_degenerate_boxes(dataset_dicts: List[Dict[str, Any]], source: str = "") -> List[Dict[str, Any]]:
    """``dataset_dicts`` without the annotations :func:`is_degenerate_box` finds; logs how many were dropped
    and from how many images (with one example). The records are copied, not changed in place: a
    registration may hand out its cached list."""
    dropped = images = 0
    example = ""
    kept_dicts = []
    for record in dataset_dicts:
        annotations = record.get("annotations")
        if not annotations:
            kept_dicts.append(record)
            continue
        size = (record.get("width"), record.get("height"))
        bad = [is_degenerate_box(a, *size) for a in annotations]
        if any(bad):
            dropped += sum(bad)
            images += 1
            if not example:
                box = list(annotations[bad.index(True)]["bbox"])
                example = f" (e.g. bbox {box} in {record.get('file_name', '?')}, {size[0]}x{size[1]})"
            record = {**record, "annotations": [a for a, b in zip(annotations, bad) if not b]}
        kept_dicts.append(record)
    if dropped:
        logger.warning(
            f"Dropped {dropped} annotation(s) in {images} image(s){' of ' + source if source else ''} whose box is "
            f"empty or wholly outside the image{example}."
        )
    return kept_dicts
