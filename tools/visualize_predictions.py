#!/usr/bin/env python
"""Draws a model's predictions with Detectron2's Visualizer: one PNG per image.

Builds the model of a LazyConfig, loads ``--weights`` with ``e3va.E3VACheckpointer``, resizes each image
as the config's evaluation does (``dataloader.test.mapper.augmentations``) and writes, left to right:
the instance predictions (boxes, masks, labels scoring at least ``--score-thresh``), the semantic
prediction (argmax of ``sem_seg``) when the model has one, and with ``--dataset`` the ground truth.

    python tools/visualize_predictions.py --config-file configs/Shapes/mask_rcnn_e3va.py \\
        --weights output/shapes_mask_rcnn_e3va/model_final.pth --dataset shapes_val --max-images 8 \\
        --output output/vis
    python tools/visualize_predictions.py --config-file configs/VOC/faster_rcnn_swin_l_e3va.py \\
        --weights model_final.pth --input photo.jpg more_photos/ --output vis train.device=cpu

``--weights`` takes several files, loaded in order (base weights, then a trainable-only part).
Trailing ``KEY=VALUE`` arguments override the config, as in tools/lazyconfig_train_net.py (also right
after the ``--input`` or ``--weights`` lists); a CUDA config runs on a machine without CUDA with
``train.device=cpu``.

An image that cannot be read (corrupted, truncated, not an image) is named and skipped; the others are drawn,
and the tool then exits with status 1. 16-bit grayscale images are drawn at their 16-bit range.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from detectron2.config import LazyConfig
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.utils.logger import setup_logger
from omegaconf import DictConfig, OmegaConf

from e3va.overrides import ConfigOverrideError, apply_overrides
from e3va.data.roots import DatasetRootError, UnknownDatasetError, require_dataset_root
from e3va.predictor import ImageReadError, LazyPredictor, config_device
from e3va.visualize import draw_ground_truth, draw_predictions, save_panels

logger = logging.getLogger("e3va")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class UsageError(Exception):
    """A bad argument; main() turns it into a one-line error and exit status 2."""


def _split_overrides(values: Sequence[str], overrides: List[str]) -> List[str]:
    """``values`` without the ``KEY=VALUE`` items (appended to ``overrides``); an existing path with
    "=" in its name stays a path."""
    kept = []
    for value in values:
        is_override = "=" in value and not value.startswith("=") and not Path(value).exists()
        (overrides if is_override else kept).append(value)
    return kept


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="a LazyConfig file (configs/...)")
    parser.add_argument("--weights", required=True, nargs="+", help="checkpoint file(s), loaded in order")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files or directories of images")
    source.add_argument("--dataset", help="a registered dataset: draws its ground truth beside the predictions")
    parser.add_argument("--output", required=True, help="directory for the PNG files")
    parser.add_argument("--score-thresh", type=float, default=0.5, help="instances below it are not drawn")
    parser.add_argument("--max-images", type=int, default=None, help="draw at most this many images")
    parser.add_argument("--scale", type=float, default=1.0, help="drawn size relative to the image")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="LazyConfig overrides, KEY=VALUE")
    args = parser.parse_args(argv)
    # argparse gives the KEY=VALUE overrides that follow --input/--weights to those lists: move them back.
    overrides: List[str] = []
    args.weights = _split_overrides(args.weights, overrides)
    if args.input is not None:
        args.input = _split_overrides(args.input, overrides)
        if not args.input:
            parser.error("--input needs at least one image file or directory.")
    if not args.weights:
        parser.error("--weights needs at least one checkpoint file.")
    args.opts = overrides + list(args.opts)
    if args.max_images is not None and args.max_images < 1:
        parser.error(f"--max-images must be at least 1, got {args.max_images}.")
    if not 0.0 <= args.score_thresh <= 1.0:
        parser.error(f"--score-thresh must be in [0, 1], got {args.score_thresh}.")
    if args.scale <= 0:
        parser.error(f"--scale must be positive, got {args.scale}.")
    return args


def load_config(config_file: str, opts: Sequence[str]) -> DictConfig:
    if not Path(config_file).is_file():
        raise UsageError(f"--config-file {config_file!r} does not exist.")
    try:
        return apply_overrides(LazyConfig.load(config_file), list(opts))
    except ConfigOverrideError as error:  # a mistyped key: the message names the closest ones
        raise UsageError(str(error)) from None


def check_weights(weights: Sequence[str]) -> None:
    """Local checkpoint files must exist (fvcore would only assert). URLs and timm model names
    (``swin_base_patch4_window7_224.ms_in22k``, which E3VACheckpointer also takes) are left to the loader."""
    for weight in weights:
        looks_local = os.sep in weight or Path(weight).suffix in (".pth", ".pkl", ".pt")
        if "://" not in weight and looks_local and not Path(weight).is_file():
            raise UsageError(f"--weights {weight!r} does not exist.")


def input_images(paths: Sequence[str]) -> List[Path]:
    """The files named, and the images (by suffix, sorted) in the directories named."""
    images: List[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UsageError(f"--input directory {name!r} holds no image ({', '.join(IMAGE_SUFFIXES)}).")
            images += found
        elif path.is_file():
            images.append(path)
        else:
            raise UsageError(f"--input {name!r} is neither an image file nor a directory.")
    return images


def dataset_records(name: str) -> List[Dict]:
    """The dataset's records, after checking that it is registered and that its files are there."""
    try:
        require_dataset_root(name)
    except (UnknownDatasetError, DatasetRootError) as error:
        raise UsageError(f"--dataset: {error}") from None
    return DatasetCatalog.get(name)


def config_metadata(cfg: DictConfig):
    """Class names and colours for drawing ``--input`` images: the metadata of the config's (first)
    test dataset when it is registered, else none (classes drawn by index)."""
    names = OmegaConf.select(cfg, "dataloader.test.dataset.names", default=None)
    if names is not None and not isinstance(names, str):
        names = names[0] if len(names) else None
    if names is not None and names in DatasetCatalog.list():
        return MetadataCatalog.get(names)
    return Metadata(name="(no dataset)")


def output_path(output: Path, image: Path, used: Dict[str, int]) -> Path:
    """``<output>/<image stem>.png``; a second image with the same stem gets ``_1``, ``_2``, ..."""
    stem = image.stem
    count = used.get(stem, 0)
    used[stem] = count + 1
    return output / (f"{stem}.png" if count == 0 else f"{stem}_{count}.png")


def jobs(args: argparse.Namespace) -> Tuple[List[Tuple[Path, Optional[Dict]]], Optional[str]]:
    """(image path, ground-truth record or None) to draw, and the dataset name when there is one."""
    if args.dataset is not None:
        records = dataset_records(args.dataset)[: args.max_images]
        return [(Path(r["file_name"]), r) for r in records], args.dataset
    images = input_images(args.input)[: args.max_images]
    return [(p, None) for p in images], None


def visualize(args: argparse.Namespace) -> Tuple[List[Path], List[str]]:
    """Draws and writes every image; returns the written paths and, for each image that could not be
    read (skipped, so that one bad file does not cost the batch), why."""
    cfg = load_config(args.config_file, args.opts)
    check_weights(args.weights)
    todo, dataset = jobs(args)  # before building the model: bad data fails fast
    try:
        device = config_device(cfg)
    except RuntimeError as error:  # CUDA config, no CUDA: the message names train.device=cpu
        raise UsageError(str(error)) from None
    metadata = MetadataCatalog.get(dataset) if dataset else config_metadata(cfg)
    predictor = LazyPredictor(cfg, args.weights, device=device)
    logger.info(f"Drawing {len(todo)} image(s) on {device} into {args.output}")

    output = Path(args.output)
    used: Dict[str, int] = {}
    written: List[Path] = []
    unreadable: List[str] = []
    for image_path, record in todo:
        try:
            image = predictor.read(str(image_path))
        except ImageReadError as error:
            logger.error(f"Skipping {image_path}: {error}")
            unreadable.append(str(error))
            continue
        outputs = predictor(image)
        rgb = predictor.to_rgb(image)
        panels = draw_predictions(rgb, outputs, metadata, args.score_thresh, args.scale)
        if record is not None:
            panels.append(draw_ground_truth(rgb, record, metadata, scale=args.scale))
        written.append(save_panels(output_path(output, image_path, used), panels))
        num = len(outputs["instances"]) if "instances" in outputs else 0
        logger.info(f"{image_path} -> {written[-1]} ({num} instances before the score threshold)")
    return written, unreadable


def run_tool(prog: str, work: Callable[[argparse.Namespace], Tuple[List[Path], List[str]]],
             args: argparse.Namespace, wrote: str) -> List[Path]:
    """Runs ``work(args)`` (written files, unreadable images' errors) with the exit codes of the drawing
    tools: a :class:`UsageError` exits with status 2 and its message; unreadable images, after the others are
    done, with status 1 and their names. Prints ``Wrote <count> <wrote>``; returns the written paths."""
    setup_logger(name="e3va", abbrev_name="e3va")
    setup_logger(name="detectron2", abbrev_name="d2")
    try:
        written, unreadable = work(args)
    except UsageError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"Wrote {len(written)} {wrote}")
    if unreadable:
        listed = "\n  ".join(unreadable)
        print(f"{prog}: error: skipped {len(unreadable)} unreadable image(s):\n  {listed}", file=sys.stderr)
        raise SystemExit(1)
    return written


def main(argv: Optional[Sequence[str]] = None) -> List[Path]:
    """The command line; returns the written PNG paths. Bad arguments exit with status 2 and a message;
    unreadable images, after the others are drawn, with status 1 and their names."""
    args = parse_args(argv)
    return run_tool("visualize_predictions", visualize, args, f"image(s) to {args.output}")


if __name__ == "__main__":
    main()
