"""tools/export_model.py and the eval-time plain path it relies on: TorchScript run without e3va, ONNX in ONNX
Runtime, the side networks' plain path at inference, and the tool's errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate

from e3va import E3VACheckpointer, E3VASwin
from e3va.methods.e3va import _LowRankAdapterFunction
from e3va.side_memory import RecomputedFromCompactInput
from helpers import REPO, load_config, load_tool, perturb
from test_vit import tiny_vit

SHAPES = "Shapes/mask_rcnn_e3va.py"
SIZE = 64  # the last Swin stage fits in one window: the case the ONNX export has to work around


tool = load_tool("export_model")


TOPK = "model.roi_heads.box_predictor.test_topk_per_image=10"  # fewer boxes for the mask head: a faster test


def _shapes_model(seed: int = 0) -> torch.nn.Module:
    """The Shapes Mask R-CNN (nano Swin, E3VA) with a non-zero side network and TOPK, in eval mode."""
    torch.manual_seed(seed)
    cfg = LazyConfig.apply_overrides(load_config(SHAPES), [TOPK])
    model = instantiate(cfg.model).eval()
    perturb(model.backbone.bottom_up.highway, scale=0.02, seed=seed)
    return model


def _sample_image(path: Path) -> torch.Tensor:
    """A BGR test image written to ``path``; returns it as the model's input, a (3, H, W) float tensor."""
    rng = np.random.default_rng(0)
    image = (rng.random((SIZE, SIZE, 3)) * 60).astype(np.uint8)
    cv2.rectangle(image, (8, 10), (40, 44), (30, 200, 250), -1)
    cv2.circle(image, (46, 40), 12, (240, 90, 20), -1)
    cv2.imwrite(str(path), image)
    return torch.as_tensor(image.transpose(2, 0, 1).copy()).float()


# ---------------------------------------------------------------------------------------------- TorchScript
_STANDALONE = """
import sys
import torch, torchvision  # torchvision registers the nms and roi_align ops the file calls
model = torch.jit.load(sys.argv[1])
outputs = model(torch.load(sys.argv[2]))
assert "e3va" not in sys.modules and "detectron2" not in sys.modules, "the exported model imported the package"
torch.save([t.detach() for t in outputs], sys.argv[3])
try:  # another size would pad to the same windows and run, wrongly, without the shape check
    model(torch.zeros(3, 60, 64))
    raise SystemExit("an input of another shape was accepted")
except torch.jit.Error as error:
    assert "traced for an input of shape [3, 64, 64]" in str(error), error
"""


@pytest.mark.slow
def test_torchscript_detector_runs_without_e3va_and_equals_eager(tmp_path, restore_loggers):
    model = _shapes_model()
    E3VACheckpointer(model, save_dir=str(tmp_path)).save("model")  # records what the side network is
    weights = tmp_path / "model.pth"
    image = _sample_image(tmp_path / "sample.png")
    info = tool.main(["--config-file", str(REPO / "configs" / SHAPES), "--weights", str(weights),
                      "--format", "torchscript", "--export-method", "tracing",
                      "--sample-image", str(tmp_path / "sample.png"), "--output", str(tmp_path / "out"), TOPK])
    assert json.loads((tmp_path / "out" / "export.json").read_text()) == info
    assert info["input"]["shape"] == [3, SIZE, SIZE] and info["input"]["format"] == "BGR"
    assert info["overrides"] == [TOPK] and max(info["check"]["max_abs_diff"].values()) <= 1e-4
    names = [o["name"] for o in info["outputs"]]
    assert names == ["pred_boxes", "pred_classes", "pred_masks", "scores", "image_size"]

    torch.save(image, tmp_path / "image.pt")
    proc = subprocess.run(
        [sys.executable, "-c", _STANDALONE, str(tmp_path / "out" / "model.ts"), str(tmp_path / "image.pt"),
         str(tmp_path / "outputs.pt")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = dict(zip(names, torch.load(tmp_path / "outputs.pt")))

    with torch.no_grad():
        eager = model.inference([{"image": image}], do_postprocess=False)[0]
    assert len(eager) == 10  # something to compare: random heads score many boxes
    torch.testing.assert_close(exported["pred_boxes"], eager.pred_boxes.tensor, rtol=0, atol=1e-4)
    torch.testing.assert_close(exported["scores"], eager.scores, rtol=0, atol=1e-4)
    assert torch.equal(exported["pred_classes"], eager.pred_classes)
    torch.testing.assert_close(exported["pred_masks"], eager.pred_masks, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------- ONNX
def test_onnx_backbone_equals_eager_in_onnx_runtime(tmp_path):
    model = _shapes_model(seed=1)
    image = _sample_image(tmp_path / "sample.png")
    with torch.no_grad():  # the reference, computed here rather than through the tool's wrapper
        features = model.backbone(model.preprocess_image([{"image": image}]).tensor)
    module, names = tool.traceable(model, image, "backbone")
    assert names == ["p2", "p3", "p4", "p5", "p6"]
    tool.export(module, model, image, "onnx", tmp_path / "backbone.onnx", names)
    assert not model.training  # the exporter leaves the model as it found it
    outputs = tool.load_exported("onnx", tmp_path / "backbone.onnx", threads=1)(image)
    assert len(outputs) == len(names)
    for name, out in zip(names, outputs):
        torch.testing.assert_close(torch.from_numpy(out), features[name], rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- plain path
def _count_fused_calls(monkeypatch) -> Dict[str, int]:
    """Counts calls of the side networks' memory-saving autograd functions (by class name)."""
    counts: Dict[str, int] = {}
    for cls in (_LowRankAdapterFunction, RecomputedFromCompactInput):
        def counting(*args, _apply=cls.apply, _name=cls.__name__):
            counts[_name] = counts.get(_name, 0) + 1
            return _apply(*args)

        monkeypatch.setattr(cls, "apply", staticmethod(counting))
    return counts


def _backbone(trunk: str, tuning: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = E3VASwin("nano", tuning=tuning, drop_path_rate=0.0) if trunk == "swin" else tiny_vit(tuning)
    perturb(model.side_network, scale=0.02)
    return model


@pytest.mark.parametrize("trunk", ["swin", "vit"])
@pytest.mark.parametrize("tuning", ["e3va", "e3va_plusplus", "losa"])
def test_inference_takes_the_plain_path_with_the_fused_paths_outputs(monkeypatch, trunk, tuning):
    """Training runs the fused functions; eval mode (autograd on, as when tracing, or off) runs none of them
    and gives the same outputs."""
    model = _backbone(trunk, tuning)
    counts = _count_fused_calls(monkeypatch)
    x = torch.randn(1, 3, 64, 80)
    fused = {k: v.detach() for k, v in model.train()(x).items()}
    assert sum(counts.values()) > 0, "training should run the memory-saving functions"
    counts.clear()
    model.eval()
    plain = model(x)
    with torch.no_grad():
        plain_no_grad = model(x)
    assert counts == {}, f"inference ran the fused functions: {counts}"
    for name in fused:
        torch.testing.assert_close(plain[name].detach(), fused[name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(plain_no_grad[name], fused[name], rtol=1e-4, atol=1e-5)


def test_inference_mode_runs_the_side_network_in_either_module_mode():
    """Under torch.inference_mode() the hooks must not turn autograd on: a custom autograd function may not
    save inference tensors, and in training mode the fused ones would run."""
    model = _backbone("swin", "e3va").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
    for mode in (False, True):
        with torch.inference_mode():
            out = model.train(mode)(x)
        for name in expected:
            torch.testing.assert_close(out[name], expected[name], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- errors
def _main_error(capsys, argv: List[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        tool.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def _argv(tmp_path: Path, **changes: str) -> List[str]:
    args = {"--config-file": str(REPO / "configs" / SHAPES), "--weights": str(tmp_path / "model.pth"),
            "--format": "torchscript", "--sample-image": str(tmp_path / "sample.png"),
            "--output": str(tmp_path / "out"), **changes}
    return [item for pair in args.items() for item in pair]


def test_missing_weights_are_named(tmp_path, capsys, restore_loggers):
    _sample_image(tmp_path / "sample.png")
    err = _main_error(capsys, _argv(tmp_path, **{"--weights": str(tmp_path / "missing.pth")}))
    assert "--weights" in err and "missing.pth" in err and "does not exist" in err


def test_missing_sample_image_is_named(tmp_path, capsys, restore_loggers):
    torch.save({"model": {}}, tmp_path / "model.pth")
    err = _main_error(capsys, _argv(tmp_path, **{"--sample-image": str(tmp_path / "nope.png")}))
    assert "--sample-image" in err and "nope.png" in err


def test_a_mistyped_override_names_the_closest_keys_and_writes_nothing(tmp_path, capsys, restore_loggers):
    torch.save({"model": {}}, tmp_path / "model.pth")
    _sample_image(tmp_path / "sample.png")
    err = _main_error(capsys, [*_argv(tmp_path), "model.roi_heads.box_predictor.test_topk_per_imag=10"])
    assert "did you mean test_topk_per_image" in err  # checked by e3va.overrides, as in the other tools
    assert not (tmp_path / "out").exists()


def test_unknown_format_lists_the_accepted_ones(tmp_path, capsys):
    err = _main_error(capsys, _argv(tmp_path, **{"--format": "tflite"}))
    assert "'tflite'" in err and "torchscript" in err and "onnx" in err


def test_training_mode_model_is_refused():
    model = _shapes_model().train()
    image = torch.rand(3, SIZE, SIZE) * 255
    with pytest.raises(ValueError, match=r"eval mode.*model\.eval\(\)"):
        tool.traceable(model, image, "detector")
    with pytest.raises(ValueError, match="Unknown part 'head'.*detector"):
        tool.traceable(model.eval(), image, "head")
