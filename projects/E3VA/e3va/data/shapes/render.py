"""Drawing one shapes image from a random generator: a textured background, then filled, coloured shapes
that may occlude each other, each annotated by the polygons of its visible part. Pure numpy/cv2, no files."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_util


SHAPES_CLASSES: Tuple[str, ...] = ("circle", "square", "triangle", "star")

# Acceptance rules for a new (occluding) shape; see _accept().
_MIN_VISIBLE_FRACTION = 0.4
_MIN_FRAGMENT_FRACTION = 0.1
_MIN_FRAGMENT_PIXELS = 12
_MIN_COLOR_DISTANCE = 90.0
_MAX_TRIES_PER_SHAPE = 30


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
