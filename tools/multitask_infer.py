#!/usr/bin/env python
"""Several tasks on one frozen trunk, one trunk pass per image: draws and writes every task's predictions.

Each task is a LazyConfig plus its weights (a trainable-only task file, or a full checkpoint), all on the base
weights ``--base`` (e.g. the pretrained trunk the tasks were trained from). ``e3va.multitask.MultiTaskModel``
loads the trunk once, runs it once per image with every task's side network beside it, then each task's FPN
and heads. Tasks may mix detectors and semantic segmentation, and the methods that leave the trunk unchanged
(``e3va*``, ``losa``, ``fixed``); tasks that cannot share the trunk are refused with the reason.

    python tools/multitask_infer.py --base projects/E3VA/e3va/weights/swin_nano_shapes_pretrained.pth \\
        --task detect=configs/Shapes/mask_rcnn_e3va.py:output/det/model_final_trainable.pth \\
        --task segment=configs/Shapes/semseg_upernet_e3va.py:output/seg/model_final_trainable.pth \\
        --input images/ --output output/multitask

For each image ``<stem>``: ``<stem>.png`` (each task's panels, left to right, under the task's name, drawn
with Detectron2's ``Visualizer``), ``<stem>/<task>.json`` (instances, COCO-style: boxes XYWH, scores,
category ids, RLE masks) and ``<stem>/<task>_sem_seg.png`` (the class index per pixel, 8-bit). Trailing
``KEY=VALUE`` arguments override every task's config (e.g. ``train.device=cpu``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.evaluation.coco_evaluation import instances_to_coco_json

TOOLS = str(Path(__file__).resolve().parent)
if TOOLS not in sys.path:  # the visualiser's argument helpers, beside this file (as when run as a script)
    sys.path.insert(0, TOOLS)
from visualize_predictions import (  # noqa: E402
    UsageError, _split_overrides, check_weights, config_metadata, input_images, load_config, output_path, run_tool,
)

from e3va.multitask import MultiTaskError, MultiTaskModel, TaskSpec  # noqa: E402
from e3va.predictor import ImageReadError, config_device, model_input, read_image  # noqa: E402
from e3va.visualize import draw_predictions, save_panels, semantic_labels  # noqa: E402

logger = logging.getLogger("e3va")


def parse_task(value: str) -> Tuple[str, str, Optional[str]]:
    """``NAME=CONFIG[:TASK_FILE]`` -> (name, config, task file or None)."""
    name, sep, rest = value.partition("=")
    config, _, weights = rest.partition(":")
    if not sep or not name or not config:
        raise argparse.ArgumentTypeError(f"--task {value!r}: expected NAME=CONFIG[:TASK_FILE], e.g. "
                                         "detect=configs/Shapes/mask_rcnn_e3va.py:task.pth")
    return name, config, weights or None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="base weights every task was trained on (the trunk)")
    parser.add_argument("--task", required=True, action="append", type=parse_task, metavar="NAME=CONFIG[:TASK_FILE]",
                        help="a task: its LazyConfig and weights (repeat for each task)")
    parser.add_argument("--input", required=True, nargs="+", help="image files or directories of images")
    parser.add_argument("--output", required=True, help="directory for the pictures and raw outputs")
    parser.add_argument("--score-thresh", type=float, default=0.5, help="instances below it are not drawn")
    parser.add_argument("--scale", type=float, default=1.0, help="drawn size relative to the image")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="LazyConfig overrides for every task, KEY=VALUE")
    args = parser.parse_args(argv)
    overrides: List[str] = []
    args.input = _split_overrides(args.input, overrides)
    if not args.input:
        parser.error("--input needs at least one image file or directory.")
    args.opts = overrides + list(args.opts)
    if not 0.0 <= args.score_thresh <= 1.0:
        parser.error(f"--score-thresh must be in [0, 1], got {args.score_thresh}.")
    return args


def titled(panel: np.ndarray, title: str) -> np.ndarray:
    """``panel`` (RGB) under a black strip holding ``title``."""
    strip = np.zeros((22, panel.shape[1], 3), np.uint8)
    cv2.putText(strip, title, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([strip, panel], axis=0)


def write_raw(directory: Path, task: str, outputs: Dict, image_id: str) -> List[Path]:
    """The task's raw outputs for one image: instances as COCO-style JSON, sem-seg labels as a PNG."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    if "instances" in outputs:
        path = directory / f"{task}.json"
        path.write_text(json.dumps(instances_to_coco_json(outputs["instances"].to("cpu"), image_id)))
        written.append(path)
    if "sem_seg" in outputs:
        sem_seg = outputs["sem_seg"]
        labels = semantic_labels(sem_seg, sem_seg.shape[-2], sem_seg.shape[-1]).cpu().numpy().astype(np.uint8)
        path = directory / f"{task}_sem_seg.png"
        if not cv2.imwrite(str(path), labels):
            raise OSError(f"Could not write {path}")
        written.append(path)
    return written


def infer(args: argparse.Namespace) -> Tuple[List[Path], List[str]]:
    """Runs every task on every image; returns the written pictures and the unreadable images' errors."""
    check_weights([args.base] + [w for _, _, w in args.task if w])
    specs = [TaskSpec(name, load_config(config, args.opts), [weights] if weights else [])
             for name, config, weights in args.task]
    images = input_images(args.input)
    try:
        device = config_device(specs[0].cfg)
    except RuntimeError as error:  # a CUDA config without CUDA: the message names train.device=cpu
        raise UsageError(str(error)) from None
    try:
        model = MultiTaskModel.from_configs(args.base, specs, device=device)
    except MultiTaskError as error:
        raise UsageError(str(error)) from None
    augmentations = T.AugmentationList(model.augmentations)
    metadata = {spec.name: config_metadata(spec.cfg) for spec in specs}
    logger.info(f"{len(specs)} task(s) on one trunk ({', '.join(metadata)}), {len(images)} image(s), {device}")

    output = Path(args.output)
    used: Dict[str, int] = {}
    written: List[Path] = []
    unreadable: List[str] = []
    for image_path in images:
        try:
            image = read_image(str(image_path), format=model.input_format)
        except ImageReadError as error:
            logger.error(f"Skipping {image_path}: {error}")
            unreadable.append(str(error))
            continue
        with torch.no_grad():
            outputs = model([model_input(image, augmentations, device)])
        rgb = detection_utils.convert_image_to_rgb(image, model.input_format)
        picture = output_path(output, image_path, used)
        panels = []
        for task, task_outputs in outputs.items():
            drawn = draw_predictions(rgb, task_outputs[0], metadata[task], args.score_thresh, args.scale)
            panels += [titled(panel, task) for panel in drawn]
            write_raw(picture.with_suffix(""), task, task_outputs[0], image_path.stem)
        written.append(save_panels(picture, panels))
        logger.info(f"{image_path} -> {written[-1]}")
    return written, unreadable


def main(argv: Optional[Sequence[str]] = None) -> List[Path]:
    """The command line; bad arguments and tasks that cannot share the trunk exit with status 2, unreadable
    images (after the others are done) with status 1."""
    args = parse_args(argv)
    return run_tool("multitask_infer", infer, args, f"picture(s) and the raw outputs to {args.output}")


if __name__ == "__main__":
    main()
