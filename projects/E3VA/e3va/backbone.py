"""What every E3VA backbone shares, whatever its trunk: :class:`SideTunedBackbone`.

A backbone (``e3va.swin.E3VASwin``, ``e3va.vit.E3VAViT``) builds its trunk, describes it
(``e3va.methods.TrunkLayout``) and hands it to the tuning method (``e3va.methods``), which says which trunk
parameters train and attaches its modules: inside the trunk, or beside it as a side network fed by hooks.
This class freezes the rest, runs the trunk without autograd when nothing in it trains (and in low
precision when asked), and drives the side network stage by stage. A stage's output is ``x_end + d_end``,
the trunk's plus the side state; at a Swin stage end the side state crosses the trunk's own frozen patch
merging (``highway_downsample``, see ``e3va.swin``).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from detectron2.modeling.backbone import Backbone
from torch import nn

from .methods import SIDE_NETWORK_OPTIONS, SideNetwork, SideTaps, TrunkLayout, TuningMethod, TuningOptions
from .methods import check_choice, get_tuning_method
from .side_memory import CompactInput, Packed, RecomputedFromCompactInput

__all__ = [
    "HIGHWAY_DOWNSAMPLES",
    "HIGHWAY_MERGINGS",
    "SideTunedBackbone",
    "TRUNK_DTYPES",
    "backbone_config_key",
    "find_tuned_backbone",
    "pick_preset",
]

TRUNK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# How the side state crosses the trunk's frozen patch merging ``PM`` at a Swin stage end (the paper says
# only that PM is "inserted into the pathway"; projects/E3VA/README.md, "Stage crossing"):
# "difference": d <- PM(x + d) - PM(x), the change PM makes to the trunk's next input; 0 when d = 0;
# "direct":     d <- PM(d), PM applied to the side state alone; PM's LayerNorm makes PM(0) = W beta != 0.
HIGHWAY_DOWNSAMPLES = ("difference", "direct")
# Which patch merging the side state crosses: the trunk's own, frozen (the paper's), or the trunk's plus a
# trained change that starts at zero ("trainable", the paper's ablation; e3va.swin.TrainableMerging).
HIGHWAY_MERGINGS = ("frozen", "trainable")


def pick_preset(presets: Mapping[str, Dict[str, Any]], size: str, architecture: str) -> Dict[str, Any]:
    """A copy of ``presets[size]``; the error names the ``architecture`` and the sizes it has."""
    if size not in presets:
        raise ValueError(f"Unknown {architecture} size {size!r}; expected one of {sorted(presets)}.")
    return dict(presets[size])


class SideTunedBackbone(Backbone):
    """What every E3VA backbone shares: a trunk (``self.trunk``), a tuning method (``e3va.methods``) that
    says which of its parameters train and what runs beside it, and the side network's hooks.

    A subclass builds its trunk, calls :meth:`_attach_tuning` with its :class:`TrunkLayout`, and in ``forward`` runs the trunk inside
    the contexts made by :meth:`_trunk_pass` (no autograd when nothing in the trunk trains; autocast for a
    low-precision trunk) and each stage inside ``self._side_stage(carried)``.
    """

    trunk: nn.Module

    def _attach_tuning(
        self, tuning: str, layout: TrunkLayout, options: TuningOptions, out_norm_names: Sequence[str] = ()
    ) -> None:
        """Applies the method ``tuning`` to ``self.trunk`` (described by ``layout``) with ``options``.

        ``out_norm_names`` name the trunk's norms between the backbone and the FPN (they train with every
        method that has ``train_out_norms``). The method attaches itself (``TuningMethod.attach``): inside the
        trunk, or beside it as a side network, registered here under the method's name for it (``highway``,
        ``losa``), which keeps its state-dict keys.
        """
        self.trunk_dtype = TRUNK_DTYPES[check_choice("trunk_dtype", options.trunk_dtype, list(TRUNK_DTYPES))]
        self.method: TuningMethod = get_tuning_method(tuning)
        self.method.check_options(options)
        self._out_norm_names = list(out_norm_names)
        module_names = {id(m): name for name, m in self.trunk.named_modules()}
        self._last_block = module_names[id(layout.blocks_by_stage[-1][-1])] + "."
        self._side: Optional[SideNetwork] = self.method.attach(layout, options) if self.method.attach else None
        if self._side is not None:
            self.add_module(self._side.name, self._side.module)
        elif options.changed(SIDE_NETWORK_OPTIONS):
            raise ValueError(
                f"{options.changed(SIDE_NETWORK_OPTIONS)} given, but tuning={tuning!r} has no side network for "
                f"them to apply to; leave {' and '.join(SIDE_NETWORK_OPTIONS)} at their defaults (or unset)."
            )
        self.highway_downsample = self._crossing("highway_downsample", options.highway_downsample,
                                                 HIGHWAY_DOWNSAMPLES, layout.stage_crossing)
        self.highway_merging = self._crossing("highway_merging", options.highway_merging, HIGHWAY_MERGINGS,
                                              layout.stage_crossing)
        self._train_out_norms = (self.method.train_out_norms if options.train_out_norms is None
                                 else bool(options.train_out_norms))
        self._fused = options.fused_adapters
        self._compact = CompactInput(options.saved_input_dtype)
        self._taps: Optional[SideTaps] = self._side.taps if self._side is not None else None
        self._freeze_trunk()
        self.compile_backend = self._compile_trunk_blocks(layout.blocks, options.compile_trunk)

    def _crossing(self, name: str, choice: Optional[str], choices: Sequence[str], stage_crossing: bool) -> Optional[str]:
        """An option of how the side network crosses patch merging: ``choice`` (default the first of
        ``choices``) for a side network on a trunk with patch merging; None otherwise, where giving one is
        an error."""
        if self._side is not None and stage_crossing:
            return check_choice(name, choice or choices[0], choices)
        if choice is not None:
            raise ValueError(
                f"{name}={choice!r} given, but "
                + (f"tuning={self.method.name!r} has no side network" if stage_crossing else
                   f"{type(self).__name__} has no patch merging for a side network to cross")
                + "; leave it unset."
            )
        return None

    @property
    def side_network(self) -> Optional[nn.Module]:
        """The trainable side network beside the trunk (E3VA's highway, LoSA's mixers), or None."""
        return self._side.module if self._side is not None else None

    def side_network_record(self) -> Dict[str, str]:
        """The side-network choices that change what trained weights mean, to store beside them: the
        method's own (e.g. E3VA's ``adapter_input``), ``highway_downsample`` and ``highway_merging`` (side
        networks crossing patch merging); empty for methods without a side network."""
        record = dict(self._side.record) if self._side is not None else {}
        if self.highway_downsample is not None:
            record["highway_downsample"] = self.highway_downsample
        if self.highway_merging not in (None, "frozen"):  # "frozen" is not recorded: all older files knew
            record["highway_merging"] = self.highway_merging
        return record

    # ------------------------------------------------------------------ parameters
    def _is_out_norm(self, name: str) -> bool:
        return any(name.startswith(norm + ".") for norm in self._out_norm_names)

    def _freeze_trunk(self) -> None:
        for name, param in self.trunk.named_parameters():
            if self._is_out_norm(name):
                param.requires_grad_(self._train_out_norms)
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
