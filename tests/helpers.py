"""Small builders shared by the tests: tiny models and synthetic Detectron2 batches."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.structures import BitMasks, Boxes, Instances

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
    """Detectron2-style training inputs: random images with two box+mask instances each."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(batch_size):
        image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        boxes = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]])
        masks = torch.zeros(2, size, size, dtype=torch.bool)
        for k, (x0, y0, x1, y1) in enumerate(boxes.int().tolist()):
            masks[k, y0:y1, x0:x1] = True
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = torch.randint(0, num_classes, (2,), generator=g)
        inst.gt_masks = BitMasks(masks)
        batch.append({"image": image, "instances": inst, "height": size, "width": size})
    return batch
