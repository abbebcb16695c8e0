"""Seeded synthetic Detectron2 training batches: the input the benchmark tool feeds its models, and the
tests theirs, so that a step measured by one is a step exercised by the other."""
from __future__ import annotations

from typing import Any, Dict, List

import torch
from detectron2.structures import BitMasks, Boxes, Instances

__all__ = ["synthetic_batch"]


def synthetic_batch(
    batch_size: int = 2, size: int = 64, num_classes: int = 3, seed: int = 0, num_instances: int = 2
) -> List[Dict[str, Any]]:
    """Detectron2-style training inputs: seeded random ``size`` x ``size`` uint8 images, each with
    ``num_instances`` box+mask instances.

    The first two boxes are fixed fractions of the image (at ``size=64``: ``[4, 6, 30, 40]`` and
    ``[20, 10, 60, 50]``); further ones are drawn from the seeded generator. Masks fill their boxes.
    """
    if batch_size < 1 or size < 8 or num_classes < 1 or num_instances < 1:
        raise ValueError(
            f"synthetic_batch needs batch_size >= 1, size >= 8, num_classes >= 1 and num_instances >= 1; "
            f"got batch_size={batch_size}, size={size}, num_classes={num_classes}, num_instances={num_instances}."
        )
    g = torch.Generator().manual_seed(seed)
    template = torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]]) * (size / 64.0)
    batch = []
    for _ in range(batch_size):
        image = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
        classes = torch.randint(0, num_classes, (num_instances,), generator=g)
        boxes = template[:num_instances]
        if num_instances > len(template):
            extra = num_instances - len(template)
            xy0 = torch.rand(extra, 2, generator=g) * 0.6 * size
            wh = (0.15 + 0.25 * torch.rand(extra, 2, generator=g)) * size
            boxes = torch.cat([boxes, torch.cat([xy0, (xy0 + wh).clamp(max=size)], dim=1)])
        masks = torch.zeros(num_instances, size, size, dtype=torch.bool)
        for k, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
            masks[k, y0:y1, x0:x1] = True
        inst = Instances((size, size))
        inst.gt_boxes = Boxes(boxes)
        inst.gt_classes = classes
        inst.gt_masks = BitMasks(masks)
        batch.append({"image": image, "instances": inst, "height": size, "width": size})
    return batch
