"""Small builders shared by the tests: tiny models and synthetic Detectron2 batches."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch
from detectron2.config import LazyConfig, instantiate

from e3va.benchmark import synthetic_batch as _synthetic_batch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def load_config(relpath: str):
    """Loads ``configs/<relpath>`` with Detectron2's LazyConfig."""
    return LazyConfig.load(str(CONFIGS / relpath))


def tiny_detector(relpath: str, tuning: str = "e3va", num_classes: int = 3) -> torch.nn.Module:
    """The detector of a config, on the project's "nano" Swin, small enough for one CPU step."""
    cfg = load_config(relpath)
    cfg.model.backbone.bottom_up.size = "nano"
    cfg.model.backbone.bottom_up.tuning = tuning
    cfg.model.roi_heads.num_classes = num_classes
    return instantiate(cfg.model)


def synthetic_batch(batch_size: int = 2, size: int = 64, num_classes: int = 3, seed: int = 0) -> List[Dict]:
    """Detectron2-style training inputs: random images with two box+mask instances each
    (``e3va.benchmark.synthetic_batch``, which the benchmark tool also feeds its models)."""
    return _synthetic_batch(batch_size, size, num_classes, seed, num_instances=2)
