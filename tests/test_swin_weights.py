"""Pretrained Swin weights from the official release or timm, converted and fitted to the E3VA trunk."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from detectron2.checkpoint import DetectionCheckpointer
from timm.layers.pos_embed_rel import resize_rel_pos_bias_table_simple
from timm.models.swin_transformer import SwinTransformer as TimmSwin
from torch import nn

from e3va.swin_weights import (
    adapt_to_trunk,
    check_fits,
    detect_swin_format,
    infer_swin_architecture,
    load_swin_pretrained,
    resize_relative_position_bias,
    timm_to_official,
)
from e3va.swin import SWIN_PRESETS, build_swin_trunk
from helpers import tiny_detector

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "convert_pretrained.py"
NANO = SWIN_PRESETS["nano"]
OUTPUT_NORM = re.compile(r"^norm\d\.")


def random_timm_swin(img_size: int = 224, seed: int = 0) -> TimmSwin:
    """A timm Swin of the nano architecture with every parameter perturbed, norms and bias tables included,
    so that a misplaced or mis-ordered tensor changes the features."""
    torch.manual_seed(seed)
    model = TimmSwin(img_size=img_size, patch_size=4, window_size=7, num_classes=10, drop_path_rate=0.0, **NANO)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 1.0 if name.endswith("relative_position_bias_table") else 0.05
            param.add_(torch.randn_like(param) * scale)
    return model.eval()


def official_state(window_size: int = 7, seed: int = 1) -> dict:
    """A state dict laid out as Microsoft's release: trunk + final norm + head, with its buffers."""
    torch.manual_seed(seed)
    trunk = build_swin_trunk("nano", window_size=window_size, drop_path_rate=0.0)
    state = {k: v for k, v in trunk.state_dict().items() if not OUTPUT_NORM.match(k)}
    dim = NANO["embed_dim"] * 8
    state.update({
        "norm.weight": torch.ones(dim), "norm.bias": torch.zeros(dim),
        "head.weight": torch.randn(1000, dim), "head.bias": torch.zeros(1000),
        "layers.0.blocks.1.attn_mask": torch.zeros(64, 49, 49),  # the release keeps the shift masks
    })
    return state


def shape_only_state(size: str, window_size: int = 7) -> dict:
    """Just the keys architecture inference reads, with a preset's shapes (no large model is built)."""
    preset = SWIN_PRESETS[size]
    state = {"patch_embed.proj.weight": torch.empty(preset["embed_dim"], 3, 4, 4)}
    for stage, (depth, heads) in enumerate(zip(preset["depths"], preset["num_heads"])):
        for block in range(depth):
            state[f"layers.{stage}.blocks.{block}.attn.relative_position_bias_table"] = torch.empty(
                (2 * window_size - 1) ** 2, heads
            )
    return state


def test_timm_weights_give_the_same_features_as_timm():
    # 448 px: every stage (112..14 tokens a side) is larger than the 7-token window, so timm keeps the
    # shifted windows everywhere, as the detection trunk always does.
    timm_model = random_timm_swin(img_size=448)
    state = timm_model.state_dict()
    assert detect_swin_format(state) == "timm"
    official = timm_to_official(state)
    assert detect_swin_format(official) == "official"

    trunk = build_swin_trunk("nano", drop_path_rate=0.0).eval()
    adapted, report = adapt_to_trunk(official, trunk)
    trunk.load_state_dict(adapted, strict=True)
    assert sorted(report.dropped) == ["head.bias", "head.weight", "norm.bias", "norm.weight"]
    assert report.missing == [] and report.unexpected == [] and report.resized == []
    for i in range(4):  # compare the stages before Detectron2's own output norms
        setattr(trunk, f"norm{i}", nn.Identity())

    x = torch.randn(1, 3, 448, 448)
    with torch.no_grad():
        expected = timm_model.forward_intermediates(x, intermediates_only=True)
        features = trunk(x)
    for i, want in enumerate(expected):
        got = features[f"p{i}"]
        assert got.shape == want.shape, i
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=f"stage {i}")


def test_timm_keys_map_to_the_official_names():
    official = timm_to_official(random_timm_swin().state_dict())
    assert "layers.0.downsample.reduction.weight" in official
    assert not any(k.startswith("layers.3.downsample.") for k in official)
    assert "head.weight" in official and not any(k.startswith("head.fc.") for k in official)
    trunk_keys = {k for k in build_swin_trunk("nano").state_dict() if not OUTPUT_NORM.match(k)}
    trunk_keys = {k for k in trunk_keys if not k.endswith("relative_position_index")}
    assert set(official) - {"head.weight", "head.bias", "norm.weight", "norm.bias"} == trunk_keys


def test_window_7_weights_load_into_a_window_12_trunk():
    state = official_state(window_size=7)
    trunk = build_swin_trunk("nano", window_size=12, drop_path_rate=0.0)
    adapted, report = adapt_to_trunk(state, trunk)
    tables = sorted(k for k in state if k.endswith("relative_position_bias_table"))
    assert sorted(report.resized) == tables and len(tables) == 8
    for key in tables:
        assert adapted[key].shape == (23 * 23, state[key].shape[1])
    assert "layers.0.blocks.1.attn_mask" in report.dropped
    assert sum(k.endswith("relative_position_index") for k in report.dropped) == 8  # the window-7 ones
    assert sum(k.endswith("relative_position_index") for k in report.filled) == 8  # the trunk's window-12
    assert sorted(k for k in report.filled if OUTPUT_NORM.match(k)) == sorted(
        f"norm{i}.{p}" for i in range(4) for p in ("bias", "weight")
    )
    assert report.missing == [] and report.unexpected == []
    trunk.load_state_dict(adapted, strict=True)
    assert torch.equal(trunk.norm2.weight, torch.ones(128)) and torch.equal(trunk.norm2.bias, torch.zeros(128))


def test_bias_table_resizing():
    table = torch.randn(13 * 13, 4)
    assert resize_relative_position_bias(table, 7) is table  # same window: untouched
    resized = resize_relative_position_bias(table, 12)
    assert resized.shape == (23 * 23, 4)
    # The interpolation the Swin authors use (and timm's simple resize reproduces).
    reference = resize_rel_pos_bias_table_simple(table, (12, 12), (23 * 23, 4))
    torch.testing.assert_close(resized, reference)
    constant = resize_relative_position_bias(torch.full((13 * 13, 2), 0.5), 12)
    torch.testing.assert_close(constant, torch.full((23 * 23, 2), 0.5))
    with pytest.raises(ValueError, match="rows"):
        resize_relative_position_bias(torch.zeros(10, 2), 12)


def _uninitialised_trunk(size: str, monkeypatch) -> nn.Module:
    """Detectron2's Swin of ``size`` without random initialisation: check_fits reads only its structure,
    and initialising Swin-L's 200M weights would dominate the test's time."""
    monkeypatch.setattr(nn.init, "trunc_normal_", lambda tensor, *args, **kwargs: tensor)
    monkeypatch.setattr(nn.init, "constant_", lambda tensor, *args, **kwargs: tensor)
    for layer in (nn.Linear, nn.Conv2d, nn.LayerNorm):
        monkeypatch.setattr(layer, "reset_parameters", lambda self: None)
    return build_swin_trunk(size)


def test_swin_b_weights_do_not_fit_a_swin_l_trunk(monkeypatch):
    assert infer_swin_architecture(shape_only_state("B", window_size=12)) == dict(
        embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12
    )
    trunk = _uninitialised_trunk("L", monkeypatch)
    with pytest.raises(ValueError) as err:
        check_fits(shape_only_state("B"), trunk)
    message = str(err.value)
    assert "embed_dim=128" in message and "(Swin-B)" in message
    assert "embed_dim=192" in message and "(Swin-L)" in message
    assert "size='B'" in message


def test_a_non_swin_state_dict_is_refused_naming_its_keys(tmp_path):
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}
    with pytest.raises(ValueError, match="conv1.weight"):
        detect_swin_format(resnet)
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": resnet}, path)
    with pytest.raises(ValueError, match="fc.weight"):
        load_swin_pretrained(str(path))
    # A detector's checkpoint holds Swin weights under a prefix: say so.
    detector = {"backbone.bottom_up.trunk." + k: v for k, v in official_state().items()}
    with pytest.raises(ValueError, match="backbone.bottom_up.trunk."):
        detect_swin_format(detector)


def test_a_stated_format_that_the_keys_contradict_is_refused(tmp_path):
    path = tmp_path / "timm.pth"
    torch.save(random_timm_swin().state_dict(), path)
    with pytest.raises(ValueError, match="timm layout"):
        load_swin_pretrained(str(path), fmt="official")
    assert "layers.0.downsample.reduction.weight" in load_swin_pretrained(str(path), fmt="timm")


def test_timm_model_names_load_through_timm(monkeypatch):
    calls = []

    def create_model(name, pretrained=False, **kwargs):
        calls.append((name, pretrained))
        return random_timm_swin()

    monkeypatch.setattr(timm, "create_model", create_model)  # no network here
    name = "swin_base_patch4_window7_224.ms_in22k"
    state = load_swin_pretrained(name)
    assert calls == [(name, True)]
    assert detect_swin_format(state) == "official"
    assert "layers.0.downsample.reduction.weight" in state and "head.weight" in state
    with pytest.raises(ValueError, match="not an existing file"):
        load_swin_pretrained("no_such_model_or_file")


def _run_tool(*args: str) -> str:
    proc = subprocess.run([sys.executable, str(TOOL), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["official", "timm"])
def test_converted_file_loads_with_the_plain_detectron2_checkpointer(tmp_path, layout):
    src, dst = tmp_path / f"{layout}.pth", tmp_path / "converted.pth"
    if layout == "official":
        source = official_state()
        torch.save({"model": source}, src)
        out = _run_tool(str(src), str(dst))  # size and window inferred
        expected = {k: v for k, v in source.items() if not k.startswith(("head.", "norm.", "layers.0.blocks.1.attn_mask"))}
    else:
        source = random_timm_swin().state_dict()
        torch.save(source, src)  # timm saves bare state dicts
        out = _run_tool(str(src), str(dst), "--source", "timm", "--size", "nano", "--window-size", "7")
        expected = timm_to_official(source)
        expected = {k: v for k, v in expected.items() if not k.startswith(("head.", "norm."))}
    assert "Swin-nano" in out and "norm0.weight" in out  # the report names what it filled

    model = tiny_detector("common/models/mask_rcnn_swin_e3va.py")
    trunk = model.backbone.bottom_up.trunk
    saved = torch.load(dst, weights_only=True)
    assert saved["__author__"] == "e3va convert_pretrained" and saved["matching_heuristics"] is False
    prefix = "backbone.bottom_up.trunk."
    assert set(saved["model"]) == {prefix + k for k in trunk.state_dict()}  # no missing trunk key

    DetectionCheckpointer(model).load(str(dst))
    loaded = trunk.state_dict()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    assert torch.equal(loaded["norm0.weight"], torch.ones(32)) and torch.equal(loaded["norm3.bias"], torch.zeros(256))
