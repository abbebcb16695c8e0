"""What a tuning method is, how it attaches to a trunk, and the registry that names them.

A method, in the spirit of PEFT's tuners, is a small frozen record (:class:`TuningMethod`): which trunk
parameters train, whether the norms before the FPN train, and one ``attach`` call that adds the method's
modules. The backbone (``e3va.backbone.SideTunedBackbone``) calls ``attach`` without knowing which kind of
method it is. A method that inserts modules *inside* the trunk (LoRA, adapters) does so there and returns
None; one that runs *beside* the trunk (E3VA's highway, LoSA) returns a :class:`SideNetwork`: its trainable
module and the hooks (:class:`SideTaps`) that feed it the trunk's activations while the trunk runs.

Adding a method: a new module in ``e3va/methods/`` that builds its :class:`TuningMethod`, registers it with
:func:`register_tuning_method`, and is imported by ``e3va/methods/__init__.py``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "METHOD_OPTIONS",
    "CROSSING_OPTIONS",
    "SIDE_NETWORK_OPTIONS",
    "TUNING_METHODS",
    "SideNetwork",
    "SideTaps",
    "TrunkLayout",
    "TuningMethod",
    "TuningOptions",
    "check_choice",
    "get_tuning_method",
    "register_tuning_method",
    "with_tuning_options",
]

ACTIVATIONS: Dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "identity": nn.Identity,
}


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``; else a ValueError naming it and the accepted ones."""
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {list(choices)}.")
    return value


@dataclass(frozen=True)
class TuningOptions:
    """The tuning options every backbone takes (``E3VASwin(..., rank=4)``, the override
    ``model.backbone.bottom_up.rank=4``, yacs ``MODEL.E3VA.RANK``), declared once here.

    None keeps the method's own value. ``rank``, ``bottleneck_ratio``, ``activation``, ``adapter_input`` and
    ``adapter_arrangement`` shape a method's modules; each method says which it takes
    (:attr:`TuningMethod.options`). The others apply to any method:

    Attributes:
        rank: low-rank width (E3VA's branches, LoRA's rank, LoSA's mixers).
        bottleneck_ratio, activation: E3VA's adapter shape (bottleneck = ratio x the stage's width).
        adapter_input: what E3VA's adapters read, "sublayer_output" (the paper's) or "sublayer_input".
        adapter_arrangement: "parallel" (the paper's) or "stacked" (an ablation).
        highway_downsample: how a side network crosses the trunk's frozen patch merging at a Swin stage end,
            "difference" (default) or "direct" (``e3va.backbone.HIGHWAY_DOWNSAMPLES``).
        highway_merging: the patch merging a side network crosses: "frozen", the trunk's own (the paper's,
            default), or "trainable", the trunk's plus a trained change that starts at zero (an ablation).
        train_out_norms: whether the norms between the backbone and the FPN train; None keeps the method's.
        fused_adapters: run the side network through memory-lean autograd functions (``e3va.side_memory``)
            that keep only their input; False for the plain graph (same outputs and gradients).
        saved_input_dtype: how those functions keep their input: "bfloat16", "float32" or "float8_e4m3fn".
        trunk_dtype: "bfloat16" (or "float16", CUDA only) runs a frozen trunk under autocast.
        compile_trunk: True (or a backend name) compiles a frozen trunk's attention and MLP layers.
    """

    rank: Optional[int] = None
    bottleneck_ratio: Optional[float] = None
    activation: Optional[str] = None
    adapter_input: Optional[str] = None
    adapter_arrangement: Optional[str] = None
    highway_downsample: Optional[str] = None
    highway_merging: Optional[str] = None
    train_out_norms: Optional[bool] = None
    fused_adapters: bool = True
    saved_input_dtype: str = "bfloat16"
    trunk_dtype: str = "float32"
    compile_trunk: Union[bool, str] = False

    def __post_init__(self) -> None:
        # bool is an int to Python: rank=True would silently be rank 1, fused_adapters="no" would be true.
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0):
            raise ValueError(f"rank must be a positive integer (or None for the method's own), got {self.rank!r}.")
        for name in ("fused_adapters", "train_out_norms"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (value is None and name == "train_out_norms"):
                raise ValueError(f"{name} must be True or False, got {value!r}.")

    @classmethod
    def from_kwargs(cls, owner: type, kwargs: Mapping[str, Any]) -> "TuningOptions":
        """The options in ``kwargs`` given to backbone class ``owner``; an unknown name is a TypeError that
        names it, the closest accepted names, and every parameter ``owner`` takes."""
        unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            accepted = list(inspect.signature(owner).parameters)
            close = sorted({m for name in unknown for m in difflib.get_close_matches(name, accepted, n=2)})
            raise TypeError(
                f"{owner.__name__} got unexpected keyword argument(s) {unknown}"
                + (f" (did you mean {', '.join(close)}?)" if close else "") + f"; it takes {', '.join(accepted)}."
            )
        return cls(**kwargs)

    def given(self, names: Sequence[str]) -> Dict[str, Any]:
        """Those of ``names`` set to something other than None."""
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def changed(self, names: Sequence[str]) -> Dict[str, Any]:
        """Those of ``names`` set to something other than their default."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return {n: getattr(self, n) for n in names if getattr(self, n) != defaults[n]}


# The options that shape a method's own modules; the rest of TuningOptions applies to every method.
METHOD_OPTIONS = ("rank", "bottleneck_ratio", "activation", "adapter_input", "adapter_arrangement")
# How a side network runs: meaningless without one, so a method without one refuses other values than the
# defaults instead of silently ignoring them (a trunk without patch merging refuses any CROSSING_OPTIONS value).
SIDE_NETWORK_OPTIONS = ("fused_adapters", "saved_input_dtype")
# How a side network crosses a Swin stage end: only a trunk with patch merging and a side network take them.
CROSSING_OPTIONS = ("highway_downsample", "highway_merging")


def with_tuning_options(takes_from: Optional[Callable[..., Any]] = None) -> Callable[[type], type]:
    """A class decorator for backbones whose ``__init__`` takes ``**kwargs``: their signature then lists
    ``takes_from``'s keyword-only parameters (e.g. the trunk builder's, passed through) and every
    :class:`TuningOptions` field, so that ``inspect.signature``, help() and the override checker
    (``e3va.overrides``) see the real names, each declared once where it belongs."""

    def decorate(cls: type) -> type:
        own = [p for p in inspect.signature(cls.__init__).parameters.values() if p.kind is not p.VAR_KEYWORD]
        passed = [p for p in inspect.signature(takes_from).parameters.values()
                  if p.kind is p.KEYWORD_ONLY] if takes_from is not None else []
        options = [
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
            for f in dataclasses.fields(TuningOptions)
        ]
        cls.__signature__ = inspect.Signature(own[1:] + passed + options)  # without self, as for a class
        return cls

    return decorate


@dataclass(frozen=True)
class TrunkLayout:
    """What a method needs to know of a trunk to attach to it.

    Attributes:
        trunk: the trunk module (Detectron2's SwinTransformer or ViT), modified in place by in-trunk methods.
        blocks_by_stage: its transformer blocks, by stage, in order.
        stage_dims: each stage's width.
        window_size: the attention window (LoSA mixes tokens within windows of this size).
        grid_of: ``(block, block output) -> (H, W)``, the token grid of a block's output.
        stage_crossing: whether the trunk has patch merging between stages.
    """

    trunk: nn.Module
    blocks_by_stage: Sequence[Sequence[nn.Module]]
    stage_dims: Sequence[int]
    window_size: int
    grid_of: Callable[[nn.Module, torch.Tensor], Tuple[int, int]]
    stage_crossing: bool = False

    @property
    def blocks(self) -> list:
        return [block for stage in self.blocks_by_stage for block in stage]

    @property
    def depths(self) -> list:
        return [len(blocks) for blocks in self.blocks_by_stage]


class SideTaps:
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


@dataclass
class SideNetwork:
    """What a side-network method attaches: its trainable ``module`` (registered on the backbone as
    ``name``, which fixes its state-dict keys, e.g. ``highway.*``), ``hook_on``, which hooks the module on a
    trunk and returns the taps that run it, and the choices that change what its weights mean (stored
    beside trained weights, checked when loading). ``taps`` are the module's taps on the trunk it was
    built for; :meth:`retap` moves them to another trunk of the same layout (e.g. one shared by tasks)."""

    name: str
    module: nn.Module
    hook_on: Callable[[TrunkLayout], SideTaps]
    record: Dict[str, str]
    layout: dataclasses.InitVar[TrunkLayout]
    taps: SideTaps = dataclasses.field(init=False)

    def __post_init__(self, layout: TrunkLayout) -> None:
        self.taps = self.hook_on(layout)

    def retap(self, layout: TrunkLayout) -> None:
        """Runs the module from ``layout``'s trunk from now on. The hooks on the former trunk stay there,
        idle (they fire only while their taps are active): drop that trunk."""
        self.taps = self.hook_on(layout)


# Predicates on a trunk parameter: ``(name, last_block)``, where ``name`` is as in the trunk's
# ``named_parameters()`` and ``last_block`` is the name prefix of the trunk's last block (e.g.
# "layers.3.blocks.1." on Swin, "blocks.11." on ViT-B).
TrunkPredicate = Callable[[str, str], bool]
Attach = Callable[[TrunkLayout, TuningOptions], Optional[SideNetwork]]


def _no_trunk_parameter(name: str, last_block: str) -> bool:
    return False


@dataclass(frozen=True)
class TuningMethod:
    """What trains in the backbone, and what the method adds to it.

    Attributes:
        name: the name used in configs.
        trunk_trainable: ``(name, last_block) -> bool`` on a trunk parameter (its name as in the trunk's
            ``named_parameters``, output norms aside); the trunk runs under autograd only if it selects
            some parameter.
        train_out_norms: whether the norms between the backbone and the FPN train.
        attach: ``attach(layout, options)`` adds the method's modules: inside the trunk (returns None) or
            beside it (returns a :class:`SideNetwork`). None for methods that only choose parameters.
        options: the :data:`METHOD_OPTIONS` it takes; giving another is an error.
        spec: the method's module shape (e.g. ``e3va.methods.e3va.AdapterSpec``), for reading; None if none.
    """

    name: str
    trunk_trainable: TrunkPredicate = _no_trunk_parameter
    train_out_norms: bool = False
    attach: Optional[Attach] = None
    options: Tuple[str, ...] = ()
    spec: Any = None

    def check_options(self, options: TuningOptions) -> None:
        """ValueError naming the method-shaping options given that this method does not take."""
        bad = options.given([n for n in METHOD_OPTIONS if n not in self.options])
        if bad:
            takes = (" and ".join(f"`{n}`" for n in self.options) + " only" if self.options
                     else "none of " + ", ".join(METHOD_OPTIONS))
            raise ValueError(f"tuning={self.name!r} takes {takes}; got {bad}.")


TUNING_METHODS: Dict[str, TuningMethod] = {}


def register_tuning_method(method: TuningMethod) -> TuningMethod:
    """Adds ``method`` to ``TUNING_METHODS``; a second method of the same name is an error."""
    if method.name in TUNING_METHODS:
        raise ValueError(f"Tuning method {method.name!r} is already registered.")
    TUNING_METHODS[method.name] = method
    return method


def get_tuning_method(name: str) -> TuningMethod:
    """Returns the registered method called ``name``; the error lists the valid names."""
    if name not in TUNING_METHODS:
        raise ValueError(f"Unknown tuning method {name!r}; expected one of {sorted(TUNING_METHODS)}.")
    return TUNING_METHODS[name]
