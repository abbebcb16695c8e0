"""Swin Transformer trunks with a tuning method beside them: ``E3VASwin``, its presets and weights' sources.

The trunk is Detectron2's ``SwinTransformer`` (the detection port of the official code), used unmodified,
so that official checkpoints keep their parameter names. ``E3VASwin`` outputs ``p0..p3`` (strides 4..32)
for Detectron2's ``FPN``. A side network (E3VA's highway, LoSA) runs stage by stage beside the trunk and,
at each stage end, crosses the trunk's own frozen patch merging ``PM``:
``d_next = PM(x_end + d_end) - PM(x_end)`` (``highway_downsample="difference"``) or ``PM(d_end)``
(``"direct"``), where ``PM`` may also be a trainable version (``highway_merging="trainable"``); the stage
output is ``norm(x_end + d_end)``. Official and timm weights are read by
``e3va.swin_weights``.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.swin import SwinTransformer
from torch import nn

from .backbone import SideTunedBackbone, pick_preset
from .side_memory import Packed
from .methods import TrunkLayout, TuningOptions
from .methods.base import with_tuning_options

__all__ = [
    "NANO_IMAGE_FORMAT",
    "NANO_PIXEL_MEAN",
    "NANO_PIXEL_STD",
    "SWIN_PRESETS",
    "SWIN_PRETRAINED_URLS",
    "E3VASwin",
    "TrainableMerging",
    "build_swin_trunk",
    "swin_output_shape",
    "swin_preset",
]

SWIN_FEATURES = ("p0", "p1", "p2", "p3")

# Embed dims, depths and heads of Swin-T/S/B/L as in the Swin paper (Liu et al., 2021, Table 1).
# "nano" is not a paper model: it is the small trunk the project pretrains itself for the CPU demo.
SWIN_PRESETS: Dict[str, Dict[str, Any]] = {
    "T": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "S": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "B": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "L": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    "nano": dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8)),
}

_RELEASE = "https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
# Official ImageNet classification checkpoints (Microsoft release format: {"model": state_dict}).
SWIN_PRETRAINED_URLS: Dict[str, str] = {
    "T_in1k_w7": _RELEASE + "swin_tiny_patch4_window7_224.pth",
    "S_in1k_w7": _RELEASE + "swin_small_patch4_window7_224.pth",
    "B_in1k_w7": _RELEASE + "swin_base_patch4_window7_224.pth",
    "B_in1k_w12": _RELEASE + "swin_base_patch4_window12_384.pth",
    "B_in22k_w7": _RELEASE + "swin_base_patch4_window7_224_22k.pth",
    "B_in22k_w12": _RELEASE + "swin_base_patch4_window12_384_22k.pth",
    "L_in22k_w7": _RELEASE + "swin_large_patch4_window7_224_22k.pth",
    "L_in22k_w12": _RELEASE + "swin_large_patch4_window12_384_22k.pth",
}

SUPPORTED_WINDOW_SIZES = (7, 12)

# The official releases were trained on RGB images in 0-255 normalised by ImageNet's mean and std
# (Detectron2's ``imagenet_rgb256_mean/std``). The project's nano trunk was pretrained on Detectron2's
# default channel order, BGR, with the same statistics (tools/pretrain_nano_swin.py); a model built on
# it must normalise its input the same way.
NANO_IMAGE_FORMAT = "BGR"
NANO_PIXEL_MEAN = (103.530, 116.280, 123.675)
NANO_PIXEL_STD = (57.375, 57.120, 58.395)


# swin_preset(size): a copy of the architecture of Swin-``size`` (one of SWIN_PRESETS).
swin_preset = functools.partial(pick_preset, SWIN_PRESETS, architecture="Swin")


def build_swin_trunk(
    size: str = "T",
    *,
    window_size: int = 7,
    drop_path_rate: float = 0.2,
    out_indices: tuple = (0, 1, 2, 3),
) -> SwinTransformer:
    """Builds Detectron2's Swin Transformer with the preset ``size`` and window ``window_size``.

    The trunk pads its input to the patch size and every stage to the window size, and crops the outputs
    back, so any input size works.
    """
    if window_size not in SUPPORTED_WINDOW_SIZES:
        raise ValueError(
            f"Unsupported window_size={window_size!r}; the Swin releases use {SUPPORTED_WINDOW_SIZES}."
        )
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}.")
    return SwinTransformer(
        **swin_preset(size),
        window_size=window_size,
        drop_path_rate=drop_path_rate,
        out_indices=tuple(out_indices),
    )

def _check_out_features(out_features: Sequence[str]) -> Sequence[str]:
    bad = [f for f in out_features if f not in SWIN_FEATURES]
    if bad or not out_features:
        raise ValueError(f"Bad out_features {list(out_features)!r}; choose among {list(SWIN_FEATURES)}.")
    return out_features


def swin_output_shape(size: str, out_features: Sequence[str] = SWIN_FEATURES) -> Dict[str, ShapeSpec]:
    """The ``output_shape()`` of an ``E3VASwin`` of preset ``size``, without building it.

    For LazyConfig heads whose ``input_shape`` must follow the backbone's size, e.g.
    ``input_shape=L(swin_output_shape)(size="${...backbone.bottom_up.size}")``.
    """
    embed_dim = swin_preset(size)["embed_dim"]
    _check_out_features(out_features)
    return {
        f: ShapeSpec(channels=embed_dim * 2**i, stride=2 ** (i + 2))
        for i, f in enumerate(SWIN_FEATURES)
        if f in out_features
    }


class TrainableMerging(nn.Module):
    """A trainable patch merging for the side network (``highway_merging="trainable"``, the paper's ablation):
    the trunk's own merging ``pm`` with trained changes of its weights, ``W + dW`` and the norm's affine
    ``g + dg``, ``b + db``, all changes starting at zero, so that it starts as the inherited one whatever
    weights the trunk loads. The trunk itself keeps its frozen merging."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Parameter(torch.zeros(2 * dim, 4 * dim))
        self.norm_weight = nn.Parameter(torch.zeros(4 * dim))
        self.norm_bias = nn.Parameter(torch.zeros(4 * dim))

    def forward(self, pm: nn.Module, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        weights = {"reduction.weight": pm.reduction.weight + self.reduction,
                   "norm.weight": pm.norm.weight + self.norm_weight, "norm.bias": pm.norm.bias + self.norm_bias}
        return torch.func.functional_call(pm, weights, (x, H, W))


@with_tuning_options()
class E3VASwin(SideTunedBackbone):
    """Swin backbone for Detectron2 tuned with a method of ``e3va.methods`` (E3VA by default).

    Outputs ``p0..p3`` (strides 4..32), to be fed to Detectron2's ``FPN``.

    Args:
        size: Swin preset, one of ``e3va.swin.SWIN_PRESETS`` (T, S, B, L, nano).
        tuning: tuning method name, one of ``e3va.TUNING_METHODS``.
        window_size: 7 or 12, as the pretrained checkpoint.
        drop_path_rate: stochastic depth of the trunk.
        out_features: which of ``p0..p3`` to return.
        **options: the tuning options, ``e3va.methods.TuningOptions`` (rank, bottleneck_ratio, activation,
            adapter_input, adapter_arrangement, highway_downsample, fused_adapters, saved_input_dtype,
            trunk_dtype, compile_trunk). With a low-precision ``trunk_dtype`` the side network, the output
            norms and the patch merging it crosses stay fp32.
    """

    def __init__(
        self,
        size: str = "T",
        *,
        tuning: str = "e3va",
        window_size: int = 7,
        drop_path_rate: float = 0.2,
        out_features: Sequence[str] = SWIN_FEATURES,
        **options: Any,
    ) -> None:
        super().__init__()
        self._out_features = list(_check_out_features(out_features))

        self.size = size
        self.trunk = build_swin_trunk(size, window_size=window_size, drop_path_rate=drop_path_rate)
        stage_dims = list(self.trunk.num_features)
        self._attach_tuning(tuning, self._trunk_layout(self.trunk), TuningOptions.from_kwargs(type(self), options),
                            out_norm_names=[f"norm{i}" for i in range(4)])
        self.side_merging: Optional[nn.ModuleList] = None  # highway_merging="trainable": one per stage end
        if self.highway_merging == "trainable":
            self.side_merging = nn.ModuleList(TrainableMerging(stage.downsample.dim)
                                              for stage in self.trunk.layers if stage.downsample is not None)
        self._features_given: Optional[Tuple[torch.Tensor, Dict[str, torch.Tensor]]] = None  # give_features
        self._out_feature_channels = {f"p{i}": stage_dims[i] for i in range(4)}
        self._out_feature_strides = {f"p{i}": 2 ** (i + 2) for i in range(4)}

    @staticmethod
    def _trunk_layout(trunk: nn.Module) -> TrunkLayout:
        return TrunkLayout(
            trunk,
            blocks_by_stage=[list(stage.blocks) for stage in trunk.layers],
            stage_dims=list(trunk.num_features),
            window_size=trunk.layers[0].window_size,
            grid_of=lambda block, output: (block.H, block.W),  # Swin blocks hold flat (B, H*W, C) tokens
            stage_crossing=True,
        )

    def out_norm(self, stage: int) -> nn.Module:
        """The norm between stage ``stage`` and the FPN (the trunk's ``norm{stage}``, untrained by ImageNet)."""
        return getattr(self.trunk, f"norm{stage}")

    def share_trunk(self, trunk: SwinTransformer) -> None:
        """Runs this backbone on the frozen parts of ``trunk``, another backbone's (same architecture, same
        frozen weights: the caller checks), so that one trunk pass feeds several tasks' side networks
        (:meth:`forward_tasks`, ``e3va.multitask``). ``self.trunk`` becomes a module that holds ``trunk``'s
        patch embedding and stages (the same modules) and this backbone's own output norms (which train with
        the side network), so parameter names stay as they were; the side network's hooks move onto the
        shared blocks, and the former trunk is dropped."""
        if self.trunk_needs_autograd or (self.method.attach is not None and self._side is None):
            raise ValueError(f"tuning={self.method.name!r} changes the trunk itself; only methods that leave it "
                             "unchanged (e3va*, losa, fixed) can share it.")
        shared = nn.Module.__new__(type(trunk))
        shared.__dict__.update(trunk.__dict__)  # plain attributes (num_features, ...), then fresh registries
        shared._parameters, shared._buffers = dict(trunk._parameters), dict(trunk._buffers)
        shared._modules = dict(trunk._modules)
        shared._forward_hooks, shared._forward_pre_hooks = type(trunk._forward_hooks)(), type(trunk._forward_pre_hooks)()
        for name in self._out_norm_names:
            shared._modules[name] = getattr(self.trunk, name)
        if self._side is not None:
            self._side.retap(self._trunk_layout(shared))
            self._taps = self._side.taps
        self.trunk = shared

    def give_features(self, x: torch.Tensor, features: Optional[Dict[str, torch.Tensor]]) -> None:
        """Makes the next call of this backbone on ``x`` return ``features``, computed for it by a shared pass
        (:meth:`forward_tasks`), so that a task's own model (its FPN, heads and post-processing) runs
        unchanged on them; any other input is an error. ``features=None`` withdraws them."""
        self._features_given = None if features is None else (x, features)

    @property
    def size_divisibility(self) -> int:
        return 32

    def _side_merge(self, stage: int, merging: nn.Module, H: int, W: int) -> Tuple[Callable, List[nn.Parameter]]:
        """The patch merging the side state crosses after ``stage`` (bound to the grid now: backward runs it
        later), and its trainable parameters."""
        if self.side_merging is None:
            return functools.partial(merging, H=H, W=W), []
        trained = self.side_merging[stage]
        return functools.partial(trained, merging, H=H, W=W), list(trained.parameters())

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        given = self._features_given
        if given is not None:
            self._features_given = None
            if x.shape != given[0].shape or not torch.equal(x, given[0]):
                raise RuntimeError("This backbone was given the features of another input (give_features).")
            return given[1]
        return self.forward_tasks(x, [self])[0]

    def forward_tasks(self, x: torch.Tensor, tasks: Sequence["E3VASwin"]) -> List[Dict[str, torch.Tensor]]:
        """One pass of this backbone's trunk with the side network of every backbone in ``tasks`` beside it
        (each holding this trunk, see :meth:`share_trunk`): each task's outputs, as its own ``forward``
        gives them. ``forward(x)`` is ``forward_tasks(x, [self])[0]``."""
        self._check_image(x)
        for task in tasks:
            if task.trunk.layers is not self.trunk.layers:
                raise ValueError("forward_tasks: every task's backbone must hold this trunk's stages (share_trunk).")
        trunk = self.trunk
        trunk_pass = self._trunk_pass(x)
        with trunk_pass():
            tokens = trunk.patch_embed(x)
            Wh, Ww = tokens.shape[2], tokens.shape[3]
            tokens = trunk.pos_drop(tokens.flatten(2).transpose(1, 2))

        wanted = [{int(f[1:]) for f in task._out_features} for task in tasks]
        last = max(max(stages) for stages in wanted)
        outputs: List[Dict[str, torch.Tensor]] = [{} for _ in tasks]
        carried: List[Optional[torch.Tensor]] = [None] * len(tasks)  # each side network's state entering the stage
        for i, stage in enumerate(trunk.layers[: last + 1]):
            with trunk_pass(), contextlib.ExitStack() as side_stages:
                for task, state in zip(tasks, carried):
                    side_stages.enter_context(task._side_stage(state))
                x_out, H, W, tokens, Wh, Ww = stage(tokens, Wh, Ww)
            x_out = x_out.float()
            for t, task in enumerate(tasks):
                y, packed, carried[t] = task._stage_end(i, stage, x_out, tokens, H, W, crossing=i < max(wanted[t]))
                if i in wanted[t]:
                    norm = task.out_norm(i)
                    out = self._recomputed(norm, y, packed, [p for p in norm.parameters() if p.requires_grad])
                    outputs[t][f"p{i}"] = out.view(-1, H, W, out.shape[-1]).permute(0, 3, 1, 2).contiguous()
        return outputs

    def _stage_end(self, i: int, stage: nn.Module, x_out: torch.Tensor, tokens: torch.Tensor, H: int, W: int,
                   crossing: bool) -> Tuple[torch.Tensor, Optional[Packed], Optional[torch.Tensor]]:
        """After stage ``i``: the adapted output ``y = x_out + d_end``, ``y`` packed for backward (once for
        the patch merging's and the output norm's backward; None when not kept), and the side state entering
        the next stage (through patch merging when ``crossing``; ``tokens`` is the trunk's merged output)."""
        if self._taps is None:
            return x_out, None, None
        side = self._taps.end()
        y = x_out + side
        packed = self._pack_adapted_output(y)
        if stage.downsample is None or not crossing:
            return y, packed, None
        # The trunk's patch merging (frozen), with autograd for the side network's share of its input only;
        # or the side network's trainable version of it.
        frozen = not any(p.requires_grad for p in stage.downsample.parameters())
        merge, params = self._side_merge(i, stage.downsample, H, W)
        if self.highway_downsample == "direct":
            keep = self._pack_adapted_output(side) if frozen else None
            return y, packed, self._recomputed(merge, side, keep, params)
        return y, packed, self._recomputed(merge, y, packed if frozen else None, params) - tokens
