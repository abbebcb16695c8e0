"""Every tuning method of the paper's table: what it trains, whether the trunk needs autograd, one step."""
import pytest
import torch
from detectron2.utils.events import EventStorage

from e3va import E3VASwin, TUNING_METHODS
from helpers import PAPER_METHODS, synthetic_batch, tiny_detector

OUT_NORMS = {f"norm{i}.{w}" for i in range(4) for w in ("weight", "bias")}


def test_every_method_of_the_paper_is_registered():
    assert set(PAPER_METHODS) <= set(TUNING_METHODS)


def _trainable_trunk_names(model):
    return {n for n, p in model.trunk.named_parameters() if p.requires_grad} - OUT_NORMS


@pytest.mark.parametrize(
    "method, expected",
    [
        ("bitfit", lambda n: n.endswith(".bias") or n.endswith("relative_position_bias_table")),
        ("norm", lambda n: ".norm" in n),
        ("partial1", lambda n: n.startswith("layers.3.blocks.1.")),
        ("adapter", lambda n: ".adapter." in n),
        ("lora", lambda n: ".lora_A." in n or ".lora_B." in n),
        ("adaptformer", lambda n: ".mlp.adaptformer." in n),
    ],
)
def test_each_method_trains_what_it_says(method, expected):
    model = E3VASwin("nano", tuning=method)
    names = _trainable_trunk_names(model)
    assert names, method
    assert all(expected(n) for n in names), sorted(n for n in names if not expected(n))[:5]
    everything = {n for n, _ in model.trunk.named_parameters()} - OUT_NORMS
    assert names == {n for n in everything if expected(n)}
    assert model.side_network is None and model.trunk_needs_autograd


@pytest.mark.parametrize("method", ["fixed", "e3va", "e3va_plus", "e3va_plusplus", "e3va_fa", "losa"])
def test_methods_that_train_nothing_in_the_trunk_run_it_without_autograd(method):
    model = E3VASwin("nano", tuning=method)
    assert _trainable_trunk_names(model) == set() and not model.trunk_needs_autograd


def test_lora_rank_is_configurable():
    model = E3VASwin("nano", tuning="lora", rank=4)
    assert model.trunk.layers[0].blocks[0].attn.qkv.lora_A.default.weight.shape == (4, 32)
    with pytest.raises(ValueError, match="'lora' takes `rank` only.*bottleneck_ratio"):
        E3VASwin("nano", tuning="lora", bottleneck_ratio=0.3)


@pytest.mark.parametrize("method", PAPER_METHODS)
def test_inserted_modules_start_as_the_identity(method):
    torch.manual_seed(0)
    tuned = E3VASwin("nano", tuning=method, drop_path_rate=0.0).eval()
    plain = E3VASwin("nano", tuning="fixed", drop_path_rate=0.0).eval()
    state = {k.replace(".base_layer", ""): v for k, v in tuned.state_dict().items()}
    assert plain.load_state_dict(state, strict=False).missing_keys == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = tuned(x), plain(x)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", PAPER_METHODS)
def test_each_method_trains_one_mask_rcnn_step(method):
    torch.manual_seed(0)
    model = tiny_detector("common/models/mask_rcnn_swin_e3va.py", tuning=method).train()
    backbone = model.backbone.bottom_up
    with EventStorage():
        losses = model(synthetic_batch(size=48))
    sum(losses.values()).backward()
    for name, p in backbone.named_parameters():
        assert (p.grad is not None) == p.requires_grad or (p.requires_grad and method == "partial1"), name
    if method != "fixed":
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.parameters())
