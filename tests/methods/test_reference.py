"""An independent reference of E3VA's equations (projects/E3VA/README.md), in plain torch ops.

From the trunk's own blocks (run without any side network: their inputs, post-attention residuals and
outputs recorded by hooks) and the side network's weights (the highway's factor tensors, the mixers'
Linear weights; not their ``forward``), compute

    d_j = d_{j-1} + A_j(F1_j) + M_j(F2_j),   F1_j = h_j - x_{j-1},   F2_j = x_j - h_j
    A(z) = (U_up V_up) gelu((U_down V_down) z + b_down) + b_up,   W = U1 V1 + U2 V2
    p_s = norm_s(x_end + d_end),   d_start(next) = PM(x_end + d_end) - PM(x_end)      (Swin)
    out = x_L + d_L                                                                      (ViT)
    a_l = a_{l-1} + g_l(b_l + a_{l-1}), tokens mixed within windows, out = b_L + a_L     (LoSA, both)

and compare with the backbones' outputs, side networks perturbed off zero, at an odd input size.
"""
import torch
import torch.nn.functional as F

from e3va import E3VASwin
from e3va.vit import E3VAViT
from helpers import perturb


def _dense(layer) -> torch.Tensor:
    """``U1 V1 + U2 V2`` from the stacked factors ``u`` (2 x out x r) and ``v`` (2 x r x in)."""
    return layer.u[0] @ layer.v[0] + layer.u[1] @ layer.v[1]


def _adapter(adapter, z: torch.Tensor) -> torch.Tensor:
    hidden = F.gelu(z @ _dense(adapter.down).T + adapter.down.bias)
    return hidden @ _dense(adapter.up).T + adapter.up.bias


def _block_calls(trunk, blocks, image: torch.Tensor) -> list:
    """Runs the trunk alone (the side network's hooks are inactive outside the backbone's forward) and
    returns, per block call, ``(x_{j-1}, h_j, x_j, (H, W))`` and the trunk's own output."""
    calls = []

    def pre(block, args):
        calls.append([args[0].detach().clone()])

    def pre_norm2(norm, args):
        calls[-1].append(args[0].detach().clone())

    def post(block, args, out):
        calls[-1] += [out.detach().clone(), (getattr(block, "H", None), getattr(block, "W", None))]

    handles = []
    for block in blocks:
        handles += [block.register_forward_pre_hook(pre), block.norm2.register_forward_pre_hook(pre_norm2),
                    block.register_forward_hook(post)]
    try:
        with torch.no_grad():
            out = trunk(image)
    finally:
        for h in handles:
            h.remove()
    return calls, out


def _swin_stage_end(trunk, i: int, x_end: torch.Tensor, side: torch.Tensor, H: int, W: int):
    """``(p_i, side state entering stage i + 1)``: ``norm_i(x_end + side)`` as an image, and
    ``PM(x_end + side) - PM(x_end)`` (None after the last stage)."""
    y = x_end + side
    p = getattr(trunk, f"norm{i}")(y)
    p = p.view(-1, H, W, p.shape[-1]).permute(0, 3, 1, 2)
    if i == len(trunk.layers) - 1:
        return p, None
    merge = trunk.layers[i].downsample
    return p, merge(y, H, W) - merge(x_end, H, W)


def _swin_blocks(trunk) -> list:
    return [b for stage in trunk.layers for b in stage.blocks]


def _reference_swin(model: E3VASwin, image: torch.Tensor):
    trunk = model.trunk
    calls, _ = _block_calls(trunk, _swin_blocks(trunk), image)
    outputs, carried, k = {}, None, 0
    with torch.no_grad():
        for i, stage in enumerate(trunk.layers):
            total = 0
            for j in range(len(stage.blocks)):
                x_in, h, x_out, (H, W) = calls[k]
                k += 1
                total = total + _adapter(model.highway.beside_attn[i][j], h - x_in)
                total = total + _adapter(model.highway.beside_mlp[i][j], x_out - h)
            d_end = total if carried is None else carried + total
            outputs[f"p{i}"], carried = _swin_stage_end(trunk, i, x_out, d_end, H, W)
    return outputs


def test_swin_e3va_equals_its_equations():
    torch.manual_seed(0)
    model = E3VASwin("nano", drop_path_rate=0.0)
    perturb(model.highway, scale=0.05, seed=1)
    perturb(model.trunk, scale=0.02, seed=2)  # output norms and patch merging off their initialisation
    image = torch.rand(1, 3, 61, 45) * 255
    expected = _reference_swin(model, image)
    got = model(image)
    assert set(got) == set(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)
    # The highway matters at every level: the trunk alone is far from these outputs.
    fixed = E3VASwin("nano", tuning="fixed", drop_path_rate=0.0)
    fixed.trunk.load_state_dict(model.trunk.state_dict())
    plain = fixed(image)
    assert all((plain[k] - got[k]).abs().max() > 1e-2 for k in got)


def test_vit_e3va_equals_its_equations():
    torch.manual_seed(0)
    model = E3VAViT("nano", img_size=64, window_size=2)
    perturb(model.highway, scale=0.05, seed=1)
    image = torch.rand(1, 3, 64, 64) * 255
    calls, trunk_out = _block_calls(model.trunk, list(model.trunk.blocks), image)
    trunk_out = trunk_out["last_feat"]
    with torch.no_grad():
        d = sum(_adapter(model.highway.beside_attn[0][j], h - x_in) + _adapter(model.highway.beside_mlp[0][j], x_out - h)
                for j, (x_in, h, x_out, _) in enumerate(calls))
    expected = trunk_out + d.permute(0, 3, 1, 2)
    got = model(image)["last_feat"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - trunk_out).abs().max() > 1e-2


def _mlp(mlp, z: torch.Tensor) -> torch.Tensor:
    return F.linear(F.gelu(F.linear(z, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)


def _losa_update(mixer, z: torch.Tensor, H: int, W: int, w: int) -> torch.Tensor:
    """``g(z)`` window by window (zero-padded bottom/right to the window), for flat ``(B, H*W, C)`` tokens:
    ``t = T(window)`` along the tokens, ``g = t + M(window + t)`` along the channels."""
    B, C = z.shape[0], z.shape[-1]
    Hp, Wp = -(-H // w) * w, -(-W // w) * w
    grid = torch.zeros(B, Hp, Wp, C)
    grid[:, :H, :W] = z.view(B, H, W, C)
    out = torch.zeros_like(grid)
    for r in range(0, Hp, w):
        for c in range(0, Wp, w):
            window = grid[:, r:r + w, c:c + w].reshape(B, w * w, C)
            t = _mlp(mixer.token_mlp, window.transpose(1, 2)).transpose(1, 2)
            out[:, r:r + w, c:c + w] = (t + _mlp(mixer.channel_mlp, window + t)).view(B, w, w, C)
    return out[:, :H, :W].reshape(B, H * W, C)


def test_swin_losa_equals_its_recurrence():
    """``a_l = a_{l-1} + g_l(b_l + a_{l-1})`` on each block output, crossing patch merging as the highway."""
    torch.manual_seed(0)
    model = E3VASwin("nano", tuning="losa", drop_path_rate=0.0)
    perturb(model.losa, scale=0.05, seed=1)
    perturb(model.trunk, scale=0.02, seed=2)
    image = torch.rand(1, 3, 61, 45) * 255
    trunk = model.trunk
    calls, _ = _block_calls(trunk, _swin_blocks(trunk), image)
    expected, state, k = {}, None, 0
    with torch.no_grad():
        for i, stage in enumerate(trunk.layers):
            for j in range(len(stage.blocks)):
                _, _, b, (H, W) = calls[k]
                k += 1
                z = b if state is None else b + state
                update = _losa_update(model.losa.mixers[i][j], z, H, W, trunk.layers[0].window_size)
                state = update if state is None else state + update
            expected[f"p{i}"], state = _swin_stage_end(trunk, i, b, state, H, W)
    got = model(image)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)


def test_vit_losa_equals_its_recurrence():
    """On ViT: one stage, no merging, output ``b_L + a_L``; 3x3 windows on a 4x4 token grid need padding."""
    torch.manual_seed(0)
    w = 3
    model = E3VAViT("nano", tuning="losa", img_size=64, window_size=w)
    perturb(model.losa, scale=0.05, seed=1)
    image = torch.rand(1, 3, 64, 64) * 255
    calls, trunk_out = _block_calls(model.trunk, list(model.trunk.blocks), image)
    trunk_out = trunk_out["last_feat"]
    a = 0
    with torch.no_grad():
        for mixer, (_, _, b, _) in zip(model.losa.mixers[0], calls):
            B, H, W, C = b.shape  # ViT blocks map (B, H, W, C)
            a = a + _losa_update(mixer, (b + a).reshape(B, H * W, C), H, W, w).view(B, H, W, C)
    expected = trunk_out + a.permute(0, 3, 1, 2)
    got = model(image)["last_feat"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - trunk_out).abs().max() > 1e-2
