#!/usr/bin/env python
"""The embedded default: E3VA Mask R-CNN on the synthetic shapes task, on the CPU, end to end.

Generates the data (once), trains configs/Shapes/mask_rcnn_e3va.py through Detectron2's engine from the
project's own pretrained Swin "nano", evaluates COCO box and mask AP with Detectron2's COCOEvaluator,
draws predictions beside the ground truth with Detectron2's Visualizer, and prints where everything is.

    python tools/demo.py                       # E3VA (what `make demo` runs)
    python tools/demo.py --tuning fixed        # the heads-only baseline, for comparison
    python tools/demo.py --max-iter 200 KEY=VALUE ...   # any LazyConfig override
"""
import argparse
import copy
import logging
import time
from pathlib import Path

import torch
from detectron2.data import DatasetCatalog, detection_utils
from detectron2.engine import default_argument_parser

import e3va
from e3va.atomic import atomic_write_json
from e3va.data.shapes import ensure_shapes_dataset
from e3va.engine.params import count_parameters
from e3va.engine.training import do_test, do_train, setup
from e3va.visualize import draw_ground_truth, draw_instance_predictions, metadata_of, save_side_by_side

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "Shapes" / "mask_rcnn_e3va.py"
logger = logging.getLogger("e3va")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tuning", default="e3va", choices=sorted(e3va.TUNING_METHODS))
    parser.add_argument("--max-iter", type=int, default=None, help="default: the config's train.max_iter")
    parser.add_argument("--output-dir", default=None,
                        help="default: output/demo_<tuning>, overwritten by each run; a directory given here that "
                             "already holds checkpoints is refused (add train.allow_overwrite=True to overwrite)")
    parser.add_argument("--num-images", type=int, default=6, help="validation images to draw")
    parser.add_argument("--score-thresh", type=float, default=0.5)
    parser.add_argument("--also-evaluate", action="append", default=[], metavar="SPLIT",
                        help="after training, also evaluate the final model on this registered split (repeatable); "
                        "its AP goes to demo_summary.json under 'also_evaluated'")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="LazyConfig overrides, KEY=VALUE")
    return parser.parse_args()


def draw_validation_images(model: torch.nn.Module, dataset: str, out_dir: Path, num: int, thresh: float):
    """Predictions (left) beside the ground truth (right) for the first ``num`` images of ``dataset``."""
    metadata = metadata_of(dataset)
    model.eval()
    paths = []
    for record in DatasetCatalog.get(dataset)[:num]:
        image_bgr = detection_utils.read_image(record["file_name"], format="BGR")
        tensor = torch.as_tensor(image_bgr.transpose(2, 0, 1).copy())
        with torch.no_grad():
            (pred,) = model([{"image": tensor, "height": record["height"], "width": record["width"]}])
        rgb = image_bgr[:, :, ::-1]
        drawn = draw_instance_predictions(rgb, pred["instances"], metadata, thresh)
        truth = draw_ground_truth(rgb, record, metadata)
        paths.append(save_side_by_side(out_dir / f"{Path(record['file_name']).stem}.png", drawn, truth))
    return paths


def evaluate_on(cfg, model: torch.nn.Module, split: str) -> dict:
    """Box and mask AP of ``model`` on another registered split, with the config's evaluator."""
    cfg = copy.deepcopy(cfg)
    cfg.dataloader.test.dataset.names = split
    cfg.dataloader.evaluator.dataset_name = split
    results = do_test(cfg, model)
    return {"bbox_AP": results.get("bbox", {}).get("AP"), "segm_AP": results.get("segm", {}).get("AP")}


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    output_dir = Path(args.output_dir or REPO / "output" / f"demo_{args.tuning}")
    opts = [f"model.backbone.bottom_up.tuning={args.tuning}", f"train.output_dir={output_dir}"]
    if args.output_dir is None:  # the demo's own scratch directory: `make demo` twice retrains there
        opts.append("train.allow_overwrite=True")
    if args.max_iter is not None:
        opts += [f"train.max_iter={args.max_iter}", f"train.eval_period={args.max_iter}"]
    d2_args = default_argument_parser().parse_args(["--config-file", str(CONFIG), *opts, *args.opts])
    cfg = setup(d2_args)
    if cfg.train.init_checkpoint and not Path(cfg.train.init_checkpoint).is_file():
        raise FileNotFoundError(
            f"Pretrained trunk {cfg.train.init_checkpoint} is missing; regenerate it with "
            "`python tools/pretrain_nano_swin.py`."
        )
    for split in ("shapes_train", "shapes_val"):
        logger.info(f"Dataset {split}: {ensure_shapes_dataset(split)}")

    result = do_train(d2_args, cfg)
    if not result.eval_results:  # the config's eval period did not fall on the last iteration
        result.eval_results = do_test(cfg, result.model)
    vis_dir = output_dir / "predictions"
    test_set = cfg.dataloader.test.dataset.names
    images = draw_validation_images(result.model, test_set, vis_dir, args.num_images, args.score_thresh)

    also = {split: evaluate_on(cfg, result.model, split) for split in args.also_evaluate}

    summary = {
        "tuning": args.tuning,
        "iterations": cfg.train.max_iter,
        "backbone_trainable_params": count_parameters(result.model.backbone.bottom_up)[0],
        "bbox_AP": result.eval_results.get("bbox", {}).get("AP"),
        "segm_AP": result.eval_results.get("segm", {}).get("AP"),
        **(result.summary or {}),
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    if also:
        summary["also_evaluated"] = also
    atomic_write_json(summary, output_dir / "demo_summary.json")
    print("\n==== E3VA demo: done ====")
    print(f"tuning method     : {args.tuning}")
    print(f"COCO AP (val)     : box {summary['bbox_AP']:.1f}, mask {summary['segm_AP']:.1f}")
    print(f"trainable params  : {summary['backbone_trainable_params']:,d} in the backbone, "
          f"{summary['trainable_params']:,d} in all, of {summary['total_params']:,d}")
    for key in ("peak_rss_mb", "peak_mem_alloc_mb", "peak_mem_reserved_mb"):
        if key in summary:
            print(f"{key:<18}: {summary[key]:.0f} MB")
    if summary.get("mean_iter_time_s") is not None:
        print(f"mean iteration    : {summary['mean_iter_time_s']:.3f} s")
    print(f"wall time         : {summary['wall_time_s']} s")
    print(f"outputs           : {output_dir}")
    print(f"  metrics         : {output_dir / 'metrics.json'} (TensorBoard: tensorboard --logdir {output_dir})")
    print(f"  weights         : {output_dir / 'model_final.pth'}")
    print(f"  predictions     : {vis_dir} ({len(images)} images: prediction | ground truth)")
    print(f"  summary         : {output_dir / 'demo_summary.json'}")


if __name__ == "__main__":
    main()
