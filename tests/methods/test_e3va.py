"""E3VA (e3va.methods.e3va): what its adapters read (``adapter_input``), how the highway crosses patch merging
(``highway_downsample``, ``highway_merging``), parallel against stacked adapters, the record of these choices in
files, and the fused adapter function alone (a float64 gradcheck)."""
import pytest
import torch
from torch import nn

from e3va import E3VASwin
from e3va.engine.memory import bytes_saved_for_backward
from e3va.trainable import TrainableCheckpointError, apply_trainable, trainable_checkpoint
from e3va.methods.e3va import AdapterHighway, AdapterSpec, DualLowRankLinear, HighwayAdapter, _LowRankAdapterFunction
from e3va.side_memory import CompactInput
from e3va.vit import E3VAViT
from helpers import perturb

ODD = (1, 3, 61, 45)  # pads to the patch size, and to the window at every stage (shifted windows active)


def _swin(**kwargs) -> E3VASwin:
    torch.manual_seed(0)
    model = E3VASwin("nano", drop_path_rate=0.0, **kwargs)
    perturb(model.side_network, seed=1)
    return model


def _record_taps(model, blocks):
    """Registers, on the trunk's own blocks, hooks that record each block's input, post-attention
    residual and output (independently of the side network's hooks), and on each adapter its input."""
    seen = {"x": [], "h": [], "out": [], "attn_in": [], "mlp_in": []}
    for block in blocks:
        block.register_forward_pre_hook(lambda m, a: seen["x"].append(a[0].detach().clone()))
        block.norm2.register_forward_pre_hook(lambda m, a: seen["h"].append(a[0].detach().clone()))
        block.register_forward_hook(lambda m, a, o: seen["out"].append(o.detach().clone()))
    for stage_a, stage_m in zip(model.highway.beside_attn, model.highway.beside_mlp):
        for a, m in zip(stage_a, stage_m):
            a.register_forward_pre_hook(lambda mod, args: seen["attn_in"].append(args[0].detach().clone()))
            m.register_forward_pre_hook(lambda mod, args: seen["mlp_in"].append(args[0].detach().clone()))
    return seen


@pytest.mark.parametrize("adapter_input", ["sublayer_output", "sublayer_input"])
def test_adapters_read_the_sublayer_outputs_or_inputs_on_swin(adapter_input):
    model = _swin(adapter_input=adapter_input)
    blocks = [b for stage in model.trunk.layers for b in stage.blocks]
    assert any(b.shift_size > 0 for b in blocks)
    seen = _record_taps(model, blocks)
    model(torch.rand(ODD) * 255)
    n = len(blocks)
    assert len(seen["attn_in"]) == len(seen["mlp_in"]) == n
    for j in range(n):
        x, h, out = seen["x"][j], seen["h"][j], seen["out"][j]
        if adapter_input == "sublayer_output":  # F1(x) = h - x, F2(h) = out - h
            expected_attn, expected_mlp = h - x, out - h
        else:
            expected_attn, expected_mlp = x, h
        torch.testing.assert_close(seen["attn_in"][j], expected_attn, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seen["mlp_in"][j], expected_mlp, rtol=1e-5, atol=1e-5)


def test_adapters_read_the_sublayer_outputs_on_vit():
    torch.manual_seed(0)
    model = E3VAViT("nano", img_size=64, window_size=2)
    perturb(model.highway, seed=1)
    blocks = list(model.trunk.blocks)
    seen = _record_taps(model, blocks)
    model(torch.rand(1, 3, 64, 64) * 255)
    for j in range(len(blocks)):
        torch.testing.assert_close(seen["attn_in"][j], seen["h"][j] - seen["x"][j], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seen["mlp_in"][j], seen["out"][j] - seen["h"][j], rtol=1e-5, atol=1e-5)


def test_the_presets_use_the_papers_taps():
    for tuning in ("e3va", "e3va_plus", "e3va_plusplus"):
        model = E3VASwin("nano", tuning=tuning)
        assert model.highway.spec.adapter_input == "sublayer_output"
        assert model.highway.spec.arrangement == "parallel"
        assert model.highway_downsample == "difference"


@pytest.mark.parametrize("adapter_input", ["sublayer_output", "sublayer_input"])
@pytest.mark.parametrize("highway_downsample", ["difference", "direct"])
def test_fused_gradients_equal_plain_autograd(adapter_input, highway_downsample):
    kwargs = dict(adapter_input=adapter_input, highway_downsample=highway_downsample, saved_input_dtype="float32")
    fused, plain = _swin(**kwargs), _swin(fused_adapters=False, **kwargs)
    x = torch.rand(ODD) * 255
    out_f, out_p = fused(x), plain(x)
    for k in out_f:
        torch.testing.assert_close(out_f[k], out_p[k], rtol=1e-5, atol=1e-5)
    sum((o * o).mean() for o in out_f.values()).backward()
    sum((o * o).mean() for o in out_p.values()).backward()
    grads_p = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    checked = 0
    for name, p in fused.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, grads_p[name], rtol=1e-4, atol=1e-6)
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("adapter_input", ["sublayer_output", "sublayer_input"])
@pytest.mark.parametrize("highway_downsample", ["difference", "direct"])
def test_no_trunk_activation_is_kept_for_backward(adapter_input, highway_downsample):
    model = _swin(adapter_input=adapter_input, highway_downsample=highway_downsample)
    kept = []

    def pack(t):
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(torch.rand(ODD) * 255)
    assert sum(o.sum() for o in out.values()).requires_grad
    # Side-network weights and compact (bf16) copies only: no fp32 activation of batch 1 (B x L x C).
    fp32_activations = [tuple(t.shape) for t in kept if t.dtype == torch.float32 and t.dim() >= 3 and t.shape[0] == 1]
    assert kept and not fp32_activations, fp32_activations


def test_direct_downsampling_starts_off_zero_and_difference_at_zero():
    torch.manual_seed(0)
    x = torch.rand(ODD) * 255
    fixed = E3VASwin("nano", tuning="fixed", drop_path_rate=0.0)
    for mode, zero in (("difference", True), ("direct", False)):
        torch.manual_seed(0)
        model = E3VASwin("nano", drop_path_rate=0.0, highway_downsample=mode)  # adapters at zero
        model.trunk.load_state_dict(fixed.trunk.state_dict())
        with torch.no_grad():
            for i in range(1, 4):  # PM's LayerNorm has a bias in real checkpoints: PM(0) = W beta
                model.trunk.layers[i - 1].downsample.norm.bias.normal_()
                fixed.trunk.layers[i - 1].downsample.norm.bias.copy_(model.trunk.layers[i - 1].downsample.norm.bias)
        out, ref = model(x), fixed(x)
        torch.testing.assert_close(out["p0"], ref["p0"])  # nothing crosses into stage 0
        assert torch.allclose(out["p3"], ref["p3"], atol=1e-5) is zero, mode


def test_stacked_and_parallel_differ_once_perturbed():
    x = torch.rand(ODD) * 255
    parallel, stacked = _swin(), _swin(adapter_arrangement="stacked")
    stacked.load_state_dict(parallel.state_dict())
    out_p, out_s = parallel(x), stacked(x)
    assert not torch.allclose(out_p["p3"], out_s["p3"], atol=1e-4)
    torch.testing.assert_close(out_p["p0"].shape, out_s["p0"].shape)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        (dict(adapter_input="attention"), "sublayer_output"),
        (dict(adapter_arrangement="serial"), "stacked"),
        (dict(highway_downsample="merge"), "direct"),
        (dict(tuning="fixed", adapter_input="sublayer_input"), "'fixed' takes none of"),
        (dict(tuning="losa", adapter_input="sublayer_input"), "'losa' takes `rank` and `activation` only"),
        (dict(tuning="full", highway_downsample="direct"), "no side network"),
        (dict(highway_merging="learned"), "trainable"),
        (dict(tuning="fixed", highway_merging="trainable"), "no side network"),
    ],
)
def test_bad_option_values_name_the_accepted_ones(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        E3VASwin("nano", **kwargs)


@pytest.mark.parametrize("option", [dict(highway_downsample="direct"), dict(highway_merging="trainable")])
def test_vit_refuses_the_stage_crossing_options(option):
    with pytest.raises(ValueError, match="no patch merging"):
        E3VAViT("nano", img_size=64, window_size=2, **option)


@pytest.mark.parametrize("downsample", ["difference", "direct"])
def test_a_trainable_highway_merging_starts_as_the_trunks_and_trains(downsample):
    frozen, trainable = _swin(highway_downsample=downsample), _swin(highway_downsample=downsample,
                                                                  highway_merging="trainable")
    trainable.load_state_dict(frozen.state_dict(), strict=False)
    x = torch.randn(ODD)
    torch.testing.assert_close(trainable(x), frozen(x), rtol=0, atol=0)
    # One change of the reduction and of the norm's affine per stage end (nano: C = 32, 64, 128).
    merging = {n for n, p in trainable.named_parameters() if p.requires_grad} - {
        n for n, p in frozen.named_parameters() if p.requires_grad}
    assert sum(dict(trainable.named_parameters())[n].numel() for n in merging) == sum(
        8 * c * c + 8 * c for c in (32, 64, 128))
    sum(v.square().sum() for v in trainable(x).values()).backward()
    assert all(trainable.side_merging[i].reduction.grad.abs().sum() > 0 for i in range(3))
    perturb(trainable.side_merging, seed=3)
    assert not torch.allclose(trainable(x)["p3"], frozen(x)["p3"], atol=1e-4)
    # Recorded: a file trained with it is refused by the frozen-merging model, naming the override.
    with pytest.raises(TrainableCheckpointError, match="highway_merging=trainable"):
        apply_trainable(_swin(highway_downsample=downsample), trainable_checkpoint(trainable))


def test_frozen_output_norms_leave_the_side_network_alone_to_train():
    trained = {n for n, p in _swin(train_out_norms=False).named_parameters() if p.requires_grad}
    default = {n for n, p in _swin().named_parameters() if p.requires_grad}
    assert default - trained == {f"trunk.norm{i}.{w}" for i in range(4) for w in ("weight", "bias")}
    assert trained and all(n.startswith("highway.") for n in trained)


def test_files_record_their_taps_and_refuse_another_model():
    trained = _swin()
    saved = trainable_checkpoint(trained)
    assert saved["e3va_trainable"]["side_network"] == {
        "adapter_input": "sublayer_output", "highway_downsample": "difference"}
    apply_trainable(_swin(), saved)  # same choices: loads
    with pytest.raises(TrainableCheckpointError, match="adapter_input=sublayer_output"):
        apply_trainable(_swin(adapter_input="sublayer_input"), saved)
    with pytest.raises(TrainableCheckpointError, match="highway_downsample=difference"):
        apply_trainable(_swin(highway_downsample="direct"), saved)
    # A file written before the record existed was trained on the sub-layer inputs.
    legacy = {**saved, "e3va_trainable": {k: v for k, v in saved["e3va_trainable"].items() if k != "side_network"}}
    with pytest.raises(TrainableCheckpointError, match="adapter_input=sublayer_input"):
        apply_trainable(_swin(), legacy)
    apply_trainable(_swin(adapter_input="sublayer_input"), legacy)


def test_the_papers_taps_keep_as_much_for_backward_as_the_inputs_did():
    """One compact N x C copy per adapter either way; "direct" adds one packed side state per stage end."""
    x = torch.randn(2, 3, 128, 128)
    saved = {
        (a, d): bytes_saved_for_backward(E3VASwin("nano", adapter_input=a, highway_downsample=d).train(), x)
        for a, d in [("sublayer_output", "difference"), ("sublayer_input", "difference"), ("sublayer_output", "direct")]
    }
    assert saved[("sublayer_output", "difference")] == saved[("sublayer_input", "difference")], saved
    # The side state at stages 0-2 ends, in bf16: 2 x (32x32x32 + 16x16x64 + 8x8x128) x 2 bytes.
    extra = 2 * (32 * 32 * 32 + 16 * 16 * 64 + 8 * 8 * 128) * 2
    assert saved[("sublayer_output", "direct")] - saved[("sublayer_output", "difference")] == extra, saved


@pytest.mark.parametrize("train_v_down", [True, False])
def test_gradcheck_of_the_fused_adapter_function_in_float64_with_fp32_storage(train_v_down):
    gen = torch.Generator().manual_seed(0)
    dim, bottleneck, branches_x_rank = 6, 4, 4  # U: out x 2r, V: 2r x in, as DualLowRankLinear.factors()

    def param(*shape, grad=True):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(grad)

    x = torch.randn(2, 5, dim, generator=gen, dtype=torch.float64)  # a frozen activation: no gradient wanted
    weights = (param(branches_x_rank, dim, grad=train_v_down), param(bottleneck, branches_x_rank), param(bottleneck),
               param(branches_x_rank, bottleneck), param(dim, branches_x_rank), param(dim))
    # fp32 storage rounds the kept input to float32: the analytic gradient then differs from the numeric
    # one by about 1e-7 relative, far inside gradcheck's tolerance; a wrong formula is off by O(1).
    compact = CompactInput("float32")
    fn = lambda *w: _LowRankAdapterFunction.apply(x, *w, nn.GELU(), compact)  # noqa: E731
    assert torch.autograd.gradcheck(fn, weights, eps=1e-6, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize("adapter_input", ["sublayer_output", "sublayer_input"])
def test_stacked_adapters_beside_the_mlp_read_their_tap_plus_the_attention_adapters_output(adapter_input):
    """The paper's ablation: within a block, the MLP-side adapter reads its tap plus what the attention-side
    adapter of the same block added; the attention-side adapter reads its tap alone, whatever came before."""
    model = _swin(adapter_input=adapter_input, adapter_arrangement="stacked")
    blocks = [b for stage in model.trunk.layers for b in stage.blocks]
    seen = _record_taps(model, blocks)
    attn_out = []
    for stage in model.highway.beside_attn:
        for adapter in stage:
            adapter.register_forward_hook(lambda mod, args, out: attn_out.append(out.detach().clone()))
    model(torch.rand(ODD) * 255)
    assert len(attn_out) == len(seen["mlp_in"]) == len(blocks)
    for j in range(len(blocks)):
        x, h, out = seen["x"][j], seen["h"][j], seen["out"][j]
        tap_attn, tap_mlp = (h - x, out - h) if adapter_input == "sublayer_output" else (x, h)
        torch.testing.assert_close(seen["attn_in"][j], tap_attn, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seen["mlp_in"][j], tap_mlp + attn_out[j], rtol=1e-5, atol=1e-5)


def test_a_block_that_calls_drop_path_a_third_time_is_refused_with_the_way_out():
    """The sub-layer-output taps count two drop_path calls per block (attention, then MLP); a third would be
    fed to the wrong adapter, so it is an error that names the fix."""
    model = _swin()
    block = model.trunk.layers[0].blocks[0]
    forward = block.forward

    def forward_with_a_third_sublayer(*args):
        out = forward(*args)
        return out + block.drop_path(torch.zeros_like(out))

    block.forward = forward_with_a_third_sublayer
    message = (r"^A trunk block called its drop_path more than twice in one forward; the sub-layer-output taps expect "
               r"Detectron2's Swin/ViT blocks \(attention, then MLP\)\. Use adapter_input='sublayer_input' for this "
               r"trunk\.$")
    with pytest.raises(RuntimeError, match=message):
        model(torch.rand(ODD) * 255)


def test_the_highway_sums_in_place_after_its_first_addition():
    """One N x C buffer per stage rather than one per adapter: the first sum is a new tensor (a custom autograd
    function's output may not be changed in place), later adapters add to it in place; gradients still flow."""
    taps = _swin()._taps
    outs = [torch.randn(5, 3, requires_grad=True) for _ in range(4)]
    with taps.stage(None):
        for i, out in enumerate(outs):
            taps._accumulate(out * 1.0)  # a non-leaf tensor, as an adapter's output is
            if i == 1:
                buffer = taps.total.data_ptr()
        assert taps.total.data_ptr() == buffer
        total = taps.end()
    torch.testing.assert_close(total, sum(o.detach() for o in outs))
    total.sum().backward()
    assert all(torch.equal(o.grad, torch.ones(5, 3)) for o in outs)


def test_dual_low_rank_weights_start_with_unit_gain_or_with_u_at_zero():
    """``V ~ N(0, 1/in)`` and ``U ~ N(0, 1/2r)``: each entry of ``W = U1 V1 + U2 V2`` sums ``2r`` products, so
    ``var(W) = 1/in`` and a unit-variance input gives unit-variance outputs. ``zero_init`` zeroes ``U`` only (``V``
    stays random, so ``U`` gets a gradient at the first step); ``reset_parameters()`` re-draws and zeroes the bias."""
    torch.manual_seed(0)
    layer = DualLowRankLinear(256, 512, rank=8)
    assert abs(layer.weight().var().item() * 256 - 1) < 0.1
    zero = DualLowRankLinear(256, 512, rank=8, zero_init=True)
    assert not zero.u.any() and abs(zero.v.std().item() * 16 - 1) < 0.05
    with torch.no_grad():
        layer.u.zero_()
        layer.bias.fill_(1.0)
    layer.reset_parameters()
    assert abs(layer.weight().var().item() * 256 - 1) < 0.1 and not layer.bias.any()


def test_dual_low_rank_linear_without_bias_and_its_rank_check():
    layer = DualLowRankLinear(4, 3, rank=1, bias=False)
    assert layer.bias is None and [n for n, _ in layer.named_parameters()] == ["u", "v"]
    x = torch.randn(2, 4)
    torch.testing.assert_close(layer(x), x @ (layer.u[0] @ layer.v[0] + layer.u[1] @ layer.v[1]).T)
    with pytest.raises(ValueError, match=r"^rank must be a positive integer, got 0\.$"):
        DualLowRankLinear(4, 3, rank=0)


def test_an_adapter_needs_a_bottleneck_of_at_least_one_and_a_known_activation():
    assert HighwayAdapter(8, 1, rank=2).down.out_features == 1
    with pytest.raises(ValueError, match=r"^bottleneck width must be positive, got 0 for dim=8\.$"):
        HighwayAdapter(8, 0, rank=2)
    with pytest.raises(ValueError, match=r"^Unknown activation 'swish2'; expected one of \[.*'gelu'.*\]\.$"):
        HighwayAdapter(8, 4, rank=2, activation="swish2")
    # The highway's bottleneck: the stage width times the ratio, rounded, and at least 1.
    highway = AdapterHighway([8, 8, 40], [1, 1, 1], AdapterSpec(rank=1, bottleneck_ratio=0.05))
    assert [stage[0].down.out_features for stage in highway.beside_attn] == [1, 1, 2]


def test_adapters_built_alone_have_the_defaults_the_methods_use():
    """GELU, the fused function keeping a bf16 copy of the input, trainable down-projection factors: what
    ``e3va`` builds, and what an adapter or highway built without those arguments gets."""
    alone = HighwayAdapter(8, 4, rank=2)
    in_highway = AdapterHighway([8], [1], AdapterSpec(rank=2)).beside_mlp[0][0]
    in_e3va = E3VASwin("nano").highway.beside_mlp[0][0]
    for adapter in (alone, in_highway, in_e3va):
        assert isinstance(adapter.act, nn.GELU) and adapter.fused and adapter.compact.name == "bfloat16"
        assert isinstance(adapter.down.v, nn.Parameter)


def test_the_spec_accepts_positive_integer_ranks_and_ratios_and_names_what_it_refuses():
    assert AdapterSpec(rank=1, bottleneck_ratio=0.01).rank == 1
    refused = [
        (dict(rank=0), r"Adapter rank must be a positive integer, got 0\."),
        (dict(rank=True), r"Adapter rank must be a positive integer, got True\."),  # a bool would be taken as 1
        (dict(rank=2.0), r"Adapter rank must be a positive integer, got 2\.0\."),
        (dict(rank=1, bottleneck_ratio=0), r"bottleneck_ratio must be > 0, got 0\."),
        (dict(rank=1, adapter_input="x"), r"Unknown adapter_input 'x'; expected one of \['sublayer_output', "
                                          r"'sublayer_input'\]\."),
        (dict(rank=1, arrangement="serial"), r"Unknown adapter arrangement 'serial'; expected one of \['parallel', "
                                             r"'stacked'\]\."),
    ]
    for kwargs, message in refused:
        with pytest.raises(ValueError, match=f"^{message}$"):
            AdapterSpec(**kwargs)


def test_files_record_a_stacked_arrangement_and_refuse_a_parallel_model():
    saved = trainable_checkpoint(_swin(adapter_arrangement="stacked"))
    assert saved["e3va_trainable"]["side_network"] == {
        "adapter_input": "sublayer_output", "arrangement": "stacked", "highway_downsample": "difference"}
    apply_trainable(_swin(adapter_arrangement="stacked"), saved)
    with pytest.raises(TrainableCheckpointError, match="arrangement=stacked"):
        apply_trainable(_swin(), saved)
