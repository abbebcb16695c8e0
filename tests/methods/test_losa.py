"""LoSA's side network on the Swin trunk: identity at initialisation, what trains, what autograd keeps."""
import pytest
import torch
from detectron2.utils.events import EventStorage

from e3va import E3VASwin, LowRankMixer
from e3va.engine.memory import bytes_saved_for_backward
from e3va.methods.losa import LoSASideNetwork, LoSASpec, LowRankMLP, mix_in_windows
from e3va.trainable import apply_trainable, trainable_checkpoint
from helpers import perturb, synthetic_batch, tiny_detector, trunk_outputs_during_training_step

NORMS = {f"trunk.norm{i}.{w}" for i in range(4) for w in ("weight", "bias")}


def _perturb(model, scale=0.05, seed=0):
    perturb(model.losa, scale, seed)


def test_losa_starts_as_the_identity():
    torch.manual_seed(0)
    losa = E3VASwin("nano", tuning="losa", drop_path_rate=0.0).eval()
    fixed = E3VASwin("nano", tuning="fixed", drop_path_rate=0.0).eval()
    missing, unexpected = fixed.load_state_dict(losa.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("losa.") for k in unexpected)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        a, b = losa(x), fixed(x)
    assert a.keys() == b.keys() == {"p0", "p1", "p2", "p3"}
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


def test_perturbed_side_network_changes_outputs_and_only_it_learns():
    torch.manual_seed(0)
    model = E3VASwin("nano", tuning="losa", drop_path_rate=0.0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = {k: v.clone() for k, v in model(x).items()}
    _perturb(model)
    out = model(x)
    for name in out:  # every level changes, p0 included (the side state starts in stage 0)
        assert (out[name] - before[name]).abs().max() > 1e-3, name
    sum(v.square().mean() for v in out.values()).backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.losa.named_parameters(prefix="losa")} | NORMS
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, f"frozen {name} received a gradient"


def test_zero_initialised_last_projections_learn_at_the_first_step():
    model = E3VASwin("nano", tuning="losa")
    sum(v.square().mean() for v in model(torch.randn(1, 3, 64, 64)).values()).backward()
    mixer = model.losa.mixers[1][0]
    assert mixer.channel_mlp.fc2.weight.grad.abs().sum() > 0
    assert mixer.token_mlp.fc2.weight.grad.abs().sum() > 0


def test_trunk_runs_without_autograd_and_little_is_kept_for_backward():
    model = E3VASwin("nano", tuning="losa").train()
    out, trunk_outputs = trunk_outputs_during_training_step(model)
    assert len(trunk_outputs) > 50
    assert all(t.grad_fn is None and not t.requires_grad for t in trunk_outputs)
    assert all(v.requires_grad for v in out.values())
    x = torch.randn(2, 3, 96, 96)
    saved = {
        key: bytes_saved_for_backward(E3VASwin("nano", tuning=tuning, fused_adapters=fused).train(), x)
        for key, tuning, fused in [("full", "full", True), ("plain", "losa", False), ("fused", "losa", True)]
    }
    assert saved["fused"] < 0.5 * saved["plain"] and saved["fused"] < 0.25 * saved["full"], saved


@pytest.mark.parametrize("height, width", [(64, 80), (96, 96), (70, 45)])
def test_any_input_size_and_output_shape(height, width):
    model = E3VASwin("nano", tuning="losa")
    _perturb(model)
    out = model(torch.randn(1, 3, height, width))
    for name, spec in model.output_shape().items():
        assert out[name].shape == (1, spec.channels, -(-height // spec.stride), -(-width // spec.stride)), name
    sum(v.sum() for v in out.values()).backward()


def test_windows_are_padded_and_cropped_like_swin():
    """Mixing in windows is the mixer on each window; padded tokens do not reach the real ones."""
    torch.manual_seed(0)
    mixer = LowRankMixer(8, 4, rank=3)
    with torch.no_grad():
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(1, 3 * 3, 8)  # a 3x3 map, windows of 2x2: padded to 4x4
    out = mix_in_windows(mixer, x, 3, 3, 2)
    grid = x.view(3, 3, 8)
    top_left = grid[:2, :2].reshape(1, 4, 8)
    torch.testing.assert_close(out.view(3, 3, 8)[:2, :2].reshape(1, 4, 8), mixer(top_left))
    corner = torch.zeros(2, 2, 8)  # the bottom-right window holds one real token and three zeros
    corner[0, 0] = grid[2, 2]
    torch.testing.assert_close(out.view(3, 3, 8)[2, 2], mixer(corner.view(1, 4, 8))[0, 0])


def test_token_count_mismatch_names_the_expected_size():
    mixer = LowRankMixer(32, 49, rank=4)
    with pytest.raises(ValueError, match=r"49 tokens \(a 7x7 window\) of 32 channels.*\(2, 144, 32\)"):
        mixer(torch.randn(2, 144, 32))
    # The advice too: which window to build the backbone with.
    with pytest.raises(ValueError, match=r"window is 12x12 \(144 tokens\).*49 tokens \(a 7x7 window\) of 32 "
                       r"channels; build the backbone with the window size its LoSA weights were trained with\.$"):
        mix_in_windows(mixer, torch.randn(1, 24 * 24, 32), 24, 24, window_size=12)
    with pytest.raises(ValueError, match="of 32 channels.*got \\(2, 49, 16\\)"):
        mixer(torch.randn(2, 49, 16))


def test_rank_and_activation_overrides():
    model = E3VASwin("nano", tuning="losa", rank=4, activation="relu")
    mixer = model.losa.mixers[2][1]
    assert mixer.channel_mlp.fc1.weight.shape == (4, 128) and mixer.token_mlp.fc1.weight.shape == (4, 49)
    assert isinstance(mixer.channel_mlp.act, torch.nn.ReLU) and isinstance(mixer.token_mlp.act, torch.nn.ReLU)
    with pytest.raises(ValueError, match=r"^Unknown activation 'swish2'; expected one of \[.*'gelu'.*\]\.$"):
        E3VASwin("nano", tuning="losa", activation="swish2")
    assert E3VASwin("nano", tuning="losa", window_size=12).losa.mixers[0][0].num_tokens == 144
    with pytest.raises(ValueError, match="'losa' takes `rank` and `activation` only.*bottleneck_ratio"):
        E3VASwin("nano", tuning="losa", bottleneck_ratio=0.25)
    with pytest.raises(ValueError, match="rank must be a positive integer.*got 0"):
        E3VASwin("nano", tuning="losa", rank=0)


def test_bfloat16_trunk_keeps_the_side_network_in_fp32():
    model = E3VASwin("nano", tuning="losa", trunk_dtype="bfloat16")
    _perturb(model)
    out = model(torch.randn(1, 3, 64, 64))
    assert all(v.dtype == torch.float32 for v in out.values())
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.losa.parameters())


def test_mask_rcnn_trains_a_step_with_losa():
    torch.manual_seed(0)
    model = tiny_detector("common/models/mask_rcnn_swin_e3va.py", tuning="losa").train()
    backbone = model.backbone.bottom_up
    with EventStorage():
        losses = model(synthetic_batch(size=64))
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    for name, p in backbone.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name
    assert any(p.grad.abs().sum() > 0 for p in backbone.losa.parameters())


def test_rank_preset_matches_the_e3va_budget_on_swin_b():
    """Rank 45 gives Swin-B 1.21 M trainable parameters (e3va: 1.20 M), as projects/E3VA/README.md says."""
    model = E3VASwin("B", tuning="losa")
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 1_207_928


def test_a_mixer_takes_one_window_without_a_batch_dimension():
    """``(..., N, C)``: a single ``(N, C)`` window is mixed as a batch of one."""
    torch.manual_seed(0)
    mixer = LowRankMixer(8, 4, rank=3)
    perturb(mixer)
    z = torch.randn(4, 8)
    torch.testing.assert_close(mixer(z), mixer(z[None])[0])


def test_a_token_count_that_is_not_a_square_claims_no_window():
    mixer = LowRankMixer(8, 6, rank=2)
    with pytest.raises(ValueError, match=r"\(\.\.\., 6, 8\): 6 tokens of 8 channels, got \(2, 4, 8\)\.$"):
        mixer(torch.randn(2, 4, 8))


def test_a_fused_side_network_keeps_only_compact_copies_for_backward():
    """Every mixer keeps only a bf16 copy of its input, the first one included (its input, the first block's
    output, needs no gradient); the plain graph would keep fp32 windows and hidden activations."""
    torch.manual_seed(0)
    model = E3VASwin("nano", tuning="losa", drop_path_rate=0.0).train()
    _perturb(model)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        model(torch.rand(1, 3, 61, 45) * 255)
    assert kept and all(t.dtype == torch.bfloat16 for t in kept), {(t.dtype, tuple(t.shape)) for t in kept}


def test_files_record_the_stage_crossing_and_load_into_the_same_model():
    torch.manual_seed(0)
    trained = E3VASwin("nano", tuning="losa")
    _perturb(trained)
    saved = trainable_checkpoint(trained)
    assert saved["e3va_trainable"]["side_network"] == {"highway_downsample": "difference"}
    torch.manual_seed(0)  # the same frozen trunk: files are checked against its fingerprint
    fresh = E3VASwin("nano", tuning="losa")
    apply_trainable(fresh, saved)
    torch.testing.assert_close(fresh.losa.state_dict(), trained.losa.state_dict())


def test_a_side_network_built_alone_has_the_defaults_losa_uses():
    """GELU in both MLPs and the fused function keeping a bf16 copy of each mixer's input: what ``losa``
    builds, and what LoSASideNetwork, LowRankMixer and LowRankMLP built without those arguments get."""
    alone = LoSASideNetwork([8], [1], window_size=2, rank=3)
    in_losa = E3VASwin("nano", tuning="losa").losa
    for side in (alone, in_losa):
        assert side.fused and side.compact.name == "bfloat16"
        mixer = side.mixers[0][0]
        assert isinstance(mixer.token_mlp.act, torch.nn.GELU) and isinstance(mixer.channel_mlp.act, torch.nn.GELU)
    assert isinstance(LowRankMixer(8, 4, rank=3).token_mlp.act, torch.nn.GELU)
    assert isinstance(LowRankMLP(8, 3).act, torch.nn.GELU)


def test_ranks_must_be_positive_integers_and_activations_known():
    assert LoSASpec(rank=1).rank == 1 and LowRankMLP(8, 1).fc1.out_features == 1
    for rank in (0, True, 2.0):  # a bool would be taken as 1
        with pytest.raises(ValueError, match=rf"^LoSA rank must be a positive integer, got {rank!r}\.$"):
            LoSASpec(rank=rank)
    for rank in (0, 2.0):
        with pytest.raises(ValueError, match=rf"^rank must be a positive integer, got {rank!r}\.$"):
            LowRankMLP(8, rank)
    with pytest.raises(ValueError, match=r"^Unknown activation 'swish2'; expected one of \[.*'gelu'.*\]\.$"):
        LowRankMLP(8, 2, "swish2")
