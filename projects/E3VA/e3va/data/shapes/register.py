"""The shapes splits in Detectron2's catalogs: COCO instance datasets (``shapes_train``, ``shapes_val``,
``shapes_minival``) and semantic segmentation ones (``shapes_sem_seg_train``, ``shapes_sem_seg_val``),
registered cheaply, their files generated on first use."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json, load_sem_seg
from detectron2.evaluation import COCOEvaluator

from .generate import (
    SHAPES_SEM_SEG_CLASSES,
    SHAPES_SEM_SEG_IGNORE,
    SHAPES_SPLITS,
    generate_shapes_dataset,
    generate_shapes_sem_seg,
)
from .render import SHAPES_CLASSES


DEFAULT_SHAPES_NAMES: Tuple[str, str] = ("shapes_train", "shapes_val")
DEFAULT_SHAPES_SEM_SEG_NAMES: Tuple[str, str] = ("shapes_sem_seg_train", "shapes_sem_seg_val")

# Visualisation colours (RGB), one per class, for Detectron2's Visualizer.
_THING_COLORS = [[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48]]
_STUFF_COLORS = _THING_COLORS + [[128, 128, 128]]


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
