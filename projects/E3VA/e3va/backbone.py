"""E3VA backbones: a frozen trunk and the side network that runs beside it, for Detectron2.

For block ``j`` of a stage, the trunk computes (unchanged, without autograd unless a method trains it)

    h_j = x_{j-1} + F1(x_{j-1})      F1 = W/SW-MSA(LN(.))      x_j = h_j + F2(h_j)      F2 = MLP(LN(.))

and the highway adds, with autograd (the paper's Eq. 10-11, ``adapter_input="sublayer_output"``),

    d_j = d_{j-1} + A_j(F1(x_{j-1})) + M_j(F2(h_j))

where ``A_j`` and ``M_j`` are the adapters beside attention and beside the MLP (``"sublayer_input"``:
``A_j(x_{j-1}) + M_j(h_j)``). A stage's output is ``norm(x_end + d_end)`` (to the FPN); at a Swin stage
end the highway crosses the trunk's own frozen patch merging, ``d_next = PM(x_end + d_end) - PM(x_end)``
(``highway_downsample="difference"``) or ``PM(d_end)`` (``"direct"``). At initialisation every adapter
outputs zero, so with "difference" ``d = 0`` everywhere and the backbone returns the trunk's features.
See projects/E3VA/README.md.

The highway is one kind of side network; ``tuning="losa"`` runs another, LoSA's low-rank mixers
(``e3va.losa``), through the same interface (:class:`_SideTaps`): it is fed by hooks on the trunk's
blocks and added to the stage outputs.

:class:`SideTunedBackbone` holds what every trunk shares (the tuning method, the frozen parameters, the
side network's hooks, the no-grad and low-precision trunk pass); :class:`E3VASwin` is the Swin backbone,
``e3va.vit.E3VAViT`` the plain-ViT one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from detectron2.modeling.backbone import Backbone
from torch import nn

from .adapters import CompactInput, HighwayAdapter, Packed, RecomputedFromCompactInput
from .losa import LoSASideNetwork
from .swin import build_swin_trunk
from .tuning import AdapterSpec, TuningMethod, check_choice, get_tuning_method

__all__ = [
    "HIGHWAY_DOWNSAMPLES",
    "LEGACY_SIDE_NETWORK",
    "AdapterHighway",
    "E3VASwin",
    "SideTunedBackbone",
    "TRUNK_DTYPES",
    "backbone_config_key",
    "find_tuned_backbone",
]

TRUNK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# How the side state crosses the trunk's frozen patch merging ``PM`` at a Swin stage end (the paper says
# only that PM is "inserted into the pathway"; projects/E3VA/README.md, "Stage crossing"):
# "difference": d <- PM(x + d) - PM(x), the change PM makes to the trunk's next input; 0 when d = 0;
# "direct":     d <- PM(d), PM applied to the side state alone; PM's LayerNorm makes PM(0) = W beta != 0.
HIGHWAY_DOWNSAMPLES = ("difference", "direct")
# What a file trained before these options existed was made with (a file without the record).
LEGACY_SIDE_NETWORK = {"adapter_input": "sublayer_input", "highway_downsample": "difference"}

# (block, block output) -> (H, W), the token grid of a block's output, for LoSA's window partition.
GridOf = Callable[[nn.Module, torch.Tensor], Tuple[int, int]]


class AdapterHighway(nn.Module):
    """The trainable E3VA highway: two parallel adapters per trunk block, grouped by stage."""

    def __init__(
        self,
        stage_dims: Sequence[int],
        depths: Sequence[int],
        spec: AdapterSpec,
        *,
        fused: bool = True,
        saved_input_dtype: str = "bfloat16",
    ) -> None:
        super().__init__()
        self.spec = spec
        self.beside_attn = nn.ModuleList()
        self.beside_mlp = nn.ModuleList()
        for dim, depth in zip(stage_dims, depths):
            bottleneck = max(1, int(round(dim * spec.bottleneck_ratio)))
            make = lambda: HighwayAdapter(  # noqa: E731
                dim, bottleneck, spec.rank, spec.activation, fused=fused, saved_input_dtype=saved_input_dtype,
                train_down_input_factors=spec.train_down_input_factors,
            )
            self.beside_attn.append(nn.ModuleList([make() for _ in range(depth)]))
            self.beside_mlp.append(nn.ModuleList([make() for _ in range(depth)]))


class _SideTaps:
    """A side network run by hooks on the trunk while the trunk runs: the interface the backbones drive.

    For each stage the backbone runs the trunk's stage inside ``with taps.stage(carried):``, where
    ``carried`` is the side state entering the stage (None for zero), then reads ``taps.end()``, the side
    state at the stage's end: it is added to the stage's output (and on Swin crosses the trunk's frozen
    patch merging to become the next stage's ``carried``). The hooks run the side network with autograd
    on, in fp32, inside the trunk's no-grad (and possibly low-precision) pass.
    """

    def __init__(self) -> None:
        self.active = False

    def begin(self, carried: Optional[torch.Tensor]) -> None:
        raise NotImplementedError

    def end(self) -> torch.Tensor:
        raise NotImplementedError

    @contextlib.contextmanager
    def stage(self, carried: Optional[torch.Tensor]):
        """Hooks are live inside; the side state starts at ``carried``."""
        self.begin(carried)
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    @staticmethod
    @contextlib.contextmanager
    def side_mode(x: torch.Tensor):
        """Autograd on and autocast off: the side network stays fp32 even when the trunk is not.

        Under ``torch.inference_mode()`` autograd stays off: no backward can follow, and autograd may not
        save the trunk's inference tensors."""
        grad = contextlib.nullcontext() if torch.is_inference_mode_enabled() else torch.enable_grad()
        with grad, torch.autocast(x.device.type, enabled=False):
            yield


class _HighwayTaps(_SideTaps):
    """Feeds the trunk's activations to the highway's adapters while the trunk runs.

    With ``adapter_input="sublayer_output"`` (the paper's), the adapter beside attention reads the
    attention's output ``F1(x_{j-1})`` and the one beside the MLP the MLP's output ``F2(h_j)``, in token
    layout: the two values the block adds to its residual stream. Both pass through the block's
    ``drop_path`` module (identity without stochastic depth), in that order, so a forward hook on it
    reads them exactly as the block adds them, whatever the attention's windowing and padding. With
    ``"sublayer_input"``, pre-hooks on the block and on its ``norm2`` read ``x_{j-1}`` and ``h_j``.
    The trunk's code and parameters stay exactly as released. Each adapter runs at once (with autograd
    on, inside the trunk's no-grad pass), so the activation can be freed as the trunk moves on and only
    what the adapter saves for backward stays alive. Parallel adapters (the paper's) are summed, and the
    state entering the stage is added at the end, ``d_end = d_start + sum``; stacked ones feed the adapter
    beside the MLP its tap plus the output of the adapter beside attention of the same block.
    """

    def __init__(self, blocks_by_stage: Sequence[Sequence[nn.Module]], highway: AdapterHighway) -> None:
        super().__init__()
        self.total: Optional[torch.Tensor] = None
        self._total_is_ours = False  # True once `total` is a buffer of this class's own, safe to add to in place
        self.carried: Optional[torch.Tensor] = None
        self.stacked = highway.spec.arrangement == "stacked"
        self._attn_out: Optional[torch.Tensor] = None  # stacked only: the block's attention-side adapter output
        for blocks, attn_adapters, mlp_adapters in zip(blocks_by_stage, highway.beside_attn, highway.beside_mlp):
            for block, beside_attn, beside_mlp in zip(blocks, attn_adapters, mlp_adapters):
                if highway.spec.adapter_input == "sublayer_input":
                    block.register_forward_pre_hook(self._feed_input(beside_attn, first=True))
                    block.norm2.register_forward_pre_hook(self._feed_input(beside_mlp, first=False))
                else:
                    calls = [0]  # how many sub-layer outputs of this block have passed, this forward
                    block.register_forward_pre_hook(lambda module, args, calls=calls: calls.__setitem__(0, 0))
                    block.drop_path.register_forward_hook(self._feed_output(beside_attn, beside_mlp, calls))

    def _feed_input(self, adapter: nn.Module, first: bool):
        def hook(module: nn.Module, args) -> None:
            if self.active:
                self._run(adapter, args[0], first)

        return hook

    def _feed_output(self, beside_attn: nn.Module, beside_mlp: nn.Module, calls: list):
        def hook(module: nn.Module, args, output: torch.Tensor) -> None:
            if not self.active:
                return
            if calls[0] > 1:
                raise RuntimeError(
                    "A trunk block called its drop_path more than twice in one forward; the sub-layer-output "
                    "taps expect Detectron2's Swin/ViT blocks (attention, then MLP). Use adapter_input="
                    "'sublayer_input' for this trunk."
                )
            first = calls[0] == 0
            calls[0] += 1
            self._run(beside_attn if first else beside_mlp, output, first)

        return hook

    def _run(self, adapter: nn.Module, tap: torch.Tensor, first: bool) -> None:
        with self.side_mode(tap):
            x = tap.float()
            if self.stacked and not first and self._attn_out is not None:
                x = x + self._attn_out
            out = adapter(x)
            if self.stacked:
                self._attn_out = out if first else None
            self._accumulate(out)

    def _accumulate(self, out: torch.Tensor) -> None:
        # In place after the first addition: a sum keeps nothing for backward, and this saves an N x C
        # buffer per adapter (fresh kernel pages each time under a low mmap threshold). The first
        # adapter's output is not added to in place: autograd forbids it for a custom function's output.
        if self.total is None:
            self.total = out
        elif self._total_is_ours:
            self.total.add_(out)
        else:
            self.total, self._total_is_ours = self.total + out, True

    def begin(self, carried: Optional[torch.Tensor]) -> None:
        self.carried, self.total, self._total_is_ours, self._attn_out = carried, None, False, None

    def end(self) -> torch.Tensor:
        delta = self.total if self.carried is None else self.carried + self.total
        self.carried = self.total = None
        return delta


class _LoSATaps(_SideTaps):
    """Runs LoSA's side network: a forward hook on each block reads its output ``b_l`` and refines the
    state, ``a_l = a_{l-1} + g_l(b_l + a_{l-1})``, while the trunk moves on (``e3va.losa``)."""

    def __init__(
        self, blocks_by_stage: Sequence[Sequence[nn.Module]], side: LoSASideNetwork, grid_of: GridOf
    ) -> None:
        super().__init__()
        self.side = side
        self.grid_of = grid_of
        self.state: Optional[torch.Tensor] = None
        for blocks, mixers in zip(blocks_by_stage, side.mixers):
            for block, mixer in zip(blocks, mixers):
                block.register_forward_hook(self._refine(mixer))

    def _refine(self, mixer: nn.Module):
        def hook(block: nn.Module, args, output: torch.Tensor) -> None:
            if self.active:
                with self.side_mode(output):
                    H, W = self.grid_of(block, output)
                    self.state = self.side.refine(mixer, output.float(), self.state, H, W)

        return hook

    def begin(self, carried: Optional[torch.Tensor]) -> None:
        self.state = carried

    def end(self) -> torch.Tensor:
        state, self.state = self.state, None
        return state


class SideTunedBackbone(Backbone):
    """What every E3VA backbone shares: a trunk (``self.trunk``), a tuning method (``e3va.tuning``) that
    says which of its parameters train and what runs beside it, and the side network's hooks.

    A subclass builds its trunk, calls :meth:`_attach_tuning`, and in ``forward`` runs the trunk inside
    the contexts made by :meth:`_trunk_pass` (no autograd when nothing in the trunk trains; autocast for a
    low-precision trunk) and each stage inside ``self._side_stage(carried)``.
    """

    trunk: nn.Module

    def _attach_tuning(
        self,
        *,
        tuning: str,
        blocks_by_stage: Sequence[Sequence[nn.Module]],
        stage_dims: Sequence[int],
        window_size: int,
        grid_of: GridOf,
        out_norm_names: Sequence[str] = (),
        rank: Optional[int] = None,
        bottleneck_ratio: Optional[float] = None,
        activation: Optional[str] = None,
        adapter_input: Optional[str] = None,
        adapter_arrangement: Optional[str] = None,
        highway_downsample: Optional[str] = None,
        stage_crossing: bool = False,
        fused_adapters: bool = True,
        saved_input_dtype: str = "bfloat16",
        trunk_dtype: str = "float32",
        compile_trunk: Union[bool, str] = False,
    ) -> None:
        """Applies the method ``tuning`` to ``self.trunk`` (whose blocks, by stage, are ``blocks_by_stage``).

        ``out_norm_names`` name the trunk's norms between the backbone and the FPN (they train with every
        method that has ``train_out_norms``); ``window_size`` and ``grid_of`` say how LoSA partitions a
        block's output into windows; ``stage_crossing`` says whether the trunk has patch merging between
        stages (which ``highway_downsample`` is about). The other arguments are the backbones' own (see
        ``E3VASwin``).
        """
        if trunk_dtype not in TRUNK_DTYPES:
            raise ValueError(f"Unknown trunk_dtype {trunk_dtype!r}; expected one of {sorted(TRUNK_DTYPES)}.")
        self.trunk_dtype = TRUNK_DTYPES[trunk_dtype]
        self.method: TuningMethod = get_tuning_method(tuning)
        self._out_norm_names = list(out_norm_names)
        depths = [len(blocks) for blocks in blocks_by_stage]
        module_names = {id(m): name for name, m in self.trunk.named_modules()}
        self._last_block = module_names[id(blocks_by_stage[-1][-1])] + "."

        spec = self.method.highway
        losa_spec = self.method.losa
        overrides = {k: v for k, v in dict(rank=rank, bottleneck_ratio=bottleneck_ratio, activation=activation,
                                           adapter_input=adapter_input,
                                           arrangement=adapter_arrangement).items() if v is not None}
        blocks = [block for stage in blocks_by_stage for block in stage]
        if (spec is not None or losa_spec is not None) and stage_crossing:
            self.highway_downsample = check_choice("highway_downsample", highway_downsample or "difference",
                                                   HIGHWAY_DOWNSAMPLES)
        elif highway_downsample is not None:
            raise ValueError(
                f"highway_downsample={highway_downsample!r} given, but "
                + (f"tuning={tuning!r} has no side network" if stage_crossing else
                   f"{type(self).__name__} has no patch merging for a side network to cross")
                + "; leave it unset."
            )
        else:
            self.highway_downsample = None
        if self.method.inject is not None:
            if self.method.accepts_rank and set(overrides) == {"rank"}:
                self.method.inject(self.trunk, blocks, rank=overrides.pop("rank"))
            else:
                self.method.inject(self.trunk, blocks)
        if overrides and losa_spec is not None:
            unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(losa_spec)})
            if unknown:
                raise ValueError(f"tuning={tuning!r} takes `rank` and `activation` only, not {unknown} "
                             f"(those are the E3VA highway's options).")
            losa_spec, overrides = dataclasses.replace(losa_spec, **overrides), {}
        if overrides:
            if spec is None:
                raise ValueError(
                    f"Adapter overrides {overrides} given, but tuning={tuning!r} has no highway adapters"
                    + (" (it takes `rank` only)." if self.method.accepts_rank else ".")
                )
            spec = AdapterSpec(**{**spec.__dict__, **overrides})
        self._fused = fused_adapters
        self._compact = CompactInput(saved_input_dtype)
        self.highway: Optional[AdapterHighway] = None
        self.losa: Optional[LoSASideNetwork] = None
        self._taps: Optional[_SideTaps] = None  # the side network's hooks on the trunk, if any
        if spec is not None:
            self.highway = AdapterHighway(
                stage_dims, depths, spec, fused=fused_adapters, saved_input_dtype=saved_input_dtype
            )
            self._taps = _HighwayTaps(blocks_by_stage, self.highway)
        elif losa_spec is not None:
            self.losa = LoSASideNetwork(
                stage_dims, depths, window_size, losa_spec.rank, losa_spec.activation,
                fused=fused_adapters, saved_input_dtype=saved_input_dtype,
            )
            self._taps = _LoSATaps(blocks_by_stage, self.losa, grid_of)
        self._freeze_trunk()
        self.compile_backend = self._compile_trunk_blocks(blocks, compile_trunk)

    def side_network_record(self) -> Dict[str, str]:
        """The side-network choices that change what trained weights mean, to store beside them:
        ``adapter_input`` (E3VA highways) and ``highway_downsample`` (side networks crossing patch
        merging); empty for methods without a side network."""
        record: Dict[str, str] = {}
        if self.highway is not None:
            record["adapter_input"] = self.highway.spec.adapter_input
            if self.highway.spec.arrangement != "parallel":
                record["arrangement"] = self.highway.spec.arrangement
        if self.highway_downsample is not None:
            record["highway_downsample"] = self.highway_downsample
        return record

    # ------------------------------------------------------------------ parameters
    def _is_out_norm(self, name: str) -> bool:
        return any(name.startswith(norm + ".") for norm in self._out_norm_names)

    def _freeze_trunk(self) -> None:
        for name, param in self.trunk.named_parameters():
            if self._is_out_norm(name):
                param.requires_grad_(self.method.train_out_norms)
            else:
                param.requires_grad_(self.method.trunk_trainable(name, self._last_block))

    def _compile_trunk_blocks(self, blocks: Sequence[nn.Module], compile_trunk: Union[bool, str]) -> Optional[str]:
        """Compiles, in place, the attention and the MLP of every trunk block with ``torch.compile``
        (``True``: the "inductor" backend; a string: that backend). Returns the backend, None when off.

        Only these sub-layers: the side network's hooks sit on each block and its ``norm2`` and must run
        eagerly, with autograd, between them. In-place compilation keeps the parameter names, so
        checkpoints load either way. For a frozen trunk only, which runs without autograd.
        """
        if compile_trunk is False:
            return None
        backend = "inductor" if compile_trunk is True else compile_trunk
        valid = torch._dynamo.list_backends(exclude_tags=())
        if not isinstance(backend, str) or backend not in valid:
            raise ValueError(f"compile_trunk={compile_trunk!r}: expected False, True or a torch.compile backend "
                             f"name, one of {valid}.")
        if self.trunk_needs_autograd:
            raise ValueError(f"compile_trunk is for a frozen trunk, but tuning={self.method.name!r} trains trunk "
                             "parameters; use a method that freezes the trunk (e.g. fixed, e3va, losa).")
        for block in blocks:
            for name in ("attn", "mlp"):
                getattr(block, name).compile(backend=backend)
        return backend

    @property
    def trunk_needs_autograd(self) -> bool:
        """True iff some trunk parameter (other than the output norms) trains."""
        return any(p.requires_grad for n, p in self.trunk.named_parameters() if not self._is_out_norm(n))

    # ------------------------------------------------------------------ forward helpers
    def _trunk_pass(self, x: torch.Tensor) -> Callable[[], contextlib.AbstractContextManager]:
        """A factory of the context the trunk runs in, for input ``x``: no autograd when nothing in it
        trains (none of its activations is kept), autocast when ``trunk_dtype`` is not fp32. Decided
        once per forward; each stage enters a fresh context from it."""
        needs_grad = self.trunk_needs_autograd
        low_precision = self.trunk_dtype is not torch.float32
        if low_precision and needs_grad:
            raise ValueError(
                f"trunk_dtype={self.trunk_dtype} is for a frozen trunk, but tuning={self.method.name!r} "
                "trains trunk parameters; use Detectron2's AMP (train.amp.enabled=True) instead."
            )
        if self.trunk_dtype is torch.float16 and x.device.type != "cuda":
            raise ValueError(f"trunk_dtype=float16 needs CUDA, but the input is on {x.device}; use bfloat16.")

        def enter() -> contextlib.ExitStack:
            stack = contextlib.ExitStack()
            stack.enter_context(torch.enable_grad() if needs_grad else torch.no_grad())
            if low_precision:
                stack.enter_context(torch.autocast(x.device.type, dtype=self.trunk_dtype))
            return stack

        return enter

    def _pack_adapted_output(self, y: torch.Tensor) -> Optional[Packed]:
        """A stage's adapted output ``y`` (trunk output plus side state) packed for backward, as
        ``saved_input_dtype`` says, once for every layer that reads it; None without a fused side network
        (those layers then keep what plain autograd keeps), and at inference (eval mode or autograd off:
        plain ops, which trace and export). Called outside the trunk's pass, so the grad mode is the caller's."""
        if self._fused and self.training and self._taps is not None and torch.is_grad_enabled() and y.requires_grad:
            return self._compact.pack(y)
        return None

    @staticmethod
    def _recomputed(
        fn: Callable[[torch.Tensor], torch.Tensor],
        y: torch.Tensor,
        packed: Optional[Packed],
        params: Sequence[nn.Parameter] = (),
    ) -> torch.Tensor:
        """``fn(y)``; given ``packed`` (from :meth:`_pack_adapted_output`), autograd keeps only it and runs
        ``fn`` again in backward. ``params`` are ``fn``'s trainable parameters."""
        if packed is None:
            return fn(y)
        return RecomputedFromCompactInput.apply(fn, packed, y, *params)

    def _side_stage(self, carried: Optional[torch.Tensor]):
        """The side network's hooks for one stage (a no-op context without a side network)."""
        return self._taps.stage(carried) if self._taps is not None else contextlib.nullcontext()

    def _check_image(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(
                f"{type(self).__name__} expects images of shape (N, 3, H, W), got {tuple(x.shape)}; "
                "convert grayscale or RGBA inputs to 3 channels."
            )


def find_tuned_backbone(model: nn.Module) -> Tuple[str, SideTunedBackbone]:
    """``(name, module)`` of the E3VA backbone in ``model`` (a detector, possibly DDP-wrapped), e.g.
    ``("backbone.bottom_up", E3VASwin(...))``; ValueError when there is none."""
    model = getattr(model, "module", model)
    for name, module in model.named_modules():
        if isinstance(module, SideTunedBackbone):
            return name, module
    raise ValueError(
        f"The model ({type(model).__name__}) has no E3VA backbone (e3va.E3VASwin or e3va.E3VAViT)."
    )


# Where a LazyConfig detector holds its trunk: FPN's ``bottom_up`` (Swin configs) or
# SimpleFeaturePyramid's ``net`` (ViTDet-style configs).
_BACKBONE_CONFIG_KEYS = ("model.backbone.bottom_up", "model.backbone.net")


def backbone_config_key(cfg: Any) -> str:
    """The dotted key of the E3VA backbone in a LazyConfig, e.g. ``"model.backbone.bottom_up"``, so that
    ``f"{key}.tuning=lora"`` selects a method on any config; ValueError naming the keys looked at."""
    for key in _BACKBONE_CONFIG_KEYS:
        node = cfg
        for part in key.split("."):
            node = node.get(part) if hasattr(node, "get") else None
            if node is None:
                break
        if node is not None and "tuning" in node:
            return key
    raise ValueError(
        f"The config has no E3VA backbone at {' or '.join(_BACKBONE_CONFIG_KEYS)} (a node with a `tuning` "
        "argument, e.g. e3va.E3VASwin or e3va.E3VAViT; see configs/common/models/)."
    )


class E3VASwin(SideTunedBackbone):
    """Swin backbone for Detectron2 tuned with a method of ``e3va.tuning`` (E3VA by default).

    Outputs ``p0..p3`` (strides 4..32), to be fed to Detectron2's ``FPN``.

    Args:
        size: Swin preset, one of ``e3va.swin.SWIN_PRESETS`` (T, S, B, L, nano).
        tuning: tuning method name, one of ``e3va.tuning.TUNING_METHODS``.
        window_size: 7 or 12, as the pretrained checkpoint.
        drop_path_rate: stochastic depth of the trunk.
        out_features: which of ``p0..p3`` to return.
        rank, bottleneck_ratio, activation: override the method's adapter shape (``rank`` also sets
            LoRA's rank, and LoSA's mixer rank; LoSA takes ``rank`` and ``activation``).
        adapter_input: what E3VA's adapters read, one of ``e3va.tuning.ADAPTER_INPUTS``: the sub-layer
            outputs (the paper's, the presets' default) or inputs (files trained before 2026-12).
        adapter_arrangement: "parallel" (the paper's, default) or "stacked" (an ablation).
        highway_downsample: how a side network crosses the frozen patch merging, one of
            ``HIGHWAY_DOWNSAMPLES`` (default "difference").
        fused_adapters: run adapters (or LoSA's mixers), and the patch merging the side network crosses,
            through memory-lean autograd functions that store only their input and recompute the rest in
            backward (same outputs and gradients as the plain graph, see ``e3va.adapters`` and
            ``e3va.losa``); False for the plain graph.
        saved_input_dtype: how those functions, and the trainable norms before the FPN, store their input
            for backward: "bfloat16", "float32" or "float8_e4m3fn" (a quarter of fp32, scaled per token;
            see ``e3va.adapters.CompactInput``).
        trunk_dtype: "bfloat16" (or "float16", CUDA only) runs a frozen trunk under autocast; it needs no
            fp32 autograd. The highway, the output norms and the patch merging it crosses stay fp32.
        compile_trunk: True compiles a frozen trunk's attention and MLP layers with ``torch.compile``
            (or a backend name, e.g. "inductor"); the first step pays the compilation.
    """

    def __init__(
        self,
        size: str = "T",
        *,
        tuning: str = "e3va",
        window_size: int = 7,
        drop_path_rate: float = 0.2,
        out_features: Sequence[str] = ("p0", "p1", "p2", "p3"),
        rank: Optional[int] = None,
        bottleneck_ratio: Optional[float] = None,
        activation: Optional[str] = None,
        adapter_input: Optional[str] = None,
        adapter_arrangement: Optional[str] = None,
        highway_downsample: Optional[str] = None,
        fused_adapters: bool = True,
        saved_input_dtype: str = "bfloat16",
        trunk_dtype: str = "float32",
        compile_trunk: Union[bool, str] = False,
    ) -> None:
        super().__init__()
        valid = ("p0", "p1", "p2", "p3")
        bad = [f for f in out_features if f not in valid]
        if bad or not out_features:
            raise ValueError(f"Bad out_features {list(out_features)!r}; choose among {list(valid)}.")
        self._out_features = list(out_features)

        self.trunk = build_swin_trunk(size, window_size=window_size, drop_path_rate=drop_path_rate)
        stage_dims = list(self.trunk.num_features)
        self._attach_tuning(
            tuning=tuning,
            blocks_by_stage=[list(stage.blocks) for stage in self.trunk.layers],
            stage_dims=stage_dims,
            window_size=window_size,
            grid_of=lambda block, output: (block.H, block.W),  # Swin blocks hold flat (B, H*W, C) tokens
            out_norm_names=[f"norm{i}" for i in range(4)],
            rank=rank,
            bottleneck_ratio=bottleneck_ratio,
            activation=activation,
            adapter_input=adapter_input,
            adapter_arrangement=adapter_arrangement,
            highway_downsample=highway_downsample,
            stage_crossing=True,
            fused_adapters=fused_adapters,
            saved_input_dtype=saved_input_dtype,
            trunk_dtype=trunk_dtype,
            compile_trunk=compile_trunk,
        )
        self._out_feature_channels = {f"p{i}": stage_dims[i] for i in range(4)}
        self._out_feature_strides = {f"p{i}": 2 ** (i + 2) for i in range(4)}

    def out_norm(self, stage: int) -> nn.Module:
        """The norm between stage ``stage`` and the FPN (the trunk's ``norm{stage}``, untrained by ImageNet)."""
        return getattr(self.trunk, f"norm{stage}")

    @property
    def size_divisibility(self) -> int:
        return 32

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        self._check_image(x)
        trunk = self.trunk
        trunk_pass = self._trunk_pass(x)
        with trunk_pass():
            tokens = trunk.patch_embed(x)
            Wh, Ww = tokens.shape[2], tokens.shape[3]
            tokens = trunk.pos_drop(tokens.flatten(2).transpose(1, 2))

        wanted = {int(f[1:]) for f in self._out_features}
        last = max(wanted)
        outputs: Dict[str, torch.Tensor] = {}
        carried: Optional[torch.Tensor] = None  # the side network's state entering the stage
        for i, stage in enumerate(trunk.layers[: last + 1]):
            with trunk_pass(), self._side_stage(carried):
                x_out, H, W, tokens, Wh, Ww = stage(tokens, Wh, Ww)
            y = x_out = x_out.float()
            packed = None  # y, kept once for the patch merging's and the output norm's backward
            if self._taps is not None:
                side = self._taps.end()
                y = x_out + side
                packed = self._pack_adapted_output(y)
                if stage.downsample is not None and i < last:
                    # Frozen patch merging, with autograd for the side network's share of its input only.
                    frozen = not any(p.requires_grad for p in stage.downsample.parameters())
                    merge = functools.partial(stage.downsample, H=H, W=W)  # bound now: backward runs it later
                    if self.highway_downsample == "direct":
                        carried = self._recomputed(merge, side, self._pack_adapted_output(side) if frozen else None)
                    else:
                        carried = self._recomputed(merge, y, packed if frozen else None) - tokens
            if i in wanted:
                norm = self.out_norm(i)
                out = self._recomputed(norm, y, packed, [p for p in norm.parameters() if p.requires_grad])
                outputs[f"p{i}"] = out.view(-1, H, W, out.shape[-1]).permute(0, 3, 1, 2).contiguous()
        return outputs
