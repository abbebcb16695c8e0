#!/usr/bin/env python
"""Makes the project's own small pretrained Swin ("nano") for the CPU demo: no weights can be downloaded.

The pretext is *not* the downstream task, so that the transfer study measures transfer: the images have
the shapes data's textured backgrounds, but their objects are five other shapes (``PRETEXT_SHAPES``:
ellipse, cross, hexagon, ring, chevron), over a wider range of sizes, and the labels are dense rather than
instances. Every stage of the trunk is trained to parse its own grid: per cell, the fraction of pixels of
background and of each pretext shape (stride 4, 8, 16 and 32), and at strides 4 and 8 the fraction of
pixels on an object's outline (where instances meet included). A pooled head says which shapes are
present. So each FPN level gets localised, shape- and edge-sensitive features, which the detector
downstream must still turn into boxes and masks of circles, squares, triangles and stars.

The dense heads are dropped afterwards; the presence head is saved as the classifier. The file has the
layout of Microsoft's Swin releases, ``{"model": trunk + norm + head, "meta": ...}``, fp16, so the demo
loads it through the same path as official weights. Seeded: the same command gives the same file.

    python tools/pretrain_nano_swin.py                       # regenerates e3va.NANO_SWIN_WEIGHTS
    python tools/pretrain_nano_swin.py --steps 50 --output /tmp/nano.pth
    python tools/pretrain_nano_swin.py --pretext classification --output /tmp/nano_cls.pth   # presence labels only
    python tools/pretrain_nano_swin.py --pretext coarse --output /tmp/nano_coarse.pth        # strides 16, 32 only

Two weaker pretexts are candidates for a wider gap between frozen and fine-tuned trunks in the transfer study
(docs/TRANSFER_STUDY.md). ``classification`` trains on the presence labels alone, as ImageNet classification
pretrains a detector's trunk: features not trained to localise. ``coarse`` keeps the presence labels and the
parsing of the two coarse stages (strides 16 and 32) only: the trunk learns what is roughly where, while its
fine stages, which the detector's small anchors and its masks read, are trained only through the coarse ones.
"""
import argparse
import time
from pathlib import Path
from typing import Dict, List, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from e3va import NANO_SWIN_WEIGHTS, build_swin_trunk
from e3va.atomic import atomic_torch_save
from e3va.data.shapes import render_background
from e3va.swin import NANO_PIXEL_MEAN, NANO_PIXEL_STD

# BGR, 0-255, ImageNet statistics: the Shapes configs normalise their input with the same constants.
PIXEL_MEAN = torch.tensor(NANO_PIXEL_MEAN).view(1, 3, 1, 1)
PIXEL_STD = torch.tensor(NANO_PIXEL_STD).view(1, 3, 1, 1)
PRETEXT_SHAPES: Tuple[str, ...] = ("ellipse", "cross", "hexagon", "ring", "chevron")
STRIDES = (4, 8, 16, 32)  # the trunk's stages
EDGE_STRIDES = (4, 8)  # stages that also predict outlines
SEED_OFFSET = 20_000  # keeps pretraining images apart from the demo's (generated from seeds 0 and 1)
MIN_COLOR_DISTANCE = 90.0  # as the shapes data: an object must differ from what it covers


def _polygon(mask: np.ndarray, pts: np.ndarray) -> None:
    shift = 4  # sub-pixel vertex precision for cv2
    cv2.fillPoly(mask, [np.round(pts * (1 << shift)).astype(np.int32)], 1, cv2.LINE_8, shift)


def pretext_shape(rng: np.random.Generator, n: int, kind: int) -> np.ndarray:
    """A filled uint8 (n, n) mask of ``PRETEXT_SHAPES[kind]``, randomly placed, sized and rotated."""
    radius = rng.uniform(n / 20, n / 3.5)
    cx, cy = rng.uniform(radius * 0.6, n - radius * 0.6, size=2)  # may be cut by the border
    theta = rng.uniform(0, 2 * np.pi)
    mask = np.zeros((n, n), np.uint8)
    name = PRETEXT_SHAPES[kind]
    centre = (int(round(cx * 16)), int(round(cy * 16)))
    if name == "ellipse":
        axes = (int(round(radius * 16)), int(round(radius * rng.uniform(0.35, 0.7) * 16)))
        cv2.ellipse(mask, centre, axes, float(np.degrees(theta)), 0, 360, 1, -1, cv2.LINE_8, 4)
    elif name == "ring":
        cv2.circle(mask, centre, int(round(radius * 16)), 1, -1, cv2.LINE_8, 4)
        cv2.circle(mask, centre, int(round(radius * rng.uniform(0.45, 0.65) * 16)), 0, -1, cv2.LINE_8, 4)
    elif name == "hexagon":
        angles = theta + np.arange(6) * np.pi / 3
        _polygon(mask, np.stack([cx + radius * np.cos(angles), cy + radius * np.sin(angles)], 1))
    elif name == "cross":
        w = rng.uniform(0.25, 0.4) * radius
        arm = np.array([[-radius, -w], [radius, -w], [radius, w], [-radius, w]])
        for rot in (theta, theta + np.pi / 2):
            r = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]])
            _polygon(mask, arm @ r.T + [cx, cy])
    else:  # chevron: an arrow head, a concave quadrilateral
        local = np.array([[-radius, -radius], [radius, 0.0], [-radius, radius], [-0.2 * radius, 0.0]])
        r = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        _polygon(mask, local @ r.T + [cx, cy])
    return mask


def render_pretext_image(rng: np.random.Generator, n: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image: uint8 BGR (n, n, 3), its labels (0 background, k + 1 for ``PRETEXT_SHAPES[k]``; later
    objects occlude earlier ones) and a uint8 outline map (object borders, where instances meet included)."""
    image = render_background(rng, n)
    labels = np.zeros((n, n), np.uint8)
    instance = np.zeros((n, n), np.int32)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n - 0.5
    for obj in range(1, int(rng.integers(2, 8)) + 1):
        for _ in range(20):
            kind = int(rng.integers(len(PRETEXT_SHAPES)))
            mask = pretext_shape(rng, n, kind).astype(bool)
            color = rng.uniform(0, 255, size=3).astype(np.float32)
            if mask.sum() < 6 or np.linalg.norm(color - image[mask].mean(axis=0)) < MIN_COLOR_DISTANCE:
                continue
            gx, gy = rng.normal(0, 25, size=2)
            image = np.where(mask[..., None], color + (gx * xx + gy * yy)[..., None], image)
            labels[mask], instance[mask] = kind + 1, obj
            break
    image = np.clip(np.round(image + rng.normal(0, 5, size=image.shape)), 0, 255).astype(np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    ids = instance.astype(np.float32)
    edges = (cv2.dilate(ids, kernel) != cv2.erode(ids, kernel)).astype(np.uint8)
    return np.ascontiguousarray(image[:, :, ::-1]), labels, edges


def render_pool(num: int, image_size: int, seed: int) -> Dict[str, torch.Tensor]:
    """``num`` pretext images (uint8 BGR, N x 3 x H x W), labels (N x H x W) and outlines (N x H x W)."""
    if image_size % STRIDES[-1]:
        raise ValueError(f"image_size must be a multiple of {STRIDES[-1]}, got {image_size}.")
    rng = np.random.default_rng(seed + SEED_OFFSET)
    images, labels, edges = zip(*(render_pretext_image(rng, image_size) for _ in range(num)))
    return {
        "images": torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
        "labels": torch.from_numpy(np.stack(labels)),
        "edges": torch.from_numpy(np.stack(edges)),
    }


def augment(batch: Dict[str, torch.Tensor], generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """The same random flips and quarter turns of images and their dense labels."""
    out = dict(batch)
    if torch.rand((), generator=generator) < 0.5:
        out = {k: v.flip(-1) for k, v in out.items()}
    turns = int(torch.randint(0, 4, (), generator=generator))
    return {k: v.rot90(turns, dims=(-2, -1)).contiguous() for k, v in out.items()}


def dense_targets(labels: torch.Tensor, edges: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """Per stage, the fraction of each class's pixels in every cell (N x (K+1) x H/s x W/s) and, at
    ``EDGE_STRIDES``, the fraction of outline pixels (N x 1 x H/s x W/s)."""
    one_hot = F.one_hot(labels.long(), len(PRETEXT_SHAPES) + 1).permute(0, 3, 1, 2).float()
    fractions = [F.avg_pool2d(one_hot, s) for s in STRIDES]
    outline = [F.avg_pool2d(edges[:, None].float(), s) for s in EDGE_STRIDES]
    return fractions, outline


def shapes_present(labels: torch.Tensor) -> torch.Tensor:
    """N x K booleans: which pretext shapes each label map holds (the presence head's target)."""
    return torch.stack([(labels == k + 1).flatten(1).any(1) for k in range(len(PRETEXT_SHAPES))], 1)


class DenseParser(nn.Module):
    """The Swin trunk with a 1x1 parsing head per stage, outline heads at strides 4 and 8, and a
    presence classifier (global average pool of the last stage, LayerNorm, linear, as Swin's head)."""

    def __init__(self, drop_path_rate: float = 0.1) -> None:
        super().__init__()
        self.trunk = build_swin_trunk("nano", drop_path_rate=drop_path_rate, out_indices=(0, 1, 2, 3))
        dims = self.trunk.num_features
        classes = len(PRETEXT_SHAPES) + 1
        self.parse = nn.ModuleList([nn.Conv2d(d, classes, 1) for d in dims])
        self.outline = nn.ModuleList([nn.Conv2d(dims[i], 1, 1) for i in range(len(EDGE_STRIDES))])
        self.norm = nn.LayerNorm(dims[-1])
        self.head = nn.Linear(dims[-1], len(PRETEXT_SHAPES))

    def forward(self, images: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor], torch.Tensor]:
        out = self.trunk(images)
        features = [out[f"p{i}"] for i in range(len(STRIDES))]
        parse = [head(f) for head, f in zip(self.parse, features)]
        outline = [head(f) for head, f in zip(self.outline, features)]
        presence = self.head(self.norm(features[-1].mean(dim=(2, 3))))
        return parse, outline, presence


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images.float() - PIXEL_MEAN) / PIXEL_STD


PRETEXTS = ("dense", "classification", "coarse")
COARSE_STAGES = (2, 3)  # strides 16 and 32: the stages the coarse pretext parses


def losses(model: DenseParser, batch: Dict[str, torch.Tensor], pretext: str = "dense") -> Dict[str, torch.Tensor]:
    """Soft-target cross-entropy per stage, outline BCE, presence BCE; ``pretext="classification"`` keeps only
    the presence BCE (image-level labels, as ImageNet pretraining gives a detector's trunk), ``"coarse"`` the
    presence BCE and the cross-entropy of the :data:`COARSE_STAGES`."""
    parse, outline, presence = model(normalise(batch["images"]))
    present = shapes_present(batch["labels"])
    if pretext == "classification":
        return {"presence": F.binary_cross_entropy_with_logits(presence, present.float())}
    fractions, outline_targets = dense_targets(batch["labels"], batch["edges"])
    if pretext == "coarse":
        return {
            "parse": sum(F.cross_entropy(parse[i], fractions[i]) for i in COARSE_STAGES) / len(COARSE_STAGES),
            "presence": F.binary_cross_entropy_with_logits(presence, present.float()),
        }
    return {
        "parse": sum(F.cross_entropy(p, t) for p, t in zip(parse, fractions)) / len(parse),
        "outline": sum(F.binary_cross_entropy_with_logits(o, t) for o, t in zip(outline, outline_targets)),
        "presence": F.binary_cross_entropy_with_logits(presence, present.float()),
    }


@torch.no_grad()
def held_out_metrics(model: DenseParser, pool: Dict[str, torch.Tensor], pretext: str = "dense") -> Dict[str, float]:
    """Held-out ``cell_accuracy`` (stride-8 cells whose majority class is predicted), its
    ``cell_majority_baseline`` (always answering the most frequent class, background), ``shape_cell_accuracy``
    (the same over cells whose majority is a shape), ``mean_iou`` over the six classes at stride 4, and
    ``presence_accuracy`` (present/absent right, per image and shape). The classification pretext trains no
    dense head, so only ``presence_accuracy`` is reported for it; the coarse one reports the cell metrics at
    stride 16, the finest stage it parses (``cell16_*``), and no stride-4 IoU."""
    model.eval()
    outs = [model(normalise(pool["images"][i:i + 64])) for i in range(0, len(pool["images"]), 64)]
    model.train()
    presence = torch.cat([o[2] for o in outs]) > 0
    presence_accuracy = round((presence == shapes_present(pool["labels"])).float().mean().item(), 4)
    if pretext == "classification":
        return {"presence_accuracy": presence_accuracy}
    fractions, _ = dense_targets(pool["labels"], pool["edges"])
    if pretext == "coarse":
        return {**_cell_metrics(outs, fractions, COARSE_STAGES[0], "16"), "presence_accuracy": presence_accuracy}
    pred4 = torch.cat([o[0][0].argmax(1) for o in outs])
    true4 = fractions[0].argmax(1)
    ious = []
    for k in range(len(PRETEXT_SHAPES) + 1):
        inter = ((pred4 == k) & (true4 == k)).sum().item()
        union = ((pred4 == k) | (true4 == k)).sum().item()
        if union:
            ious.append(inter / union)
    return {**_cell_metrics(outs, fractions, 1, ""), "mean_iou": round(float(np.mean(ious)), 4),
            "presence_accuracy": presence_accuracy}


def _cell_metrics(outs: List[Tuple[List[torch.Tensor], List[torch.Tensor], torch.Tensor]],
                  fractions: List[torch.Tensor], stage: int, tag: str) -> Dict[str, float]:
    """``cell{tag}_accuracy``, ``cell{tag}_majority_baseline`` and ``shape_cell{tag}_accuracy`` of one stage's
    parsing head against each cell's majority class."""
    pred = torch.cat([o[0][stage].argmax(1) for o in outs])
    true = fractions[stage].argmax(1)
    right = pred == true
    shape_cells = true != 0
    majority = torch.bincount(true.flatten()).argmax()
    return {
        f"cell{tag}_accuracy": round(right.float().mean().item(), 4),
        f"cell{tag}_majority_baseline": round((true == majority).float().mean().item(), 4),
        # 0 when no cell's majority is a shape (a tiny held-out set), rather than the NaN of an empty mean
        f"shape_cell{tag}_accuracy": round(right[shape_cells].float().mean().item(), 4) if shape_cells.any() else 0.0,
    }


def official_layout(model: DenseParser) -> Dict[str, torch.Tensor]:
    """Trunk, ``norm`` and ``head`` under Microsoft's names, fp16, without index buffers or detection norms."""
    state = {
        k: v for k, v in model.trunk.state_dict().items()
        if not k.endswith("relative_position_index") and not k.startswith(("norm0", "norm1", "norm2", "norm3"))
    }
    state.update({f"norm.{k}": v for k, v in model.norm.state_dict().items()})
    state.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    return {k: v.detach().half() for k, v in state.items()}


def pretrain(
    output: Path, steps: int, batch_size: int, image_size: int, seed: int, pool: int, held_out: int, lr: float,
    pretext: str = "dense",
) -> Dict:
    """Trains the parser and writes the checkpoint atomically; returns its ``meta``."""
    if pretext not in PRETEXTS:
        raise ValueError(f"pretext must be one of {PRETEXTS}, got {pretext!r}.")
    torch.manual_seed(seed)
    start = time.perf_counter()
    train_pool = render_pool(pool, image_size, seed)
    test_pool = render_pool(held_out, image_size, seed + 1)
    print(f"rendered {pool} + {held_out} images of {image_size}px in {time.perf_counter() - start:.1f} s", flush=True)

    model = DenseParser()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay
        optimizer, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(i, steps) / steps))
    )
    generator = torch.Generator().manual_seed(seed)
    for step in range(1, steps + 1):
        index = torch.randint(0, pool, (batch_size,), generator=generator)
        batch = augment({k: v[index] for k, v in train_pool.items()}, generator)
        parts = losses(model, batch, pretext)
        loss = sum(parts.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            metrics = held_out_metrics(model, test_pool, pretext)
            print(f"step {step}/{steps}  loss {loss.item():.3f} "
                  f"({', '.join(f'{k} {v.item():.3f}' for k, v in parts.items())})  held-out {metrics}  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)

    task = (
        f"multi-label classification of {list(PRETEXT_SHAPES)} (not the downstream shapes) on textured backgrounds"
        if pretext == "classification" else
        f"coarse parsing of {list(PRETEXT_SHAPES)} (not the downstream shapes) on textured backgrounds: "
        f"per-cell class fractions at strides {[STRIDES[i] for i in COARSE_STAGES]}, presence of each shape"
        if pretext == "coarse" else
        f"dense parsing of {list(PRETEXT_SHAPES)} (not the downstream shapes) on textured backgrounds: "
        f"per-cell class fractions at strides {list(STRIDES)}, outlines at {list(EDGE_STRIDES)}, "
        "presence of each shape"
    )
    meta = {
        "preset": "nano",
        "task": task,
        "pretext": pretext,
        "steps": steps, "batch_size": batch_size, "image_size": image_size, "seed": seed, "lr": lr,
        "pool": pool, "held_out": held_out_metrics(model, test_pool, pretext),
        "wall_time_s": round(time.perf_counter() - start),
        "torch_threads": torch.get_num_threads(),
        "script": "tools/pretrain_nano_swin.py",
    }
    atomic_torch_save({"model": official_layout(model), "meta": meta}, output)
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MB) in {time.perf_counter() - start:.0f} s: {meta}")
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=NANO_SWIN_WEIGHTS)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--pool", type=int, default=6000, help="distinct training images")
    parser.add_argument("--held-out", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretext", choices=PRETEXTS, default="dense",
                        help="dense: per-cell parsing, outlines and presence; classification: presence only; "
                             "coarse: presence and the parsing of strides 16 and 32")
    args = parser.parse_args()
    pretrain(args.output, args.steps, args.batch_size, args.image_size, args.seed, args.pool, args.held_out, args.lr,
             args.pretext)


if __name__ == "__main__":
    main()
