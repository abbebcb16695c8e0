"""E3VA and LoSA on the plain ViT trunk (ViTDet's): identity at initialisation, what trains, what autograd
keeps, token-grid errors, MAE weights, layer-wise lr decay, and the configs' keys."""
from functools import partial

import pytest
import torch
from detectron2.config import instantiate
from detectron2.solver import get_default_optimizer_params

from e3va import (
    TUNING_METHODS,
    VIT_PRESETS,
    E3VACheckpointer,
    E3VAViT,
    backbone_config_key,
    find_tuned_backbone,
)
from e3va.engine.memory import bytes_saved_for_backward
from e3va.methods.losa import mix_in_windows
from helpers import load_config, make_tiny, perturb, trunk_outputs_during_training_step

SIDE_NETWORKS = {"e3va": "highway", "losa": "losa"}


def tiny_vit(tuning: str = "e3va", **kwargs) -> E3VAViT:
    kwargs = {"img_size": 64, "window_size": 2, "drop_path_rate": 0.0, **kwargs}
    return E3VAViT("nano", tuning=tuning, **kwargs)


def _same_trunk(model: E3VAViT, reference: E3VAViT) -> None:
    reference.trunk.load_state_dict(model.trunk.state_dict())


@pytest.mark.parametrize("tuning", ["e3va", "losa"])
def test_side_network_starts_as_the_identity_and_then_changes_the_output(tuning):
    torch.manual_seed(0)
    model, plain = tiny_vit(tuning).eval(), tiny_vit("fixed").eval()
    _same_trunk(model, plain)
    x = torch.randn(2, 3, 64, 80)  # a 4x5 grid: windows of 2 pad the last column
    with torch.no_grad():
        expected = plain(x)["last_feat"]
        assert torch.equal(model(x)["last_feat"], expected)
        perturb(getattr(model, SIDE_NETWORKS[tuning]))
        assert not torch.allclose(model(x)["last_feat"], expected, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("size", sorted(VIT_PRESETS))
def test_output_shape_of_every_vit_size(size):
    model = E3VAViT(size, tuning="losa", drop_path_rate=0.0).eval()
    dim = VIT_PRESETS[size]["embed_dim"]
    assert model.output_shape()["last_feat"].channels == dim and model.output_shape()["last_feat"].stride == 16
    if size in ("B", "nano"):  # the large ones take long to run on the CPU; their wiring is the same
        with torch.no_grad():
            out = model(torch.randn(1, 3, 64, 48))["last_feat"]
        assert out.shape == (1, dim, 4, 3)


@pytest.mark.parametrize("tuning", ["e3va", "losa", "fixed"])
def test_frozen_trunk_runs_without_autograd_and_little_is_kept_for_backward(tuning):
    model = tiny_vit(tuning).train()
    out, trunk_outputs = trunk_outputs_during_training_step(model)
    assert len(trunk_outputs) > 30
    assert all(t.grad_fn is None and not t.requires_grad for t in trunk_outputs)
    assert out["last_feat"].requires_grad == (tuning != "fixed")
    x = torch.randn(2, 3, 64, 64)
    saved = {t: bytes_saved_for_backward(tiny_vit(t).train(), x) for t in ("full", tuning)}
    assert saved[tuning] < 0.25 * saved["full"], saved


def test_full_finetuning_runs_the_trunk_under_autograd():
    _, trunk_outputs = trunk_outputs_during_training_step(tiny_vit("full").train())
    assert any(t.grad_fn is not None for t in trunk_outputs)


@pytest.mark.parametrize("method", sorted(TUNING_METHODS))
def test_every_method_trains_what_it_says_on_the_vit(method):
    model = tiny_vit(method).train()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    trunk_trained = {n[len("trunk."):] for n in trained if n.startswith("trunk.")}
    side = trained - {f"trunk.{n}" for n in trunk_trained}
    if method in ("e3va", "e3va_plus", "e3va_plusplus", "e3va_fa"):
        assert trained and all(n.startswith("highway.") for n in trained)
        assert any(".down.v" in n for n in trained) == (method != "e3va_fa")
    elif method == "losa":
        assert trained and all(n.startswith("losa.") for n in trained)
    elif method == "fixed":
        assert not trained
    else:
        assert not side and trunk_trained
        expected = {
            "full": lambda n: True,
            "bitfit": lambda n: n.endswith((".bias", ".rel_pos_h", ".rel_pos_w")),
            "norm": lambda n: ".norm" in n,
            "partial1": lambda n: n.startswith(f"blocks.{VIT_PRESETS['nano']['depth'] - 1}."),
            "lora": lambda n: "lora_" in n,
            "adapter": lambda n: ".adapter." in n,
            "adaptformer": lambda n: ".adaptformer." in n,
        }[method]
        assert trunk_trained == {n for n, _ in model.trunk.named_parameters() if expected(n)}
    out = model(torch.randn(1, 3, 64, 64))["last_feat"]
    if trained:
        out.square().mean().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_token_grid_mismatch_names_the_expected_size():
    model = tiny_vit("losa", window_size=4)
    mixer = model.losa.mixers[0][0]
    with pytest.raises(ValueError, match=r"window is 2x2 \(4 tokens\).*16 tokens \(a 4x4 window\) of 48 channels"):
        mix_in_windows(mixer, torch.randn(1, 8, 8, 48), 8, 8, window_size=2)
    with pytest.raises(ValueError, match=r"Expected \(B, 8\*8, C\) or \(B, 8, 8, C\) tokens, got \(1, 6, 8, 48\)"):
        mix_in_windows(mixer, torch.randn(1, 6, 8, 48), 8, 8, window_size=4)
    with pytest.raises(ValueError, match=r"16 tokens \(a 4x4 window\) of 48 channels.*\(3, 9, 48\)"):
        mixer(torch.randn(3, 9, 48))


def test_windows_of_a_spatial_map_match_the_flat_layout():
    mixer = tiny_vit("losa", window_size=2).losa.mixers[0][0]
    perturb(mixer)
    grid = torch.randn(2, 3, 5, 48)
    flat = mix_in_windows(mixer, grid.reshape(2, 15, 48), 3, 5, 2)
    torch.testing.assert_close(mix_in_windows(mixer, grid, 3, 5, 2), flat.reshape(2, 3, 5, 48))


def test_low_precision_trunk_keeps_the_side_network_fp32_and_close():
    torch.manual_seed(0)
    fp32, bf16 = tiny_vit("losa").eval(), tiny_vit("losa", trunk_dtype="bfloat16").eval()
    bf16.load_state_dict(fp32.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = fp32(x)["last_feat"], bf16(x)["last_feat"]
    assert b.dtype == torch.float32
    assert (a - b).abs().max() < 0.1 * a.abs().max()


@pytest.mark.parametrize("relpath", ["COCO/mask_rcnn_vit_b_losa.py", "COCO/mask_rcnn_swin_t_e3va.py"])
def test_backbone_config_key_finds_the_tuning_override(relpath):
    cfg = load_config(relpath)
    expected = "model.backbone.net" if "_vit_" in relpath else "model.backbone.bottom_up"
    assert backbone_config_key(cfg) == expected
    del cfg.model.backbone[expected.rsplit(".", 1)[1]]
    with pytest.raises(ValueError, match="model.backbone.bottom_up or model.backbone.net"):
        backbone_config_key(cfg)


def test_layer_wise_lr_decay_reaches_the_trunk_blocks_and_spares_the_side_network():
    cfg = load_config("COCO/mask_rcnn_vit_b_losa.py")
    make_tiny(cfg, "full")
    model = instantiate(cfg.model)
    decay = cfg.optimizer.params.lr_factor_func
    lr = {n: decay(n) for n, _ in model.named_parameters()}
    # ViT-B's 12 layers: block i gets 0.7 ** (12 - i), the patch embedding 0.7 ** 13 (nano has blocks 0-3)
    assert lr["backbone.net.trunk.blocks.0.attn.qkv.weight"] == pytest.approx(0.7**12)
    assert lr["backbone.net.trunk.blocks.3.mlp.fc2.weight"] == pytest.approx(0.7**9)
    assert lr["backbone.net.trunk.patch_embed.proj.weight"] == pytest.approx(0.7**13)
    assert decay("backbone.net.trunk.blocks.11.mlp.fc2.weight") == pytest.approx(0.7)
    side = E3VAViT("nano", tuning="losa", img_size=64, window_size=2)
    assert all(decay(f"backbone.net.{n}") == 1.0 for n, _ in side.losa.named_parameters(prefix="losa"))
    groups = get_default_optimizer_params(model, lr_factor_func=partial(decay), base_lr=1e-4)
    assert len({g["lr"] for g in groups}) > 5  # the factors reach the optimizer


@pytest.mark.parametrize("tuning", ["lora", "losa"])
def test_mae_layout_weights_load_by_suffix_into_every_method(tmp_path, tuning):
    """MAE's checkpoints name the ViT's parameters at the top level (``blocks.0.attn.qkv.weight``, plus a
    class token and a final norm the detector has no use for); ViTDet loads them by suffix."""
    source = tiny_vit("fixed")
    perturb(source.trunk, scale=1.0)
    mae = {k: v.clone() for k, v in source.trunk.state_dict().items()}
    mae["cls_token"] = torch.zeros(1, 1, 48)
    path = tmp_path / "mae_pretrain_vit_nano.pth"
    torch.save({"model": mae}, path)

    cfg = load_config("COCO/mask_rcnn_vit_b_losa.py")
    make_tiny(cfg, tuning)
    cfg.model.backbone.net.drop_path_rate = 0.0
    model = instantiate(cfg.model)
    E3VACheckpointer(model).load(f"{path}?matching_heuristics=True")
    _, backbone = find_tuned_backbone(model)
    loaded = {k.replace(".base_layer", ""): v for k, v in backbone.trunk.state_dict().items() if "lora_" not in k}
    assert set(loaded) == set(mae) - {"cls_token"}
    for key, value in loaded.items():
        assert torch.equal(value, mae[key]), key


def test_compiled_vit_trunk_gives_the_eager_outputs():
    """compile_trunk reaches the ViT blocks' attention and MLP too ("eager" backend: tracing without codegen)."""
    torch.manual_seed(0)
    eager = tiny_vit("e3va").eval()
    perturb(eager.highway)
    compiled = tiny_vit("e3va", compile_trunk="eager").eval()
    compiled.load_state_dict(eager.state_dict())
    assert all(b.attn._compiled_call_impl is not None and b.mlp._compiled_call_impl is not None
               for b in compiled.trunk.blocks)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
