#!/usr/bin/env python
"""K tasks on one trunk pass (``e3va.multitask.MultiTaskModel``) against the K task models run one after the
other: time per image, resident memory and weight memory, for K = 1, 2, 3.

Presets: ``shapes`` (the nano Swin trunk, ``projects/E3VA/e3va/weights``: E3VA Mask R-CNN, E3VA UperNet,
LoSA Mask R-CNN from configs/Shapes, 128x128 images), ``swin_b`` (Swin-B, random weights: E3VA Mask R-CNN
and LoSA Mask R-CNN from configs/COCO, E3VA UperNet from configs/ADE20K at window 7, 512x512 images) and
``swin_b_detectors`` (E3VA Mask R-CNN, E3VA Cascade Mask R-CNN, LoSA Mask R-CNN). Side networks and heads keep
their initialisation (random weights are enough for time and memory).

Time: one process builds both the K separate models and the multi-task model, then alternates them on the
same image (``--runs`` times each, after a warm-up) and reports medians, so that the host's drift hits both
alike; outputs are checked equal first. Memory: one fresh process per (K, variant) builds it and runs one
image: resident set size after building and after the run, the peak, and the bytes of distinct parameters
and buffers (weights shared by tasks count once). Writes ``--output`` (JSON) and prints a Markdown table.

    MALLOC_MMAP_THRESHOLD_=131072 python tools/multitask_benchmark.py --preset shapes --runs 20 \\
        --output docs/multitask/shapes.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch
from detectron2.config import LazyConfig, instantiate

REPO = Path(__file__).resolve().parents[1]
PRESETS: Dict[str, Dict[str, Any]] = {
    "shapes": dict(size=128, tasks=[
        ("e3va_mask_rcnn", "configs/Shapes/mask_rcnn_e3va.py", []),
        ("e3va_upernet", "configs/Shapes/semseg_upernet_e3va.py", []),
        ("losa_mask_rcnn", "configs/Shapes/mask_rcnn_e3va.py", ["model.backbone.bottom_up.tuning=losa"]),
    ]),
    "swin_b": dict(size=512, tasks=[
        ("e3va_mask_rcnn", "configs/COCO/mask_rcnn_swin_b_e3va.py", []),
        ("e3va_upernet", "configs/ADE20K/upernet_swin_b_e3va.py", ["model.backbone.bottom_up.window_size=7"]),
        ("losa_mask_rcnn", "configs/COCO/mask_rcnn_swin_b_e3va.py", ["model.backbone.bottom_up.tuning=losa"]),
    ]),
    # Three detectors: the trunk is a larger share of each model than beside UperNet's 512-channel head.
    "swin_b_detectors": dict(size=512, tasks=[
        ("e3va_mask_rcnn", "configs/COCO/mask_rcnn_swin_b_e3va.py", []),
        ("e3va_cascade_mask_rcnn", "configs/COCO/cascade_mask_rcnn_swin_b_e3va.py", []),
        ("losa_mask_rcnn", "configs/COCO/mask_rcnn_swin_b_e3va.py", ["model.backbone.bottom_up.tuning=losa"]),
    ]),
}
COMMON_OVERRIDES = ["train.device=cpu", "dataloader.test.mapper.augmentations=[]"]


def _configs(preset: str, k: int):
    from e3va.overrides import apply_overrides
    from e3va.multitask import TaskSpec

    return [TaskSpec(name, apply_overrides(LazyConfig.load(str(REPO / path)), COMMON_OVERRIDES + overrides))
            for name, path, overrides in PRESETS[preset]["tasks"][:k]]


def base_weights(preset: str, directory: Path) -> str:
    """The trunk weights every task loads: the shipped nano trunk, or a random Swin-B trunk saved as Swin
    classification weights (what a user's pretrained file looks like)."""
    from e3va import NANO_SWIN_WEIGHTS, build_swin_trunk

    if preset == "shapes":
        return str(NANO_SWIN_WEIGHTS)
    path = directory / "swin_b_random.pth"
    if not path.exists():
        torch.manual_seed(0)
        torch.save({"model": build_swin_trunk("B").state_dict()}, path)
    return str(path)


def build(preset: str, k: int, variant: str, base: str):
    """``variant`` "multi": one MultiTaskModel of the first ``k`` tasks; "separate": the ``k`` task models.
    Task ``i``'s model is initialised from seed ``i`` either way (so both variants hold the same weights), and
    the multi-task model takes each task as it is built, so that each task's own trunk is dropped at once."""
    from e3va import E3VACheckpointer
    from e3va.multitask import MultiTaskModel

    models, multi = [], None
    for i, spec in enumerate(_configs(preset, k)):
        torch.manual_seed(i)
        model = instantiate(spec.cfg.model)
        E3VACheckpointer(model).load(base)
        model.eval()
        if variant == "separate":
            models.append(model)
        elif multi is None:
            multi = MultiTaskModel({spec.name: model})
        else:
            multi.add_task(spec.name, model)
    return models if variant == "separate" else multi.eval()


def run(built, inputs: List[Dict[str, Any]]) -> List[Any]:
    with torch.no_grad():
        if isinstance(built, list):
            return [model(inputs)[0] for model in built]
        return [outputs[0] for outputs in built(inputs).values()]


def image(preset: str) -> List[Dict[str, Any]]:
    size = PRESETS[preset]["size"]
    generator = torch.Generator().manual_seed(0)
    return [{"image": torch.randint(0, 256, (3, size, size), generator=generator).float(), "height": size, "width": size}]


def weight_bytes(built) -> int:
    modules = built if isinstance(built, list) else [built]
    seen, total = set(), 0
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def measure_memory(preset: str, k: int, variant: str, base: str) -> Dict[str, float]:
    """In this (fresh) process: build, run one image, report memory."""
    from e3va.engine.memory import current_rss_mb, peak_rss_mb

    torch.set_num_threads(1)
    before = current_rss_mb()
    built = build(preset, k, variant, base)
    built_rss = current_rss_mb()
    run(built, image(preset))
    return {"rss_start_mb": before, "rss_built_mb": built_rss, "rss_after_run_mb": current_rss_mb(),
            "peak_rss_mb": peak_rss_mb(), "weights_mb": weight_bytes(built) / 2**20}


def _equal(a: Any, b: Any) -> bool:
    if "instances" in a:
        x, y = a["instances"], b["instances"]
        return len(x) == len(y) and torch.allclose(x.pred_boxes.tensor, y.pred_boxes.tensor, atol=1e-4)
    return torch.allclose(a["sem_seg"], b["sem_seg"], atol=1e-4)


def measure_time(preset: str, k: int, base: str, runs: int, threads: int) -> Dict[str, Any]:
    torch.set_num_threads(threads)
    separate, multi = build(preset, k, "separate", base), build(preset, k, "multi", base)
    inputs = image(preset)
    equal = all(_equal(a, b) for a, b in zip(run(separate, inputs), run(multi, inputs)))  # also the warm-up
    times: Dict[str, List[float]] = {"separate": [], "multi": []}
    for _ in range(runs):
        for name, built in (("separate", separate), ("multi", multi)):
            start = time.perf_counter()
            run(built, inputs)
            times[name].append(time.perf_counter() - start)
    return {"outputs_equal": equal, "threads": threads, "runs": runs,
            **{f"{name}_ms": 1000 * statistics.median(values) for name, values in times.items()}}


def main(argv: Sequence[str] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--tasks", default="1,2,3", help="the values of K, e.g. 1,2,3")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", help="JSON file to write")
    parser.add_argument("--memory-probe", nargs=3, metavar=("K", "VARIANT", "BASE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_probe:  # the child process of a memory measurement
        k, variant, base = args.memory_probe
        print(json.dumps(measure_memory(args.preset, int(k), variant, base)))
        return {}
    ks = [int(k) for k in args.tasks.split(",")]
    if not ks or min(ks) < 1 or max(ks) > len(PRESETS[args.preset]["tasks"]):
        parser.error(f"--tasks {args.tasks!r}: each K must be in 1..{len(PRESETS[args.preset]['tasks'])}.")
    result: Dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name] + list(argv if argv is not None else sys.argv[1:])),
        "preset": args.preset, "tasks": [name for name, _, _ in PRESETS[args.preset]["tasks"]],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "torch": torch.__version__,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "load_before": os.getloadavg(), "by_k": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        base = base_weights(args.preset, Path(tmp))
        for k in ks:
            entry = measure_time(args.preset, k, base, args.runs, args.threads)
            for variant in ("separate", "multi"):
                probe = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--memory-probe", str(k),
                                        variant, base], check=True, capture_output=True, text=True)
                entry[variant + "_memory"] = json.loads(probe.stdout.strip().splitlines()[-1])
            entry["load_after"] = os.getloadavg()
            result["by_k"][k] = entry
            print(json.dumps({k: entry}), flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return result


def table(result: Dict[str, Any]) -> str:
    lines = ["| K | separate | one trunk pass | time ratio | RSS separate | RSS one pass | RSS ratio | weights separate | weights one pass | weight ratio |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for k, e in result["by_k"].items():
        s, m = e["separate_memory"], e["multi_memory"]
        lines.append(f"| {k} | {e['separate_ms']:.0f} ms | {e['multi_ms']:.0f} ms | {e['multi_ms'] / e['separate_ms']:.2f}× "
                     f"| {s['rss_after_run_mb']:.0f} MB | {m['rss_after_run_mb']:.0f} MB "
                     f"| {m['rss_after_run_mb'] / s['rss_after_run_mb']:.2f}× | {s['weights_mb']:.0f} MB "
                     f"| {m['weights_mb']:.0f} MB | {m['weights_mb'] / s['weights_mb']:.2f}× |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
