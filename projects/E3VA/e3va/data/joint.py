"""Datasets whose images carry instance and semantic labels at once, for training several tasks together
(``e3va.multitask.MultiTaskModel``)."""
from __future__ import annotations

from typing import Any, Dict, List

from detectron2.data import DatasetCatalog

__all__ = ["with_semantic_labels"]


def with_semantic_labels(instances: str, sem_seg: str) -> List[Dict[str, Any]]:
    """The records of the instance dataset ``instances``, each with the ``sem_seg_file_name`` of the same
    image (matched by ``file_name``) in the semantic dataset ``sem_seg``, so that Detectron2's
    ``DatasetMapper`` yields both kinds of labels for one image. Every image must be in both."""
    labels = {record["file_name"]: record["sem_seg_file_name"] for record in DatasetCatalog.get(sem_seg)}
    records = DatasetCatalog.get(instances)
    missing = [r["file_name"] for r in records if r["file_name"] not in labels]
    if missing:
        raise ValueError(f"{len(missing)} image(s) of {instances!r} have no semantic labels in {sem_seg!r}, "
                         f"e.g. {missing[0]}; both datasets must hold the same images.")
    return [{**record, "sem_seg_file_name": labels[record["file_name"]]} for record in records]
