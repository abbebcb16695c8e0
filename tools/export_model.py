#!/usr/bin/env python
"""Exports an E3VA detector to TorchScript or ONNX by tracing, as Detectron2's tools/deploy/export_model.py does.

    python tools/export_model.py --config-file configs/Shapes/mask_rcnn_e3va.py \\
        --weights output/shapes_mask_rcnn_e3va/model_final.pth --format torchscript --export-method tracing \\
        --sample-image image.png --output export/shapes_ts
    python tools/export_model.py --config-file configs/COCO/mask_rcnn_swin_t_e3va.py \\
        --weights swin_t_base.pth task.pth --format onnx --export-method tracing --sample-image photo.jpg \\
        --output export/swin_t_onnx train.device=cpu 'dataloader.test.mapper.augmentations=[]'

The model is built and its ``--weights`` loaded as tools/visualize_predictions.py does (a full checkpoint, or base
weights then a trainable-only task file); the sample image is resized as the config's evaluation does. The trace
runs Detectron2's ``TracingAdapter``: the exported model takes that one image, a float32 ``(3, H, W)`` tensor in
the config's input format (0-255), and returns flat tensors; for an R-CNN, Detectron2's outputs before
post-processing (boxes in the input image's pixels, ``28 x 28`` mask probabilities per box). ``--part backbone``
exports the normalisation, the trunk with its side network and the FPN instead (one tensor per FPN level).

The trace fixes the input size: the exported model takes images of the sample's size (after resizing) only, and
refuses others (some would otherwise run, wrongly). It is checked against the eager model on the sample image (``--atol``/``--rtol``), and ``--benchmark N`` times both.
Written to ``--output``: ``model.ts`` or ``model.onnx``, and ``export.json`` (config, method, input format and
size, outputs, check, sizes, timings). A TorchScript file runs with torch and torchvision only (their ops
``torchvision::nms`` and ``torchvision::roi_align``); see docs/DEPLOY.md.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.export import TracingAdapter
from detectron2.export.flatten import DictSchema, InstancesSchema, ListSchema, Schema
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.backbone.swin import SwinTransformerBlock
from detectron2.utils.logger import setup_logger
from torch import nn

TOOLS = str(Path(__file__).resolve().parent)
if TOOLS not in sys.path:  # the visualiser's argument helpers, beside this file (as when run as a script)
    sys.path.insert(0, TOOLS)
from visualize_predictions import UsageError, _split_overrides, check_weights, load_config  # noqa: E402

from e3va.predictor import LazyPredictor, config_device, input_format_of  # noqa: E402

logger = logging.getLogger("e3va")

FORMATS = ("torchscript", "onnx")
METHODS = ("tracing",)  # Detectron2's "scripting" and "caffe2_tracing" do not apply to these models
PARTS = ("detector", "backbone")
FILE_NAMES = {"torchscript": "model.ts", "onnx": "model.onnx"}
ONNX_OPSET = 17  # the first with a LayerNorm operator; torchvision's roi_align needs 16 or more


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="a LazyConfig file (configs/...)")
    parser.add_argument("--weights", required=True, nargs="+", help="checkpoint file(s), loaded in order")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to export to")
    parser.add_argument("--export-method", default="tracing", choices=METHODS, help="how (tracing only)")
    parser.add_argument("--sample-image", required=True, help="the image to trace and check with")
    parser.add_argument("--output", required=True, help="directory for the exported model and export.json")
    parser.add_argument("--part", default="detector", choices=PARTS,
                        help="the whole detector, or the backbone (normalisation, trunk, side network, FPN)")
    parser.add_argument("--atol", type=float, default=1e-4, help="check: |exported - eager| <= atol + rtol |eager|")
    parser.add_argument("--rtol", type=float, default=1e-4, help="see --atol")
    parser.add_argument("--benchmark", type=int, default=0, metavar="N",
                        help="time N runs of the eager and the exported model on the sample (median per image)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="LazyConfig overrides, KEY=VALUE")
    args = parser.parse_args(argv)
    overrides: List[str] = []
    args.weights = _split_overrides(args.weights, overrides)  # KEY=VALUE right after --weights: an override
    if not args.weights:
        parser.error("--weights needs at least one checkpoint file.")
    args.opts = overrides + list(args.opts)
    if args.benchmark < 0:
        parser.error(f"--benchmark must be 0 (off) or a number of runs, got {args.benchmark}.")
    if args.atol < 0 or args.rtol < 0:
        parser.error(f"--atol and --rtol must be non-negative, got {args.atol} and {args.rtol}.")
    return args


# ---------------------------------------------------------------------------------------------- what is traced
class BackboneWithPreprocessing(nn.Module):
    """The detector's normalisation and padding, then its backbone (trunk, side network, FPN): one image in,
    the FPN's levels out, in the backbone's order."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.detector = detector
        self.names = list(detector.backbone.output_shape())

    def forward(self, image: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        images = self.detector.preprocess_image([{"image": image}])
        features = self.detector.backbone(images.tensor)
        return tuple(features[name] for name in self.names)


def _rcnn_inference(model: GeneralizedRCNN, inputs: List[Dict[str, torch.Tensor]]) -> List[Dict[str, Any]]:
    # Without post-processing, as Detectron2's exporter: the final resize needs the original image size, and
    # pasting masks into it is best left to the deployment (it scales with the image, not the model).
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


def require_eval(model: nn.Module) -> None:
    """ValueError unless ``model`` is in eval mode (in training mode a detector returns losses, and the side
    network runs memory-saving autograd functions that cannot be traced)."""
    training = sorted({name or type(model).__name__ for name, m in model.named_modules() if m.training})
    if training:
        raise ValueError(
            f"Export needs a model in eval mode; {training[0]!r} (and {len(training) - 1} more modules) are in "
            "training mode. Call model.eval() first."
        )


def traceable(model: nn.Module, image: torch.Tensor, part: str) -> Tuple[nn.Module, List[str]]:
    """The module to trace for ``part`` (one of PARTS), taking ``image``, and the names of its flat outputs."""
    if part not in PARTS:
        raise ValueError(f"Unknown part {part!r}; expected one of {list(PARTS)}.")
    require_eval(model)
    if part == "backbone":
        module = BackboneWithPreprocessing(model).eval()
        return module, list(module.names)
    inference = _rcnn_inference if isinstance(model, GeneralizedRCNN) else None  # others: called directly
    adapter = TracingAdapter(model, [{"image": image}], inference).eval()  # a new module is in training mode
    with torch.no_grad():
        flat = adapter(image)  # also records the outputs' schema
    return adapter, output_names(adapter.outputs_schema, len(flat))


def output_names(schema: Schema, count: int) -> List[str]:
    """Names of a TracingAdapter's flat outputs from its schema: the field names (``pred_boxes``, ...,
    ``image_size`` for Instances); ``output{i}`` where the schema does not say."""

    def names(node: Schema, path: str) -> List[str]:
        if isinstance(node, DictSchema):
            out = [n for key, sub in zip(node.keys, node.schemas) for n in names(sub, key)]
            return out + (["image_size"] if isinstance(node, InstancesSchema) else [])
        if isinstance(node, ListSchema):
            return [n for sub in node.schemas for n in names(sub, path)]
        return [path]

    found = names(schema, "")
    if len(found) != count or len(set(found)) != count or "" in found:
        return [f"output{i}" for i in range(count)]
    return found


# ---------------------------------------------------------------------------------------------- exporting
class FixedSize(nn.Module):
    """The traced model behind a check of the input's shape: the trace fixed the sizes, and some other sizes
    (those that pad to the same windows) would run without an error, wrongly. Scripted around the trace."""

    def __init__(self, traced: nn.Module, shape: Sequence[int]) -> None:
        super().__init__()
        self.traced = traced
        self.shape: List[int] = list(shape)

    def forward(self, image: torch.Tensor):
        if list(image.shape) != self.shape:
            raise ValueError("This model was traced for an input of shape " + str(self.shape) + ", got "
                             + str(list(image.shape)) + ": resize or pad images to the traced shape.")
        return self.traced(image)


@contextlib.contextmanager
def constant_shift_masks(model: nn.Module, image: torch.Tensor, module: nn.Module) -> Iterator[None]:
    """Within: every shifted Swin block of ``model`` gets its attention mask for ``image`` as a constant.

    The trace fixes the mask anyway (it depends on the padded size only), but Detectron2's Swin builds it with
    slice assignments that are empty when a stage fits in one window, which the ONNX exporter cannot convert
    (an internal assert on a zero-size Reshape). The masks are recorded from one eager run of ``module``.
    """
    blocks = [m for m in model.modules() if isinstance(m, SwinTransformerBlock) and m.shift_size > 0]
    masks: Dict[nn.Module, torch.Tensor] = {}
    handles = [b.register_forward_pre_hook(lambda m, args: masks.__setitem__(m, args[1])) for b in blocks]
    try:
        with torch.no_grad():
            module(image)
    finally:
        for handle in handles:
            handle.remove()
    handles = [b.register_forward_pre_hook(lambda m, args: (args[0], masks[m])) for b in blocks]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def export(module: nn.Module, model: nn.Module, image: torch.Tensor, fmt: str, path: Path,
           names: Sequence[str]) -> None:
    """Traces ``module`` (from :func:`traceable`; ``model`` is the detector it wraps) on ``image`` into ``path``."""
    require_eval(model)
    with warnings.catch_warnings():
        # The tracer warns at each Python int it fixes (padding, window counts): the fixed size is documented.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        if fmt == "torchscript":
            traced = torch.jit.trace(module, (image,), check_trace=False)
            torch.jit.save(torch.jit.script(FixedSize(traced, image.shape)), str(path))
        elif fmt == "onnx":
            with constant_shift_masks(model, image, module):
                # No dynamic axes: the input's shape is fixed in the file, and ONNX Runtime refuses others.
                torch.onnx.export(module, (image,), str(path), opset_version=ONNX_OPSET, dynamo=False,
                                  input_names=["image"], output_names=list(names))
        else:
            raise ValueError(f"Unknown format {fmt!r}; expected one of {list(FORMATS)}.")
    module.eval()  # torch.onnx.export restores the wrapper's mode, and a new wrapper starts in training mode
    model.eval()


def load_exported(fmt: str, path: Path, threads: int) -> Callable[[torch.Tensor], List[np.ndarray]]:
    """A function running the exported file (TorchScript or ONNX Runtime) on one image."""
    if fmt == "torchscript":
        ts = torch.jit.load(str(path))
        return lambda image: [t.detach().numpy() for t in ts(image)]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads  # as many as torch uses, for a fair timing
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda image: session.run(None, {"image": image.numpy()})


def compare(exported: Sequence[np.ndarray], eager: Sequence[np.ndarray], names: Sequence[str], atol: float,
            rtol: float) -> Dict[str, float]:
    """The largest difference per output; ValueError naming the first output that differs in shape or value."""
    if len(exported) != len(eager):
        raise ValueError(f"The exported model returns {len(exported)} outputs, the eager one {len(eager)}.")
    diffs = {}
    for name, a, b in zip(names, exported, eager):
        if a.shape != b.shape:
            raise ValueError(f"Output {name!r}: exported shape {a.shape}, eager {b.shape}.")
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        if diff.size and not np.all(diff <= atol + rtol * np.abs(b.astype(np.float64))):
            raise ValueError(f"Output {name!r} differs from the eager model's by up to {diff.max():.3g} "
                             f"(atol={atol}, rtol={rtol}).")
        diffs[name] = float(diff.max()) if diff.size else 0.0
    return diffs


def median_ms(fn: Callable[[], Any], runs: int) -> float:
    """Median wall time of ``runs`` calls of ``fn``, in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


# ---------------------------------------------------------------------------------------------- the command
def sample_input(predictor: LazyPredictor, path: str) -> torch.Tensor:
    """The sample image as the model gets it: read in the input format, resized by the config's test
    augmentations, as a float32 (3, H, W) tensor (as LazyPredictor feeds it)."""
    aug_input = T.AugInput(predictor.read(path))
    predictor.augmentations(aug_input)
    resized = aug_input.image if aug_input.image.ndim == 3 else aug_input.image[:, :, None]
    return torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))).float()


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Exports, checks and (with --benchmark) times; writes the model and export.json; returns the latter."""
    cfg = load_config(args.config_file, args.opts)
    check_weights(args.weights)
    if not Path(args.sample_image).is_file():  # before building the model: bad arguments fail fast
        raise UsageError(f"--sample-image {args.sample_image!r} does not exist.")
    try:
        device = config_device(cfg)
    except RuntimeError as error:  # CUDA config, no CUDA: the message names train.device=cpu
        raise UsageError(str(error)) from None
    if device.type != "cpu":
        raise UsageError(f"Export runs on the CPU; the config says train.device={device}: add train.device=cpu.")
    predictor = LazyPredictor(cfg, args.weights, device=device)
    image = sample_input(predictor, args.sample_image)
    model = predictor.model
    module, names = traceable(model, image, args.part)

    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    path = output / FILE_NAMES[args.format]
    logger.info(f"Tracing the {args.part} on a {tuple(image.shape)} image into {path}")
    export(module, model, image, args.format, path, names)
    with torch.no_grad():
        eager = [t.detach().numpy() for t in module(image)]
    exported = load_exported(args.format, path, torch.get_num_threads())
    diffs = compare(exported(image), eager, names, args.atol, args.rtol)
    info = describe(args, cfg, image, path, names, eager, diffs)
    if args.benchmark:
        info["latency_ms_per_image"] = timings(module, exported, image, args.format, args.benchmark)
    (output / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def timings(module: nn.Module, exported: Callable, image: torch.Tensor, fmt: str, runs: int) -> Dict[str, Any]:
    """Median latency of the eager module and of the exported file on ``image``, and where it was measured."""
    runtime = "torchscript" if fmt == "torchscript" else "onnxruntime"
    with torch.no_grad():
        eager_ms = median_ms(lambda: module(image), runs)
    return {
        "eager_pytorch": round(eager_ms, 1),
        runtime: round(median_ms(lambda: exported(image), runs), 1),
        "runs": runs,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.date.today().isoformat(),
    }


def describe(args: argparse.Namespace, cfg, image: torch.Tensor, path: Path, names: Sequence[str],
             eager: Sequence[np.ndarray], diffs: Dict[str, float]) -> Dict[str, Any]:
    """The contents of export.json: what was exported, how to feed it, what it returns, how it was checked."""
    return {
        "config": args.config_file,
        "overrides": list(args.opts),
        "weights": list(args.weights),
        "format": args.format,
        "export_method": args.export_method,
        "part": args.part,
        "file": path.name,
        "file_bytes": path.stat().st_size,
        "input": {
            "name": "image",
            "dtype": "float32",
            "shape": list(image.shape),
            "format": input_format_of(cfg),
            "note": "one image, (3, H, W), 0-255, after the config's test resize; only this shape is accepted",
        },
        "outputs": [{"name": n, "dtype": str(a.dtype), "shape_on_sample": list(a.shape)} for n, a in zip(names, eager)],
        "outputs_note": OUTPUTS_NOTE[args.part],
        "runtime": "torch + torchvision (ops torchvision::nms, torchvision::roi_align)"
        if args.format == "torchscript" else f"ONNX Runtime, opset {ONNX_OPSET}",
        "check": {"atol": args.atol, "rtol": args.rtol, "max_abs_diff": diffs},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
    }


OUTPUTS_NOTE = {
    "detector": "Detectron2's outputs before post-processing: boxes (x1, y1, x2, y2) in the input image's "
    "pixels, class indices, per-box 28x28 mask probabilities (paste them into the box), scores, and the "
    "input's (H, W). Scale boxes to the original image and paste masks as detectron2's detector_postprocess.",
    "backbone": "The FPN's levels, (1, C, H/stride, W/stride) each, from the normalised and padded image.",
}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """The command line; returns export.json's contents. Bad arguments exit with status 2 and a message."""
    args = parse_args(argv)
    setup_logger(name="e3va", abbrev_name="e3va")
    setup_logger(name="detectron2", abbrev_name="d2")
    try:
        info = run(args)
    except UsageError as error:
        print(f"export_model: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"Exported the {info['part']} to {Path(args.output) / info['file']} ({info['file_bytes'] / 2**20:.1f} MiB); "
          f"largest difference from eager: {max(info['check']['max_abs_diff'].values(), default=0.0):.2g}")
    if "latency_ms_per_image" in info:
        print(json.dumps(info["latency_ms_per_image"]))
    return info


if __name__ == "__main__":
    main()
