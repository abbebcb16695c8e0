#!/usr/bin/env python
"""Makes the project's own small pretrained Swin ("nano") for the CPU demo: no weights can be downloaded.

Classification pretraining on synthetic images from the shapes generator (a seed stream of its own, so
none is a demo train/val image): for each shape class, how many of it the image shows (0, 1, 2, 3+).
That needs shape-sensitive, roughly localised features, but not boxes or instances, which the detector
must still learn. Counting alone, from scratch, sits at the class prior for thousands of steps (measured:
loss 1.22 = the prior's entropy after 1500 steps), so an auxiliary dense loss gives the early stages a
signal: a 1x1 convolution on the stride-8 stage predicts each cell's class fractions (background and the
four shapes). That head is dropped afterwards. The file has the layout of Microsoft's Swin releases,
``{"model": trunk + norm + head}``, fp16, so the demo loads it through the same path as official weights.

    python tools/pretrain_nano_swin.py                       # regenerates e3va.NANO_SWIN_WEIGHTS
    python tools/pretrain_nano_swin.py --steps 50 --output /tmp/nano.pth
"""
import argparse
import os
import time
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from e3va import NANO_SWIN_WEIGHTS, build_swin_trunk
from e3va.data.shapes import SHAPES_CLASSES, render_shapes_image
from e3va.swin import NANO_PIXEL_MEAN, NANO_PIXEL_STD

# BGR, 0-255, ImageNet statistics: the Shapes configs normalise their input with the same constants.
PIXEL_MEAN = torch.tensor(NANO_PIXEL_MEAN).view(1, 3, 1, 1)
PIXEL_STD = torch.tensor(NANO_PIXEL_STD).view(1, 3, 1, 1)
MAX_COUNT = 3  # counts are classified as 0, 1, 2, 3+
DENSE_STRIDE = 8  # the auxiliary per-cell loss reads stage 1 (stride 8)
SEED_OFFSET = 10_000  # keeps pretraining images apart from the demo's (generated from seed 0)


class CountingClassifier(nn.Module):
    """Swin trunk, global average pool of the last stage, LayerNorm and a linear head (as Swin's classifier)."""

    def __init__(self, drop_path_rate: float = 0.1) -> None:
        super().__init__()
        self.trunk = build_swin_trunk("nano", drop_path_rate=drop_path_rate, out_indices=(1, 3))
        width = self.trunk.num_features[-1]
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, len(SHAPES_CLASSES) * (MAX_COUNT + 1))
        # Auxiliary, not saved: background + shapes fractions per stride-8 cell.
        self.dense_head = nn.Conv2d(self.trunk.num_features[1], len(SHAPES_CLASSES) + 1, kernel_size=1)

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Count logits (N x classes x 4) and per-cell class logits (N x (classes + 1) x H/8 x W/8)."""
        features = self.trunk(images)
        tokens = features["p3"].mean(dim=(2, 3))
        counts = self.head(self.norm(tokens)).view(-1, len(SHAPES_CLASSES), MAX_COUNT + 1)
        return counts, self.dense_head(features["p1"])


def render_pool(num: int, image_size: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``num`` images (uint8, BGR, N x 3 x H x W), their per-class counts clipped to 3, and per stride-8
    cell the fraction of pixels of background and of each class (N x (classes + 1) x H/8 x W/8)."""
    if image_size % DENSE_STRIDE:
        raise ValueError(f"image_size must be a multiple of {DENSE_STRIDE}, got {image_size}.")
    rng = np.random.default_rng(seed + SEED_OFFSET)
    images, counts, fractions = [], [], []
    for _ in range(num):
        rgb, instances = render_shapes_image(rng, image_size)
        images.append(torch.from_numpy(rgb[:, :, ::-1].copy()).permute(2, 0, 1))
        c = np.bincount([inst["class"] for inst in instances], minlength=len(SHAPES_CLASSES))
        counts.append(torch.from_numpy(np.minimum(c, MAX_COUNT)))
        labels = np.zeros((image_size, image_size), dtype=np.int64)  # visible masks do not overlap
        for inst in instances:
            labels[inst["mask"].astype(bool)] = inst["class"] + 1
        one_hot = F.one_hot(torch.from_numpy(labels), len(SHAPES_CLASSES) + 1).permute(2, 0, 1).float()
        fractions.append(F.avg_pool2d(one_hot, DENSE_STRIDE).half())
    return torch.stack(images), torch.stack(counts).long(), torch.stack(fractions)


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images.float() - PIXEL_MEAN) / PIXEL_STD


def augment(
    images: torch.Tensor, fractions: torch.Tensor, generator: torch.Generator
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal flips of images and their cell targets (counts do not change)."""
    flip = torch.rand(images.shape[0], generator=generator) < 0.5
    images, fractions = images.clone(), fractions.clone()
    images[flip] = images[flip].flip(-1)
    fractions[flip] = fractions[flip].flip(-1)
    return images, fractions


@torch.no_grad()
def held_out_accuracy(
    model: CountingClassifier, images: torch.Tensor, counts: torch.Tensor, fractions: torch.Tensor
) -> Dict[str, float]:
    """Held-out ``exact_match`` (images whose four counts are all right), ``cell_accuracy`` (stride-8
    cells whose majority class is predicted) and ``cell_majority_baseline`` (always answering the most
    frequent class, background)."""
    model.eval()
    outputs = [model(normalise(b)) for b in images.split(64)]
    model.train()
    count_pred = torch.cat([c.argmax(-1) for c, _ in outputs])
    cell_pred = torch.cat([d.argmax(1) for _, d in outputs])
    cell_true = fractions.float().argmax(1)
    most_frequent = torch.bincount(cell_true.flatten()).argmax()
    return {
        "exact_match": round((count_pred == counts).all(dim=1).float().mean().item(), 4),
        "cell_accuracy": round((cell_pred == cell_true).float().mean().item(), 4),
        "cell_majority_baseline": round((cell_true == most_frequent).float().mean().item(), 4),
    }


def official_layout(model: CountingClassifier) -> Dict[str, torch.Tensor]:
    """Trunk, ``norm`` and ``head`` under Microsoft's names, fp16, without index buffers or detection norms."""
    state = {
        k: v for k, v in model.trunk.state_dict().items()
        if not k.endswith("relative_position_index") and not k.startswith(("norm0", "norm1", "norm2", "norm3"))
    }
    state.update({f"norm.{k}": v for k, v in model.norm.state_dict().items()})
    state.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    return {k: v.detach().half() for k, v in state.items()}


def pretrain(
    output: Path, steps: int, batch_size: int, image_size: int, seed: int, pool: int, held_out: int, lr: float
) -> Dict:
    """Trains the classifier and writes the checkpoint atomically; returns its ``meta``."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    train_images, train_counts, train_fractions = render_pool(pool, image_size, seed)
    test_images, test_counts, test_fractions = render_pool(held_out, image_size, seed + 1)
    print(f"rendered {pool} + {held_out} images of {image_size}px in {time.perf_counter() - start:.1f} s", flush=True)

    model = CountingClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(i, steps) / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        index = torch.randint(0, pool, (batch_size,), generator=generator)
        images, fractions = augment(train_images[index], train_fractions[index], generator)
        count_logits, cell_logits = model(normalise(images))
        count_loss = F.cross_entropy(count_logits.flatten(0, 1), train_counts[index].flatten())
        loss = count_loss + F.cross_entropy(cell_logits, fractions.float())  # soft targets: class fractions
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            acc = held_out_accuracy(model, test_images, test_counts, test_fractions)
            print(f"step {step}/{steps}  loss {loss.item():.3f} (counting {count_loss.item():.3f})  held-out {acc}  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)

    meta = {
        "preset": "nano",
        "task": f"count each of {list(SHAPES_CLASSES)} (0, 1, 2, 3+) on synthetic shapes images, "
                "with an auxiliary per-cell class-fraction loss at stride 8",
        "steps": steps, "batch_size": batch_size, "image_size": image_size, "seed": seed,
        "held_out": held_out_accuracy(model, test_images, test_counts, test_fractions),
        "script": "tools/pretrain_nano_swin.py",
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_suffix(".tmp")
    torch.save({"model": official_layout(model), "meta": meta}, tmp)
    os.replace(tmp, output)
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MB) in {time.perf_counter() - start:.0f} s: {meta}")
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=NANO_SWIN_WEIGHTS)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64, help="64 keeps it to minutes on a CPU")
    parser.add_argument("--pool", type=int, default=4000, help="distinct training images")
    parser.add_argument("--held-out", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pretrain(args.output, args.steps, args.batch_size, args.image_size, args.seed, args.pool, args.held_out, args.lr)


if __name__ == "__main__":
    main()
