"""Clear errors for Detectron2's builtin datasets whose files are not where Detectron2 looks.

Detectron2 registers its builtin datasets (``voc_2007_test``, ``coco_2017_val``, ``ade20k_sem_seg_val``,
...) under the directory in the environment variable ``DETECTRON2_DATASETS`` (default ``./datasets``),
read once, when ``detectron2.data`` is imported. When the files are not there, the loaders fail deep
inside with a bare ``FileNotFoundError`` on one file. :func:`require_dataset_root` checks the whole
layout first and says what is missing, what is expected, and how to point Detectron2 at it.

Use :func:`dataset_dicts` in LazyConfig dataloaders instead of ``get_detection_dataset_dicts``::

    dataset=L(dataset_dicts)(names=("voc_2007_trainval", "voc_2012_trainval"))
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.build import filter_images_with_only_crowd_annotations

from .annotations import drop_degenerate_boxes

__all__ = [
    "DatasetRootError",
    "ENV_VAR",
    "UnknownDatasetError",
    "dataset_dicts",
    "require_dataset_root",
    "require_registered",
]

ENV_VAR = "DETECTRON2_DATASETS"

# Name prefix of Detectron2's builtin families -> the directory under $DETECTRON2_DATASETS they live in
# (None: the VOC year's own directory, VOC2007 / VOC2012, read from the metadata's ``dirname``).
_FAMILIES = {"voc_": None, "coco_": "coco", "ade20k_sem_seg_": "ADEChallengeData2016"}

# Extra advice per family: what Detectron2 needs beyond the official archives.
_ADVICE = {
    "ade20k_sem_seg_": (
        "annotations_detectron2/ is made from the official ADEChallengeData2016 by Detectron2's "
        "datasets/prepare_ade20k_sem_seg.py."
    ),
}


class DatasetRootError(FileNotFoundError):
    """A builtin dataset's files are missing; the message says where Detectron2 looked and what it expects.

    A ``FileNotFoundError``, so code that catches Detectron2's own error keeps working."""


class UnknownDatasetError(KeyError):
    """A dataset name that is not registered; the message lists close matches and the registered ones."""

    def __str__(self) -> str:  # KeyError's own str() shows the message as a quoted repr
        return str(self.args[0]) if self.args else ""


def _family(dataset_name: str) -> Optional[str]:
    return next((p for p in _FAMILIES if dataset_name.startswith(p)), None)


def require_registered(dataset_name: str) -> None:
    """Raises :class:`UnknownDatasetError` (a ``KeyError``) naming ``dataset_name``, its close matches
    and the registered datasets, unless it is registered."""
    if dataset_name in DatasetCatalog.list():
        return
    registered = sorted(DatasetCatalog.list())
    close = difflib.get_close_matches(dataset_name, registered, n=5, cutoff=0.6)
    hint = f" Did you mean {close}?" if close else ""
    raise UnknownDatasetError(
        f"Dataset {dataset_name!r} is not registered in Detectron2's DatasetCatalog.{hint} "
        f"Registered datasets: {', '.join(registered)}."
    )


def _expected_paths(dataset_name: str) -> List[Tuple[str, str]]:
    """(path, "directory" | "file") that the dataset's loader reads, from its metadata."""
    meta = MetadataCatalog.get(dataset_name)
    paths: List[Tuple[str, str]] = []
    dirname = meta.get("dirname", None)
    if dirname is not None:  # Pascal VOC (register_pascal_voc): the devkit's year directory
        paths += [(os.path.join(dirname, sub), "directory") for sub in ("JPEGImages", "Annotations")]
        split = meta.get("split", None)
        main = os.path.join(dirname, "ImageSets", "Main")
        paths.append((os.path.join(main, f"{split}.txt"), "file") if split else (main, "directory"))
    for key, kind in (
        ("image_root", "directory"),
        ("json_file", "file"),
        ("sem_seg_root", "directory"),
        ("panoptic_root", "directory"),
        ("panoptic_json", "file"),
    ):
        value = meta.get(key, None)
        if value is not None:
            paths.append((str(value), kind))
    return paths


def _exists(path: str, kind: str) -> bool:
    return os.path.isdir(path) if kind == "directory" else os.path.isfile(path)


def _under_env_root(path: str, anchor: str) -> str:
    """``path`` written from its ``anchor`` component on, under ``$DETECTRON2_DATASETS``."""
    parts = Path(path).parts
    if anchor not in parts:
        return path
    index = len(parts) - 1 - parts[::-1].index(anchor)
    return "$" + ENV_VAR + "/" + "/".join(parts[index:])


def _layout(paths: List[str]) -> str:
    """``a/b/{c/, d.txt}`` for ``[a/b/c/, a/b/d.txt]``: the paths under their common directory."""
    if len(paths) < 2:
        return ", ".join(paths)
    common = os.path.commonpath([p.rstrip("/") for p in paths])
    if not common:
        return ", ".join(paths)
    return common + "/{" + ", ".join(p[len(common) + 1 :] for p in paths) + "}"


def _env_description() -> str:
    value = os.environ.get(ENV_VAR)
    if value is None:
        return f"{ENV_VAR} is unset, so Detectron2 uses ./datasets, in the working directory {os.getcwd()}"
    return f"{ENV_VAR}={value!r} now"


def require_dataset_root(dataset_name: str) -> None:
    """Checks that a builtin dataset's files are where Detectron2 registered them.

    Knows Detectron2's builtin families ``voc_*``, ``coco_*`` and ``ade20k_sem_seg_*`` (any name with
    those prefixes, including ones registered later with the same registration functions): reads the
    dataset's metadata (``dirname``; ``image_root``, ``json_file``, ``sem_seg_root``, ...) and raises
    :class:`DatasetRootError` listing every missing directory or file, the expected layout under
    ``$DETECTRON2_DATASETS`` and how to set it. Other names are only checked to be registered: their
    loaders may create their files on first use (e.g. the synthetic shapes datasets).

    Raises:
        UnknownDatasetError: (a ``KeyError``) ``dataset_name`` is not registered; the message lists
            the registered ones.
        DatasetRootError: some of the files are missing.
    """
    require_registered(dataset_name)
    family = _family(dataset_name)
    if family is None:
        return
    expected = _expected_paths(dataset_name)
    missing = [(p, kind) for p, kind in expected if not _exists(p, kind)]
    if not missing:
        return

    meta = MetadataCatalog.get(dataset_name)
    anchor = os.path.basename(os.path.normpath(meta.dirname)) if family == "voc_" else _FAMILIES[family]
    lines = [f"Dataset {dataset_name!r}: Detectron2 cannot find its files. Missing:"]
    lines += [f"  - {os.path.abspath(p)} ({kind})" for p, kind in missing]
    layout = _layout([_under_env_root(p, anchor) + ("/" if kind == "directory" else "") for p, kind in expected])
    lines += [
        f"Expected layout: {layout}.",
        f"Detectron2 registers its builtin datasets under the directory in the environment variable "
        f"{ENV_VAR}, read when detectron2.data is first imported ({_env_description()}). Set it before "
        f"starting Python: export {ENV_VAR}=/path/to/datasets",
    ]
    if family in _ADVICE:
        lines.append(_ADVICE[family])
    raise DatasetRootError("\n".join(lines))


def dataset_dicts(names: Union[str, Sequence[str]], filter_empty: bool = True, **kwargs: Any) -> Any:
    """:func:`require_dataset_root` for each of ``names``, then Detectron2's
    ``get_detection_dataset_dicts(names, **kwargs)`` (``min_keypoints``, ...), without the annotations whose
    box is empty or wholly outside its image (counted in the log, ``e3va.data.annotations``); with
    ``filter_empty``, Detectron2's filter then drops the images left without usable annotations."""
    listed = [names] if isinstance(names, str) else list(names)
    if not listed:
        raise ValueError("dataset_dicts needs at least one dataset name, got none.")
    for name in listed:
        require_dataset_root(name)
    dicts = get_detection_dataset_dicts(listed, filter_empty=False, **kwargs)
    if not isinstance(dicts, list) or not dicts or "annotations" not in dicts[0]:
        return dicts  # a torch Dataset, or semantic segmentation: no boxes
    dicts = drop_degenerate_boxes(dicts, source=", ".join(listed))
    return filter_images_with_only_crowd_annotations(dicts) if filter_empty else dicts
