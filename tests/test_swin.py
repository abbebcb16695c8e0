"""The E3VA Swin backbone: shapes, identity at initialisation, what trains, and what autograd keeps."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from e3va import E3VASwin, SWIN_PRESETS, TUNING_METHODS, add_e3va_config
from e3va.engine.memory import bytes_saved_for_backward
from e3va.methods import DualLowRankLinear
from e3va.side_memory import CompactInput, RecomputedFromCompactInput
from helpers import perturb, trunk_outputs_during_training_step

E3VA_PRESETS = ["e3va", "e3va_plus", "e3va_plusplus"]
HIGHWAY_METHODS = E3VA_PRESETS + ["e3va_fa"]


@pytest.mark.parametrize("size", ["T", "S", "B", "L", "nano"])
def test_output_shapes_of_every_swin_size(size):
    model = E3VASwin(size, tuning="e3va").eval()
    x = torch.randn(1, 3, 70, 45)  # neither a multiple of the patch size nor of the windows
    with torch.no_grad():
        out = model(x)
    dims = [SWIN_PRESETS[size]["embed_dim"] * 2**i for i in range(4)]
    for i, name in enumerate(["p0", "p1", "p2", "p3"]):
        stride = 2 ** (i + 2)
        assert out[name].shape == (1, dims[i], -(-70 // stride), -(-45 // stride))
        spec = model.output_shape()[name]
        assert (spec.channels, spec.stride) == (dims[i], stride)


@pytest.mark.parametrize("tuning", HIGHWAY_METHODS)
@pytest.mark.parametrize("window_size", [7, 12])
def test_presets_and_windows_run_at_odd_sizes(tuning, window_size):
    model = E3VASwin("nano", tuning=tuning, window_size=window_size)
    out = model(torch.randn(2, 3, 97, 131))
    assert out["p3"].shape == (2, 256, 4, 5)
    out["p3"].sum().backward()


def test_paper_parameter_counts_on_swin_b():
    """Ranks 8/16/32 with a half-width bottleneck give the paper's 1.20 M / 2.35 M / 4.66 M on Swin-B."""
    counts = {}
    for tuning in E3VA_PRESETS + ["fixed", "full"]:
        model = E3VASwin("B", tuning=tuning)
        counts[tuning] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert round(counts["e3va"] / 1e6, 2) == 1.20
    assert round(counts["e3va_plus"] / 1e6, 2) == 2.35
    assert round(counts["e3va_plusplus"] / 1e6, 2) == 4.66
    assert counts["fixed"] == 0
    assert round(counts["full"] / 1e6, 2) == 86.75  # the paper's Swin-B "Full" row


@pytest.mark.parametrize("tuning", HIGHWAY_METHODS)
def test_highway_adds_exactly_zero_at_initialisation(tuning):
    torch.manual_seed(0)
    model = E3VASwin("nano", tuning=tuning, drop_path_rate=0.0).eval()
    plain = E3VASwin("nano", tuning="fixed", drop_path_rate=0.0).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("highway.") for k in unexpected)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        a, b = model(x), plain(x)
        reference = plain.trunk(x)  # Detectron2's own Swin forward
    for name in a:
        assert torch.equal(a[name], b[name])
        torch.testing.assert_close(a[name], reference[name], rtol=0, atol=1e-5)


def test_highway_changes_outputs_once_trained():
    torch.manual_seed(0)
    model = E3VASwin("nano", tuning="e3va", drop_path_rate=0.0).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)["p2"].clone()
        for p in model.highway.parameters():
            p.add_(0.05 * torch.randn_like(p))
        after = model(x)["p2"]
    assert (before - after).abs().max() > 1e-3


@pytest.mark.parametrize("tuning", E3VA_PRESETS + ["fixed"])
def test_gradients_reach_only_trainable_parameters(tuning):
    model = E3VASwin("nano", tuning=tuning)
    out = model(torch.randn(2, 3, 64, 64))
    if tuning == "fixed":  # nothing in the backbone trains: its outputs carry no graph at all
        assert not any(v.requires_grad for v in out.values())
        return
    sum(v.square().mean() for v in out.values()).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
        else:
            assert p.grad is None, f"frozen {name} received a gradient"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norm_names = {f"trunk.norm{i}.{w}" for i in range(4) for w in ("weight", "bias")}
    assert trainable - norm_names == {n for n, _ in model.highway.named_parameters(prefix="highway")}
    assert norm_names <= trainable
    # The adapters' last projections start at zero but still learn at the first step.
    assert model.highway.beside_attn[0][0].up.u.grad.abs().sum() > 0


@pytest.mark.parametrize("tuning", E3VA_PRESETS + ["fixed"])
def test_frozen_trunk_runs_without_autograd(tuning):
    model = E3VASwin("nano", tuning=tuning).train()
    out, trunk_outputs = trunk_outputs_during_training_step(model)
    assert len(trunk_outputs) > 50
    for t in trunk_outputs:
        assert t.grad_fn is None and not t.requires_grad
    if tuning != "fixed":
        assert all(v.requires_grad for v in out.values())


def test_full_finetuning_does_run_the_trunk_under_autograd():
    model = E3VASwin("nano", tuning="full").train()
    _, trunk_outputs = trunk_outputs_during_training_step(model)
    assert any(t.grad_fn is not None for t in trunk_outputs)


def test_autograd_keeps_far_less_for_e3va_than_for_full_finetuning():
    x = torch.randn(2, 3, 128, 128)
    saved = {t: bytes_saved_for_backward(E3VASwin("nano", tuning=t).train(), x) for t in ("full", "fixed", "e3va")}
    assert saved["fixed"] == 0
    assert saved["e3va"] < 0.5 * saved["full"], saved


def test_dual_low_rank_weight_is_the_sum_of_two_products():
    layer = DualLowRankLinear(12, 6, rank=2)
    u1, u2 = layer.u[0], layer.u[1]
    v1, v2 = layer.v[0], layer.v[1]
    torch.testing.assert_close(layer.weight(), u1 @ v1 + u2 @ v2)
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), x @ (u1 @ v1 + u2 @ v2).T + layer.bias)
    assert sum(p.numel() for p in layer.parameters()) == 2 * (12 * 2 + 2 * 6) + 6


def test_adapter_overrides():
    model = E3VASwin("nano", tuning="e3va", rank=3, bottleneck_ratio=0.25, activation="relu")
    adapter = model.highway.beside_mlp[1][0]
    assert adapter.down.rank == 3 and adapter.down.out_features == 16
    assert isinstance(adapter.act, torch.nn.ReLU)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(tuning="no_such_method"), "no_such_method"),
        (dict(rank=0), "0"),
        (dict(rank=-2), "-2"),
        (dict(rank=True), "True"),  # a bool is not a rank (it would be taken as 1)
        (dict(tuning="losa", rank=True), "True"),
        (dict(activation="swish2"), "swish2"),
        (dict(window_size=9), "9"),
        (dict(out_features=("p5",)), "p5"),
        (dict(tuning="fixed", rank=4), "fixed"),
    ],
)
def test_bad_arguments_name_the_bad_value(kwargs, needle):
    with pytest.raises(ValueError, match=needle) as info:
        E3VASwin("nano", **kwargs)
    if "tuning" in kwargs and kwargs["tuning"] not in TUNING_METHODS:
        assert "e3va_plus" in str(info.value)  # lists the valid names


def test_unknown_size_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'XL'.*'B'"):
        E3VASwin("XL")


@pytest.mark.parametrize("channels", [1, 4])
def test_non_rgb_image_is_refused_with_its_shape(channels):
    model = E3VASwin("nano")
    with pytest.raises(ValueError, match=f"\\(1, {channels}, 32, 32\\)"):
        model(torch.randn(1, channels, 32, 32))


@pytest.mark.parametrize("tuning", ["e3va", "losa"])
def test_compiled_trunk_gives_the_eager_outputs_and_gradients(tuning):
    """compile_trunk compiles each block's attention and MLP in place; the side network's hooks still run.

    The "eager" backend traces with TorchDynamo as "inductor" does but skips code generation, which takes
    about a minute on 2 CPU cores; tools/trunk_precision_drift.py --compile measures inductor itself."""
    torch.manual_seed(0)
    eager = E3VASwin("nano", tuning=tuning, drop_path_rate=0.0).eval()
    perturb(eager.side_network, scale=0.02)
    compiled = E3VASwin("nano", tuning=tuning, drop_path_rate=0.0, compile_trunk="eager").eval()
    compiled.load_state_dict(eager.state_dict())  # in-place compilation keeps the parameter names
    assert compiled.compile_backend == "eager" and eager.compile_backend is None
    blocks = [b for stage in compiled.trunk.layers for b in stage.blocks]
    assert all(b.attn._compiled_call_impl is not None and b.mlp._compiled_call_impl is not None for b in blocks)
    x = torch.randn(1, 3, 64, 64)
    out_a, grads_a = _outputs_and_grads(eager, x)
    out_b, grads_b = _outputs_and_grads(compiled, x)
    assert set(grads_a) == set(grads_b) and len(grads_a) > 10
    for k in out_a:
        torch.testing.assert_close(out_b[k], out_a[k], rtol=1e-5, atol=1e-5)
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-4, atol=1e-6)


def test_compile_trunk_errors_name_the_problem():
    with pytest.raises(ValueError, match="'not_a_backend'.*inductor"):
        E3VASwin("nano", compile_trunk="not_a_backend")
    with pytest.raises(ValueError, match="frozen trunk.*'lora'"):
        E3VASwin("nano", tuning="lora", compile_trunk=True)


def test_yacs_builder_through_detectron2_registry():
    cfg = add_e3va_config(get_cfg())
    cfg.MODEL.BACKBONE.NAME = "build_e3va_swin_fpn_backbone"
    cfg.MODEL.FPN.IN_FEATURES = ["p0", "p1", "p2", "p3"]
    cfg.MODEL.E3VA.SIZE = "nano"
    cfg.MODEL.E3VA.TUNING = "e3va_plus"
    cfg.MODEL.E3VA.SAVED_INPUT_DTYPE = "float8_e4m3fn"
    backbone = build_backbone(cfg)
    assert backbone.bottom_up.method.name == "e3va_plus"
    assert backbone.bottom_up.highway.beside_attn[0][0].compact.name == "float8_e4m3fn"
    out = backbone(torch.randn(1, 3, 64, 64))
    assert set(out) == {"p2", "p3", "p4", "p5", "p6"}
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [0.0], [1.0]
    with pytest.raises(ValueError, match="1 channels"):
        build_backbone(cfg, ShapeSpec(channels=1))


def _outputs_and_grads(model, x):
    out = model(x)
    loss = sum((v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum() for v in out.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


@pytest.mark.parametrize("tuning, min_grads", [("e3va", 40), ("e3va_fa", 30), ("losa", 30)])
@pytest.mark.parametrize(
    "saved_input_dtype, rtol", [("float32", 1e-4), ("bfloat16", 3e-2), ("float8_e4m3fn", 0.1)]
)
def test_fused_side_networks_match_the_plain_graph(tuning, min_grads, saved_input_dtype, rtol):
    """E3VA's adapters and LoSA's mixers, the patch merging they cross and the norms before the FPN,
    against plain autograd: same outputs; gradients as close as the stored input's precision allows."""
    torch.manual_seed(0)
    # Training mode: the fused functions run only there (eval mode takes plain ops, for export).
    plain = E3VASwin("nano", tuning=tuning, drop_path_rate=0.0, fused_adapters=False).train()
    fused = E3VASwin("nano", tuning=tuning, drop_path_rate=0.0, saved_input_dtype=saved_input_dtype).train()
    side = plain.side_network
    with torch.no_grad():  # non-zero last projections, so every gradient path is exercised
        for p in side.parameters():
            p.add_(0.02 * torch.randn_like(p))
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 72, 56)
    out_p, grads_p = _outputs_and_grads(plain, x)
    out_f, grads_f = _outputs_and_grads(fused, x)
    for k in out_p:
        torch.testing.assert_close(out_f[k], out_p[k], rtol=1e-4, atol=1e-5)
    assert grads_p.keys() == grads_f.keys() and len(grads_p) > min_grads
    for name in grads_p:
        scale = grads_p[name].abs().max().clamp_min(1e-12)
        assert (grads_f[name] - grads_p[name]).abs().max() <= rtol * scale, name


def test_fused_adapters_keep_less_for_backward():
    x = torch.randn(2, 3, 128, 128)
    saved = {
        (fused, dtype): bytes_saved_for_backward(
            E3VASwin("nano", tuning="e3va", fused_adapters=fused, saved_input_dtype=dtype).train(), x
        )
        for fused, dtype in [(False, "float32"), (True, "float32"), (True, "bfloat16"), (True, "float8_e4m3fn")]
    }
    assert saved[(True, "float32")] < 0.7 * saved[(False, "float32")], saved
    # Not exactly 1/2 and 1/4: the low-rank factors are kept too, and fp8 keeps a scale per token.
    assert saved[(True, "bfloat16")] < 0.6 * saved[(True, "float32")], saved
    assert saved[(True, "float8_e4m3fn")] < 0.7 * saved[(True, "bfloat16")], saved


def test_frozen_down_input_factors_keep_a_projection_instead_of_the_input():
    x = torch.randn(2, 3, 128, 128)
    full_input, projection = (E3VASwin("nano", tuning=t).train() for t in ("e3va", "e3va_fa"))
    trained = {n for n, p in projection.highway.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in full_input.highway.named_parameters() if ".down.v" not in n}
    assert {n for n, _ in projection.highway.named_buffers()} == {
        n for n, _ in full_input.highway.named_parameters() if ".down.v" in n
    }
    # nano's stage widths are 32..256 and 2r = 16: the adapters keep far less; the norms and the
    # patch merging keep what they kept.
    assert bytes_saved_for_backward(projection, x) < 0.7 * bytes_saved_for_backward(full_input, x)


def test_compact_input_round_trip():
    x = torch.randn(6, 40) * torch.logspace(-3, 4, 6).unsqueeze(1)  # tokens of very different scales
    x[2] = 0.0
    for name, tol in [("float32", 0.0), ("bfloat16", 2.0**-8), ("float8_e4m3fn", 2.0**-4)]:
        compact = CompactInput(name)
        stored, scale = compact.pack(x)
        assert stored.element_size() == {"float32": 4, "bfloat16": 2, "float8_e4m3fn": 1}[name]
        back = CompactInput.unpack(stored, scale, torch.float32)
        assert back.dtype == torch.float32 and torch.isfinite(back).all()
        # Relative to each value (bf16), or to its token's largest value (fp8 rounds at the token's scale).
        ref = x.abs() if name != "float8_e4m3fn" else x.abs().amax(-1, keepdim=True)
        assert ((back - x).abs() <= tol * ref).all(), name
    assert torch.equal(back[2], torch.zeros(40))


def test_fp8_scales_each_token_to_fill_the_range_and_comes_back_in_the_compute_dtype():
    # (batch, tokens, channels) as the side networks store them; bf16 as under a bf16 trunk.
    x = (torch.randn(2, 5, 16) * torch.logspace(-2, 3, 5).view(1, 5, 1)).to(torch.bfloat16)
    stored, scale = CompactInput("float8_e4m3fn").pack(x)
    assert scale.dtype == torch.float32 and scale.shape == (2, 5, 1)  # one fp32 scale per token
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    assert torch.equal(stored.float().abs().amax(-1), torch.full((2, 5), fp8_max))  # each token fills it
    assert CompactInput.unpack(stored, scale, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="float8_e4m3fn"):  # the message lists the choices
        CompactInput("float16")
    assert repr(CompactInput("bfloat16")) == "CompactInput('bfloat16')"  # as module reprs show it


def test_a_parameter_the_recomputed_layer_does_not_use_gets_no_gradient():
    z = torch.randn(3, 4, requires_grad=True)
    used, unused = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    packed = CompactInput("float32").pack(z)
    out = RecomputedFromCompactInput.apply(lambda t: t * used, packed, z, used, unused)
    out.sum().backward()
    assert z.grad is not None and used.grad is not None and unused.grad is None


def test_unknown_saved_dtype_is_named():
    with pytest.raises(ValueError, match="float8"):
        E3VASwin("nano", saved_input_dtype="float8")


def test_bfloat16_trunk_stays_close_to_fp32_and_keeps_the_highway_in_fp32():
    torch.manual_seed(0)
    fp32 = E3VASwin("nano", tuning="e3va", drop_path_rate=0.0).eval()
    bf16 = E3VASwin("nano", tuning="e3va", drop_path_rate=0.0, trunk_dtype="bfloat16").eval()
    bf16.load_state_dict(fp32.state_dict())
    x = torch.randn(1, 3, 96, 96)
    a, b = fp32(x), bf16(x)
    for name in a:
        assert b[name].dtype == torch.float32
        assert (a[name] - b[name]).abs().max() < 0.15, name  # LayerNorm-scaled outputs, bf16 trunk
    sum(v.sum() for v in b.values()).backward()
    assert all(p.grad.dtype == torch.float32 for p in bf16.highway.parameters())


def test_low_precision_trunk_errors_name_the_problem():
    with pytest.raises(ValueError, match="needs CUDA"):
        E3VASwin("nano", trunk_dtype="float16")(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="'full'"):
        E3VASwin("nano", tuning="full", trunk_dtype="bfloat16")(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="int8"):
        E3VASwin("nano", trunk_dtype="int8")


@pytest.mark.parametrize("tuning", ["e3va", "losa"])
def test_bfloat16_trunk_computes_in_bfloat16_and_the_side_network_in_float32(tuning):
    """Hooks on the trunk's sub-layers see bf16 outputs; hooks on every side-network layer see fp32 in and out
    (a trunk that ignored trunk_dtype, or a side network left under autocast, fails here)."""
    model = E3VASwin("nano", tuning=tuning, drop_path_rate=0.0, trunk_dtype="bfloat16").train()
    side = model.side_network
    trunk_dtypes, side_dtypes = set(), set()
    for block in (b for stage in model.trunk.layers for b in stage.blocks):
        for sub in (block.attn, block.mlp):
            sub.register_forward_hook(lambda m, a, out: trunk_dtypes.add(out.dtype))
    for layer in side.modules():
        if isinstance(layer, torch.nn.Linear) or hasattr(layer, "u"):
            layer.register_forward_hook(lambda m, a, out: side_dtypes.update({a[0].dtype, out.dtype}))
    if tuning == "e3va":  # the fused function bypasses the layers' forward: take the plain graph
        for adapter in side.modules():
            if hasattr(adapter, "fused"):
                adapter.fused = False
    out = model(torch.randn(1, 3, 64, 64))
    assert trunk_dtypes == {torch.bfloat16}
    assert side_dtypes == {torch.float32}
    assert all(v.dtype == torch.float32 for v in out.values())
