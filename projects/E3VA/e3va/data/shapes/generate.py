"""The shapes files on disk: a split's images and COCO json (:func:`generate_shapes_dataset`) and its
semantic labels (:func:`generate_shapes_sem_seg`), each generated once, safely when several processes ask
at the same time, and regenerated when their parameters or the generator change."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

import cv2
import numpy as np
from pycocotools import mask as mask_util

from ...atomic import atomic_write_bytes, file_lock
from .render import SHAPES_CLASSES, render_shapes_image


# "val" is the split results are reported on; "minival" (same distribution, its own seed stream) is for
# choosing hyper-parameters, such as the transfer study's learning rates, without looking at "val".
SHAPES_SPLITS: Tuple[str, ...] = ("train", "val", "minival")

# Semantic segmentation: the shape classes keep their contiguous ids 0..3, background is class 4,
# and 255 (Detectron2's ignore value) marks no pixel of the labels, only padding and crops.
SHAPES_SEM_SEG_CLASSES: Tuple[str, ...] = (*SHAPES_CLASSES, "background")
SHAPES_SEM_SEG_BACKGROUND: int = len(SHAPES_CLASSES)
SHAPES_SEM_SEG_IGNORE: int = 255

# Bump when the drawing code changes: stored in the json, so old files get regenerated.
_GENERATOR_VERSION = 1
# Bump when the semantic labels change (layout, class ids, background policy): stored in
# <split>_sem_seg/info.json, so old labels get regenerated. The COCO files are not affected.
_SEM_SEG_VERSION = 1
_SEM_SEG_INFO = "info.json"
_SPLIT_IDS = {"train": 0, "val": 1, "minival": 2}


def _check_split(split: str) -> None:
    if split not in SHAPES_SPLITS:
        raise ValueError(f"Unknown shapes split {split!r}; expected one of {list(SHAPES_SPLITS)}.")


def _rebuild_unless_up_to_date(
    directory: Path, stamp: Path, lock: Path, up_to_date: Callable[[], bool], build: Callable[[], None]
) -> None:
    """Runs ``build`` (which writes ``directory``'s PNGs, then ``stamp``) unless ``up_to_date()``.

    Several processes (DDP ranks, a loader and an evaluator) may ask for the same files at once: the check
    is repeated under ``lock``, so the second one finds the first one's files instead of rewriting them.
    """
    if up_to_date():
        return
    directory.mkdir(parents=True, exist_ok=True)
    with file_lock(lock):
        if up_to_date():  # another process just made them
            return
        # Remove the stamp first: an interrupted run must not leave it next to half-new files.
        stamp.unlink(missing_ok=True)
        for stale in directory.glob("*.png"):
            stale.unlink()
        build()


def _write_png(path: Path, image: np.ndarray) -> None:
    ok, png = cv2.imencode(".png", image)
    if not ok:  # pragma: no cover
        raise RuntimeError(f"cv2 could not encode {path}")
    atomic_write_bytes(png.tobytes(), path, durable=False)  # cheap to regenerate: no fsync per image


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    # Compact, unlike e3va.atomic.atomic_write_json: the format (and bytes) the files have always had.
    atomic_write_bytes(json.dumps(data).encode(), path)


def _generation_params(split: str, num_images: int, image_size: int, seed: int) -> Dict[str, Any]:
    return {
        "generator": "e3va.data.shapes",
        "version": _GENERATOR_VERSION,
        "split": split,
        "num_images": num_images,
        "image_size": image_size,
        "seed": seed,
    }


def _is_up_to_date(json_path: Path, image_dir: Path, params: Dict[str, Any]) -> bool:
    try:
        with open(json_path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    if data.get("info", {}).get("parameters") != params:
        return False
    # The json is written last, but images may have been deleted since.
    return all((image_dir / im["file_name"]).is_file() for im in data.get("images", []))


def _write_coco_split(json_path: Path, image_dir: Path, params: Dict[str, Any]) -> None:
    """Draws the split's images into ``image_dir``, then writes their COCO json."""
    split, num_images, image_size, seed = (params[k] for k in ("split", "num_images", "image_size", "seed"))
    images, annotations = [], []
    for i in range(num_images):
        rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_IDS[split], i]))
        image, instances = render_shapes_image(rng, image_size)
        file_name = f"{i:06d}.png"
        _write_png(image_dir / file_name, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        images.append({"id": i + 1, "file_name": file_name, "height": image_size, "width": image_size})
        for inst in instances:
            rle = mask_util.encode(np.asfortranarray(inst["mask"]))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": inst["class"] + 1,
                    "segmentation": inst["polygons"],
                    "area": float(mask_util.area(rle)),
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    data = {
        "info": {"description": "E3VA synthetic shapes", "parameters": params},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [
            {"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(SHAPES_CLASSES)
        ],
    }
    _write_json(json_path, data)


def generate_shapes_dataset(
    root: Union[str, Path], split: str, num_images: int, image_size: int = 128, seed: int = 0
) -> Path:
    """Writes ``root/<split>/*.png`` and ``root/<split>.json`` (COCO format) and returns the json path.

    Does nothing if the json already exists with the same parameters (kept in its ``info`` field).
    Image ``i`` depends only on ``(seed, split, i, image_size)``, so the same arguments give
    byte-identical files. Annotations use polygons (exact for the visible masks), 1-based category ids.
    """
    _check_split(split)
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive int, got {num_images!r}.")
    if not isinstance(image_size, int) or image_size < 32:
        raise ValueError(f"image_size must be an int >= 32 (pixels), got {image_size!r}.")
    root = Path(root).expanduser()
    json_path = root / f"{split}.json"
    image_dir = root / split
    params = _generation_params(split, num_images, image_size, seed)
    _rebuild_unless_up_to_date(
        image_dir, json_path, root / f".{split}.lock",
        up_to_date=lambda: _is_up_to_date(json_path, image_dir, params),
        build=lambda: _write_coco_split(json_path, image_dir, params),
    )
    return json_path


def semantic_label(annotations: Sequence[Dict[str, Any]], height: int, width: int) -> np.ndarray:
    """The uint8 (height, width) semantic label of one image from its COCO annotations (1-based
    ``category_id``, polygon ``segmentation``): the shape's 0-based class where it is visible,
    ``SHAPES_SEM_SEG_BACKGROUND`` elsewhere. The shapes' visible masks never overlap."""
    label = np.full((height, width), SHAPES_SEM_SEG_BACKGROUND, np.uint8)
    for ann in annotations:
        rle = mask_util.merge(mask_util.frPyObjects(ann["segmentation"], height, width))
        label[mask_util.decode(rle).astype(bool)] = ann["category_id"] - 1
    return label


def _sem_seg_params(coco_params: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "generator": "e3va.data.shapes.sem_seg",
        "version": _SEM_SEG_VERSION,
        "classes": list(SHAPES_SEM_SEG_CLASSES),
        "coco": coco_params,
    }


def _sem_seg_is_up_to_date(label_dir: Path, params: Dict[str, Any], file_names: Sequence[str]) -> bool:
    try:
        with open(label_dir / _SEM_SEG_INFO) as f:
            info = json.load(f)
    except (OSError, ValueError):
        return False
    return info.get("parameters") == params and all((label_dir / name).is_file() for name in file_names)


def _write_sem_seg_labels(label_dir: Path, coco: Dict[str, Any], params: Dict[str, Any]) -> None:
    """Rasterises the COCO split's polygons into ``label_dir``, one PNG per image, then its info.json."""
    per_image: Dict[int, List[Dict[str, Any]]] = {im["id"]: [] for im in coco["images"]}
    for ann in coco["annotations"]:
        per_image[ann["image_id"]].append(ann)
    for im in coco["images"]:
        _write_png(label_dir / im["file_name"], semantic_label(per_image[im["id"]], im["height"], im["width"]))
    info = {
        "description": "E3VA synthetic shapes, semantic labels",
        "parameters": params,
        "ignore_label": SHAPES_SEM_SEG_IGNORE,
    }
    _write_json(label_dir / _SEM_SEG_INFO, info)


def generate_shapes_sem_seg(
    root: Union[str, Path], split: str, num_images: int, image_size: int = 128, seed: int = 0
) -> Path:
    """Writes the semantic labels ``root/<split>_sem_seg/*.png`` and returns that directory.

    First makes sure the COCO split exists (:func:`generate_shapes_dataset`, same arguments), then
    rasterises its polygons with :func:`semantic_label`: one single-channel uint8 PNG per image, with
    the image's file name. Does nothing if ``<split>_sem_seg/info.json`` records the same parameters
    (those of the COCO split included) and every label is there. Same arguments, same bytes.
    """
    json_path = generate_shapes_dataset(root, split, num_images, image_size, seed)
    root = json_path.parent
    with open(json_path) as f:
        coco = json.load(f)
    params = _sem_seg_params(coco["info"]["parameters"])
    label_dir = root / f"{split}_sem_seg"
    file_names = [im["file_name"] for im in coco["images"]]
    _rebuild_unless_up_to_date(
        label_dir, label_dir / _SEM_SEG_INFO, root / f".{split}_sem_seg.lock",
        up_to_date=lambda: _sem_seg_is_up_to_date(label_dir, params, file_names),
        build=lambda: _write_sem_seg_labels(label_dir, coco, params),
    )
    return label_dir
