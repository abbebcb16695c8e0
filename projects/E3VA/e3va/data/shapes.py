"""A deterministic synthetic "shapes" instance-segmentation dataset, in COCO format, with semantic labels.

Each image is a textured background (smooth noise, stripes and checkers, mixed differently per image)
with a few filled, coloured geometric shapes that may overlap; later shapes occlude earlier ones and the
instance masks are the *visible* parts. Everything is drawn with numpy/cv2 from a seed, so the same
parameters always give byte-identical files.

The datasets are registered through Detectron2's own COCO machinery (``load_coco_json``, metadata with
``json_file`` / ``image_root`` / ``evaluator_type="coco"``), so training and evaluation run the real
COCO code path. Registration is cheap: the files are generated the first time they are needed.

Typical use in a LazyConfig::

    from e3va.data.shapes import SHAPES_CLASSES, build_shapes_evaluator
    dataloader.train.dataset = L(get_detection_dataset_dicts)(names="shapes_train")
    dataloader.evaluator = L(build_shapes_evaluator)(dataset_name="shapes_val")

Build the evaluator with :func:`build_shapes_evaluator` (not ``COCOEvaluator`` directly): the
evaluator reads the json file when it is constructed, which may be before anything has loaded the
dataset.

**Semantic segmentation.** The same images also come as a semantic segmentation dataset,
``shapes_sem_seg_train`` / ``shapes_sem_seg_val``, registered as Detectron2 registers ADE20K: its own
``load_sem_seg`` loader, metadata ``stuff_classes``, ``ignore_label=255``, ``evaluator_type="sem_seg"``
(``SemSegEvaluator``). Each image ``<split>/NNNNNN.png`` gets a label image ``<split>_sem_seg/NNNNNN.png``
(uint8, one channel): the class index 0..3 of the shape visible at the pixel (``SHAPES_CLASSES``, the
contiguous ids the COCO registration uses) and 4 (``"background"``) everywhere else. Background is a
class of its own, not ignored: telling shape from texture is half the task, and mIoU then scores it.
No pixel is 255; that value is left for padding and crops. The labels are made from the COCO json's
polygons (exact for the visible masks, see :func:`_mask_to_polygons`), so they agree with the instance
annotations by construction, and generated lazily too, after the COCO files, which they leave as they
were::

    dataloader.train.dataset = L(get_detection_dataset_dicts)(names="shapes_sem_seg_train")
    dataloader.evaluator = L(SemSegEvaluator)(
        dataset_name="shapes_sem_seg_val", sem_seg_loading_fn=load_sem_seg_label)  # e3va.data.sem_seg

``SemSegEvaluator`` loads its dataset in its constructor, which generates the files if needed (see
configs/Shapes/semseg_upernet_e3va.py).
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json, load_sem_seg
from detectron2.evaluation import COCOEvaluator
from pycocotools import mask as mask_util

from ..atomic import atomic_open

try:  # POSIX only; elsewhere concurrent generators simply race (they write identical bytes).
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

__all__ = [
    "SHAPES_CLASSES",
    "SHAPES_SEM_SEG_BACKGROUND",
    "SHAPES_SEM_SEG_CLASSES",
    "SHAPES_SEM_SEG_IGNORE",
    "SHAPES_SPLITS",
    "DEFAULT_SHAPES_NAMES",
    "DEFAULT_SHAPES_SEM_SEG_NAMES",
    "build_shapes_evaluator",
    "default_shapes_root",
    "ensure_shapes_dataset",
    "ensure_shapes_sem_seg_dataset",
    "generate_shapes_dataset",
    "generate_shapes_sem_seg",
    "register_shapes_datasets",
    "register_shapes_sem_seg_datasets",
    "render_background",
    "render_shapes_image",
    "semantic_label",
]

SHAPES_CLASSES: Tuple[str, ...] = ("circle", "square", "triangle", "star")
# "val" is the split results are reported on; "minival" (same distribution, its own seed stream) is for
# choosing hyper-parameters, such as the transfer study's learning rates, without looking at "val".
SHAPES_SPLITS: Tuple[str, ...] = ("train", "val", "minival")
DEFAULT_SHAPES_NAMES: Tuple[str, str] = ("shapes_train", "shapes_val")

# Semantic segmentation: the shape classes keep their contiguous ids 0..3, background is class 4,
# and 255 (Detectron2's ignore value) marks no pixel of the labels, only padding and crops.
SHAPES_SEM_SEG_CLASSES: Tuple[str, ...] = (*SHAPES_CLASSES, "background")
SHAPES_SEM_SEG_BACKGROUND: int = len(SHAPES_CLASSES)
SHAPES_SEM_SEG_IGNORE: int = 255
DEFAULT_SHAPES_SEM_SEG_NAMES: Tuple[str, str] = ("shapes_sem_seg_train", "shapes_sem_seg_val")

# Visualisation colours (RGB), one per class, for Detectron2's Visualizer.
_THING_COLORS = [[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48]]
_STUFF_COLORS = _THING_COLORS + [[128, 128, 128]]

# Bump when the drawing code changes: stored in the json, so old files get regenerated.
_GENERATOR_VERSION = 1
# Bump when the semantic labels change (layout, class ids, background policy): stored in
# <split>_sem_seg/info.json, so old labels get regenerated. The COCO files are not affected.
_SEM_SEG_VERSION = 1
_SEM_SEG_INFO = "info.json"
_SPLIT_IDS = {"train": 0, "val": 1, "minival": 2}

# Acceptance rules for a new (occluding) shape; see _accept().
_MIN_VISIBLE_FRACTION = 0.4
_MIN_FRAGMENT_FRACTION = 0.1
_MIN_FRAGMENT_PIXELS = 12
_MIN_COLOR_DISTANCE = 90.0
_MAX_TRIES_PER_SHAPE = 30


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------
def render_background(rng: np.random.Generator, n: int) -> np.ndarray:
    """A float32 (n, n, 3) RGB texture: a random mixture of smooth noise, stripes and checkers."""
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
    # Muted colours around one base colour, so that saturated shapes stand out against any texture.
    base = rng.uniform(40, 215, size=3).astype(np.float32)
    kinds = rng.choice(3, size=int(rng.integers(1, 3)), replace=False)
    weights = rng.dirichlet(np.ones(len(kinds))).astype(np.float32)
    out = np.zeros((n, n, 3), np.float32)
    for kind, w in zip(kinds, weights):
        c1 = base + rng.normal(0, 35, size=3).astype(np.float32)
        c2 = base + rng.normal(0, 35, size=3).astype(np.float32)
        if kind == 0:  # smooth noise: a coarse random grid, upsampled
            k = int(rng.integers(3, 9))
            grid = rng.uniform(0, 1, size=(k, k, 1)).astype(np.float32)
            t = cv2.resize(grid, (n, n), interpolation=cv2.INTER_CUBIC)[..., None]
        else:
            angle = rng.uniform(0, np.pi)
            u = xx * np.cos(angle) + yy * np.sin(angle)
            if kind == 1:  # stripes, soft or hard
                freq = rng.uniform(2, 12)
                t = 0.5 + 0.5 * np.sin(2 * np.pi * freq * u + rng.uniform(0, 2 * np.pi))
                if rng.random() < 0.5:
                    t = (t > 0.5).astype(np.float32)
            else:  # (rotated) checkerboard
                v = -xx * np.sin(angle) + yy * np.cos(angle)
                cells = rng.uniform(3, 12)
                t = (np.floor(u * cells) + np.floor(v * cells)) % 2
            t = t[..., None].astype(np.float32)
        out += w * (c1 + t * (c2 - c1))
    return out


def _shape_mask(rng: np.random.Generator, n: int) -> Tuple[int, np.ndarray]:
    """A random shape, fully inside the image: (0-based class index, uint8 (n, n) filled mask)."""
    cls = int(rng.integers(len(SHAPES_CLASSES)))
    # Object extents of about n/8 .. n/2 (16-64 px at 128 px), as the demo's anchors assume.
    radius = rng.uniform(n / 16, n / 4)
    cx, cy = rng.uniform(radius + 1, n - radius - 1, size=2)
    theta = rng.uniform(0, 2 * np.pi)
    mask = np.zeros((n, n), np.uint8)
    shift = 4  # sub-pixel vertex precision for cv2
    if SHAPES_CLASSES[cls] == "circle":
        centre = (int(round(cx * (1 << shift))), int(round(cy * (1 << shift))))
        cv2.circle(mask, centre, int(round(radius * (1 << shift))), 1, -1, cv2.LINE_8, shift)
        return cls, mask
    if SHAPES_CLASSES[cls] == "square":
        angles = theta + np.pi / 4 + np.arange(4) * np.pi / 2
        radii = np.full(4, radius)
    elif SHAPES_CLASSES[cls] == "triangle":
        angles = theta + np.arange(3) * 2 * np.pi / 3
        radii = np.full(3, radius)
    else:  # star: five points, alternating outer and inner radius
        angles = theta + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, radius, radius * 0.45)
    pts = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], axis=1)
    cv2.fillPoly(mask, [np.round(pts * (1 << shift)).astype(np.int32)], 1, cv2.LINE_8, shift)
    return cls, mask


def _mask_to_polygons(mask: np.ndarray) -> Optional[List[List[float]]]:
    """COCO polygons that rasterise (with pycocotools) to exactly ``mask``, or None if impossible.

    Contours are traced on a 2x nearest-upsampled mask and mapped back to image coordinates: the
    polygon then runs a quarter pixel inside the mask's pixel edges, so every mask pixel centre is
    inside it and every other centre outside, which is pycocotools' rasterisation rule. COCO polygons
    cannot express holes, hence the exactness check.
    """
    up = np.kron(mask, np.ones((2, 2), np.uint8))
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = [((c.reshape(-1, 2) + 0.5) / 2.0).ravel().tolist() for c in contours]
    polys = [p for p in polys if len(p) >= 6]
    if not polys:
        return None
    h, w = mask.shape
    decoded = mask_util.decode(mask_util.merge(mask_util.frPyObjects(polys, h, w)))
    return polys if np.array_equal(decoded, mask) else None


def _accept(full: List[np.ndarray], visible: List[np.ndarray], cand: np.ndarray) -> Optional[List[Any]]:
    """Whether ``cand``, drawn on top, leaves every earlier shape well visible and exactly annotatable.

    Returns the earlier shapes' new (visible mask, polygons) pairs, or None to reject the candidate.
    Rejecting the occluder, rather than dropping the annotation of a shape it hides too much, keeps
    images free of visible but unannotated fragments (which would teach the model they are background).
    """
    updates: List[Any] = []
    for f, v in zip(full, visible):
        if not (v & cand).any():
            updates.append(None)
            continue
        nv = v & (1 - cand)
        area = int(f.sum())
        if nv.sum() < _MIN_VISIBLE_FRACTION * area:
            return None
        num, _, stats, _ = cv2.connectedComponentsWithStats(nv, connectivity=8)
        if stats[1:, cv2.CC_STAT_AREA].min() < max(_MIN_FRAGMENT_PIXELS, _MIN_FRAGMENT_FRACTION * area):
            return None
        polys = _mask_to_polygons(nv)
        if polys is None:
            return None
        updates.append((nv, polys))
    return updates


def render_shapes_image(
    rng: np.random.Generator, image_size: int = 128
) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """Draws one image: (uint8 RGB (H, W, 3) array, list of instances).

    Each instance is ``{"class": 0-based index into SHAPES_CLASSES, "mask": uint8 visible mask,
    "polygons": COCO polygons rasterising exactly to the mask}``, in drawing order (later on top).
    """
    n = image_size
    image = render_background(rng, n)
    target = int(rng.integers(2, 7))
    full: List[np.ndarray] = []
    visible: List[np.ndarray] = []
    polygons: List[List[List[float]]] = []
    classes: List[int] = []
    colors: List[np.ndarray] = []
    for _ in range(target):
        for _ in range(_MAX_TRIES_PER_SHAPE):
            cls, cand = _shape_mask(rng, n)
            color = rng.uniform(0, 255, size=3).astype(np.float32)
            # The shape must differ from the texture under it and from any shape it touches, or its
            # outline would be invisible while the annotation still claims it.
            under = image[cand.astype(bool)].mean(axis=0)
            if np.linalg.norm(color - under) < _MIN_COLOR_DISTANCE:
                continue
            touched = [c for c, v in zip(colors, visible) if (v & cand).any()]
            if any(np.linalg.norm(color - c) < _MIN_COLOR_DISTANCE for c in touched):
                continue
            updates = _accept(full, visible, cand)
            if updates is None:
                continue
            own = _mask_to_polygons(cand)
            if own is None:
                continue
            for k, u in enumerate(updates):
                if u is not None:
                    visible[k], polygons[k] = u
            # Mild shading and noise, so shapes are not flat colour (a too-easy cue).
            gx, gy = rng.normal(0, 25, size=2)
            yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n - 0.5
            shade = color + (gx * xx + gy * yy)[..., None]
            image = np.where(cand.astype(bool)[..., None], shade, image)
            full.append(cand)
            visible.append(cand.copy())
            polygons.append(own)
            classes.append(cls)
            colors.append(color)
            break
    image = image + rng.normal(0, 5, size=image.shape)
    image = np.clip(np.round(image), 0, 255).astype(np.uint8)
    instances = [{"class": c, "mask": v, "polygons": p} for c, v, p in zip(classes, visible, polygons)]
    return image, instances


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------
def _check_split(split: str) -> None:
    if split not in SHAPES_SPLITS:
        raise ValueError(f"Unknown shapes split {split!r}; expected one of {list(SHAPES_SPLITS)}.")


def _atomic_write(path: Path, data: bytes, fsync: bool = False) -> None:
    # Readers never see a partial file; images skip the fsync (cheap to regenerate), the json does not.
    with atomic_open(path, "wb", durable=fsync) as f:
        f.write(data)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    # Several processes (DDP ranks, a loader and an evaluator) may ask for the same split at once.
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


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
    if _is_up_to_date(json_path, image_dir, params):
        return json_path

    image_dir.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{split}.lock"):
        if _is_up_to_date(json_path, image_dir, params):  # another process just made it
            return json_path
        # Remove the old json first: an interrupted run must not leave it next to half-new images.
        with contextlib.suppress(FileNotFoundError):
            json_path.unlink()
        for stale in image_dir.glob("*.png"):
            stale.unlink()

        images, annotations = [], []
        for i in range(num_images):
            rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_IDS[split], i]))
            image, instances = render_shapes_image(rng, image_size)
            file_name = f"{i:06d}.png"
            ok, png = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
            if not ok:  # pragma: no cover
                raise RuntimeError(f"cv2 could not encode image {file_name}")
            _atomic_write(image_dir / file_name, png.tobytes())
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
        _atomic_write(json_path, json.dumps(data).encode(), fsync=True)
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
        data = json.load(f)
    images = data["images"]
    params = _sem_seg_params(data["info"]["parameters"])
    label_dir = root / f"{split}_sem_seg"
    file_names = [im["file_name"] for im in images]
    if _sem_seg_is_up_to_date(label_dir, params, file_names):
        return label_dir

    label_dir.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{split}_sem_seg.lock"):
        if _sem_seg_is_up_to_date(label_dir, params, file_names):  # another process just made them
            return label_dir
        with contextlib.suppress(FileNotFoundError):
            (label_dir / _SEM_SEG_INFO).unlink()
        for stale in label_dir.glob("*.png"):
            stale.unlink()
        per_image: Dict[int, List[Dict[str, Any]]] = {im["id"]: [] for im in images}
        for ann in data["annotations"]:
            per_image[ann["image_id"]].append(ann)
        for im in images:
            label = semantic_label(per_image[im["id"]], im["height"], im["width"])
            ok, png = cv2.imencode(".png", label)
            if not ok:  # pragma: no cover
                raise RuntimeError(f"cv2 could not encode the label of {im['file_name']}")
            _atomic_write(label_dir / im["file_name"], png.tobytes())
        info = {
            "description": "E3VA synthetic shapes, semantic labels",
            "parameters": params,
            "ignore_label": SHAPES_SEM_SEG_IGNORE,
        }
        _atomic_write(label_dir / _SEM_SEG_INFO, json.dumps(info).encode(), fsync=True)
    return label_dir


# --------------------------------------------------------------------------------------------------
# Detectron2 registration
# --------------------------------------------------------------------------------------------------
def default_shapes_root() -> Path:
    """``$E3VA_DATASETS`` if set, else ``$DETECTRON2_DATASETS/shapes`` if set, else ``~/.cache/e3va/shapes``."""
    if os.environ.get("E3VA_DATASETS"):
        return Path(os.environ["E3VA_DATASETS"]).expanduser()
    if os.environ.get("DETECTRON2_DATASETS"):
        return Path(os.environ["DETECTRON2_DATASETS"]).expanduser() / "shapes"
    return Path("~/.cache/e3va/shapes").expanduser()


@dataclass(frozen=True)
class _SplitSpec:
    root: Path
    split: str
    num_images: int
    image_size: int
    seed: int

    @property
    def json_file(self) -> Path:
        return self.root / f"{self.split}.json"

    @property
    def image_root(self) -> Path:
        return self.root / self.split

    @property
    def sem_seg_root(self) -> Path:
        return self.root / f"{self.split}_sem_seg"


class _LazyShapesLoader:
    """The DatasetCatalog function: generates the split if needed, then Detectron2's load_coco_json."""

    is_e3va_shapes = True  # marks our registrations, so re-registering is safe even after a reload

    def __init__(self, name: str, spec: _SplitSpec):
        self.name = name
        self.spec = spec

    def __call__(self) -> List[Dict[str, Any]]:
        json_file = _ensure(self.spec)
        return load_coco_json(str(json_file), str(self.spec.image_root), self.name)


class _LazyShapesSemSegLoader:
    """The DatasetCatalog function of the semantic splits: generates the labels (and images) if needed,
    then Detectron2's load_sem_seg, as for ADE20K."""

    is_e3va_shapes_sem_seg = True  # marks our registrations (see _LazyShapesLoader)

    def __init__(self, name: str, spec: _SplitSpec):
        self.name = name
        self.spec = spec

    def __call__(self) -> List[Dict[str, Any]]:
        label_dir = _ensure_sem_seg(self.spec)
        return load_sem_seg(str(label_dir), str(self.spec.image_root), gt_ext="png", image_ext="png")


def _ensure(spec: _SplitSpec) -> Path:
    return generate_shapes_dataset(spec.root, spec.split, spec.num_images, spec.image_size, spec.seed)


def _ensure_sem_seg(spec: _SplitSpec) -> Path:
    return generate_shapes_sem_seg(spec.root, spec.split, spec.num_images, spec.image_size, spec.seed)


def _registered_spec(name: str, marker: str = "is_e3va_shapes") -> Optional[_SplitSpec]:
    func = DatasetCatalog[name] if name in DatasetCatalog else None
    return func.spec if getattr(func, marker, False) else None


def _registered_shapes_names(marker: str = "is_e3va_shapes") -> List[str]:
    return [n for n in DatasetCatalog.list() if _registered_spec(n, marker) is not None]


def _check_registration(names: Sequence[str], num_train: int, num_val: int, image_size: int) -> None:
    if isinstance(names, str) or len(names) != 2 or len(set(names)) != 2:
        raise ValueError(f"names must be two distinct dataset names (train, val), got {names!r}.")
    for label, value in (("num_train", num_train), ("num_val", num_val)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}.")
    if not isinstance(image_size, int) or image_size < 32:
        raise ValueError(f"image_size must be an int >= 32 (pixels), got {image_size!r}.")


def _replaceable(name: str, spec: _SplitSpec, marker: str) -> bool:
    """Whether to register ``name`` now: False if it already holds this very registration, True if it
    is free or held by another registration of ours (removed here); an error if anything else holds it."""
    if name not in DatasetCatalog:
        return True
    old = _registered_spec(name, marker)
    if old is None:
        raise ValueError(
            f"Dataset name {name!r} is already registered by something other than the shapes "
            "dataset; pass different names=(train_name, val_name)."
        )
    if old == spec:
        return False
    DatasetCatalog.remove(name)
    MetadataCatalog.remove(name)
    return True


def register_shapes_datasets(
    root: Union[str, Path, None] = None,
    num_train: int = 400,
    num_val: int = 50,
    image_size: int = 128,
    seed: int = 0,
    names: Sequence[str] = DEFAULT_SHAPES_NAMES,
    sem_seg_names: Optional[Sequence[str]] = None,
    minival_name: Optional[str] = None,
    num_minival: int = 50,
) -> Tuple[str, str]:
    """Registers the train and val splits as COCO datasets ``names`` (default shapes_train/shapes_val).

    Same catalog entries as ``register_coco_instances`` (``load_coco_json`` loader; metadata
    ``json_file``, ``image_root``, ``evaluator_type="coco"``, ``thing_classes``), except that the
    files are generated on first use. Cheap, and idempotent: registering the same names again replaces
    the previous shapes registration (or keeps it, if identical). ``root`` defaults to
    :func:`default_shapes_root`. Returns the two names.

    The same splits are also registered for semantic segmentation (:func:`register_shapes_sem_seg_datasets`)
    under ``sem_seg_names``; ``None`` means ``shapes_sem_seg_train`` / ``shapes_sem_seg_val`` when ``names``
    are the defaults and no semantic registration otherwise (``()`` for none in any case).

    A third split for choosing hyper-parameters, ``minival`` (``num_minival`` images), is registered as
    ``minival_name``; ``None`` means ``shapes_minival`` when ``names`` are the defaults, none otherwise.
    """
    _check_registration(names, num_train, num_val, image_size)
    if minival_name is None and tuple(names) == DEFAULT_SHAPES_NAMES:
        minival_name = "shapes_minival"
    if minival_name:
        _check_registration((names[0], minival_name), num_train, num_minival, image_size)
    if sem_seg_names is None:
        sem_seg_names = DEFAULT_SHAPES_SEM_SEG_NAMES if tuple(names) == DEFAULT_SHAPES_NAMES else ()
    if sem_seg_names:
        _check_registration(sem_seg_names, num_train, num_val, image_size)
    root = Path(root).expanduser() if root is not None else default_shapes_root()

    coco_splits = zip([*names, minival_name] if minival_name else names, SHAPES_SPLITS, (num_train, num_val, num_minival))
    for name, split, num in coco_splits:
        spec = _SplitSpec(root, split, num, image_size, seed)
        if not _replaceable(name, spec, "is_e3va_shapes"):
            continue
        DatasetCatalog.register(name, _LazyShapesLoader(name, spec))
        MetadataCatalog.get(name).set(
            json_file=str(spec.json_file),
            image_root=str(spec.image_root),
            evaluator_type="coco",
            thing_classes=list(SHAPES_CLASSES),
            # What load_coco_json would set; set now so an evaluator works before the dataset loads.
            thing_dataset_id_to_contiguous_id={k + 1: k for k in range(len(SHAPES_CLASSES))},
            thing_colors=[list(c) for c in _THING_COLORS],
        )
    if sem_seg_names:
        register_shapes_sem_seg_datasets(root, num_train, num_val, image_size, seed, names=sem_seg_names)
    return tuple(names)  # type: ignore[return-value]


def register_shapes_sem_seg_datasets(
    root: Union[str, Path, None] = None,
    num_train: int = 400,
    num_val: int = 50,
    image_size: int = 128,
    seed: int = 0,
    names: Sequence[str] = DEFAULT_SHAPES_SEM_SEG_NAMES,
) -> Tuple[str, str]:
    """Registers the train and val splits as semantic segmentation datasets ``names`` (default
    shapes_sem_seg_train/shapes_sem_seg_val), the same images as :func:`register_shapes_datasets`.

    Same catalog entries as Detectron2's ADE20K registration (``load_sem_seg`` loader; metadata
    ``stuff_classes``, ``image_root``, ``sem_seg_root``, ``evaluator_type="sem_seg"``,
    ``ignore_label=255``), except that the files are generated on first use. Classes are
    ``SHAPES_SEM_SEG_CLASSES``: the four shapes (0..3), then background (4). Cheap and idempotent, as
    :func:`register_shapes_datasets`. Returns the two names.
    """
    _check_registration(names, num_train, num_val, image_size)
    root = Path(root).expanduser() if root is not None else default_shapes_root()
    for name, split, num in zip(names, SHAPES_SPLITS, (num_train, num_val)):
        spec = _SplitSpec(root, split, num, image_size, seed)
        if not _replaceable(name, spec, "is_e3va_shapes_sem_seg"):
            continue
        DatasetCatalog.register(name, _LazyShapesSemSegLoader(name, spec))
        MetadataCatalog.get(name).set(
            stuff_classes=list(SHAPES_SEM_SEG_CLASSES),
            stuff_colors=[list(c) for c in _STUFF_COLORS],
            image_root=str(spec.image_root),
            sem_seg_root=str(spec.sem_seg_root),
            evaluator_type="sem_seg",
            ignore_label=SHAPES_SEM_SEG_IGNORE,
        )
    return tuple(names)  # type: ignore[return-value]


def ensure_shapes_dataset(dataset_name: str = "shapes_val") -> Path:
    """Generates a registered shapes dataset's files if needed; returns its COCO json path.

    ``dataset_name`` is a name registered by :func:`register_shapes_datasets`, or a bare split
    (``"train"``/``"val"``) meaning the default-named ``shapes_<split>``.
    """
    spec = _registered_spec(dataset_name)
    if spec is None and dataset_name in SHAPES_SPLITS:
        spec = _registered_spec(f"shapes_{dataset_name}")
    if spec is None:
        raise ValueError(
            f"{dataset_name!r} is not a registered shapes dataset; registered: "
            f"{_registered_shapes_names()} (or a split: {list(SHAPES_SPLITS)}). "
            "Call e3va.data.shapes.register_shapes_datasets() first."
        )
    return _ensure(spec)


def ensure_shapes_sem_seg_dataset(dataset_name: str = "shapes_sem_seg_val") -> Path:
    """Generates a registered semantic shapes dataset's files if needed; returns its label directory.

    ``dataset_name`` is a name registered by :func:`register_shapes_sem_seg_datasets`, or a bare split
    (``"train"``/``"val"``) meaning the default-named ``shapes_sem_seg_<split>``.
    """
    marker = "is_e3va_shapes_sem_seg"
    spec = _registered_spec(dataset_name, marker)
    if spec is None and dataset_name in SHAPES_SPLITS:
        spec = _registered_spec(f"shapes_sem_seg_{dataset_name}", marker)
    if spec is None:
        raise ValueError(
            f"{dataset_name!r} is not a registered semantic shapes dataset; registered: "
            f"{_registered_shapes_names(marker)} (or a split: {list(SHAPES_SPLITS)}). "
            "Call e3va.data.shapes.register_shapes_sem_seg_datasets() first."
        )
    return _ensure_sem_seg(spec)


def build_shapes_evaluator(
    dataset_name: str = "shapes_val", output_dir: Optional[str] = None, **kwargs: Any
) -> COCOEvaluator:
    """Ensures the dataset's json exists, then returns ``COCOEvaluator(dataset_name, output_dir=...)``.

    Use this in configs instead of ``COCOEvaluator`` directly: COCOEvaluator reads the json file in
    its constructor, possibly before the (lazily generated) dataset has been loaded. ``kwargs`` go to
    COCOEvaluator.
    """
    ensure_shapes_dataset(dataset_name)
    return COCOEvaluator(dataset_name, output_dir=output_dir, **kwargs)
