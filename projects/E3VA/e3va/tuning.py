"""Tuning methods: which parts of a backbone's trunk train, and what runs beside the trunk.

A method is a small frozen config, in the spirit of PEFT's tuner configs; the backbones (``E3VASwin``,
``E3VAViT``) read it. Select one with a single override, e.g. ``model.backbone.bottom_up.tuning=e3va_plus``
(Swin + FPN configs) or ``model.backbone.net.tuning=losa`` (ViT + SimpleFeaturePyramid configs).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

from . import trunk_tuners

__all__ = [
    "ADAPTER_ARRANGEMENTS",
    "ADAPTER_INPUTS",
    "AdapterSpec",
    "LoSASpec",
    "TuningMethod",
    "TUNING_METHODS",
    "get_tuning_method",
    "register_tuning_method",
]


# What each highway adapter reads from its trunk block (projects/E3VA/README.md, "Taps"):
# "sublayer_output": the paper's (Eq. 10-11), the attention's and the MLP's outputs, exactly what the block
#   adds to its residual stream (after stochastic depth, when the trunk has it);
# "sublayer_input": the block's input beside attention, the post-attention residual beside the MLP (what
#   files trained before the paper's taps were made with).
ADAPTER_INPUTS = ("sublayer_output", "sublayer_input")
# "parallel" (the paper's): both adapters read the trunk. "stacked" (the paper's ablation): the adapter
# beside the MLP reads its tap plus what the adapter beside attention added in the same block.
ADAPTER_ARRANGEMENTS = ("parallel", "stacked")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``; else a ValueError naming it and the accepted ones."""
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; expected one of {list(choices)}.")
    return value


@dataclass(frozen=True)
class AdapterSpec:
    """Shape of every highway adapter: bottleneck width = ``bottleneck_ratio`` x the stage's width.

    ``train_down_input_factors=False`` keeps the down projection's input-side factors ``V1, V2`` at
    their random initialisation (as LoRA-FA freezes LoRA's ``A``): the adapter then needs only the
    rank-``2r`` projection of its input for backward, not the input itself. ``adapter_input`` and
    ``arrangement`` say what the adapters read (``ADAPTER_INPUTS``, ``ADAPTER_ARRANGEMENTS``).
    """

    rank: int
    bottleneck_ratio: float = 0.5
    activation: str = "gelu"
    train_down_input_factors: bool = True
    adapter_input: str = "sublayer_output"
    arrangement: str = "parallel"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"Adapter rank must be a positive integer, got {self.rank!r}.")
        if not self.bottleneck_ratio > 0:
            raise ValueError(f"bottleneck_ratio must be > 0, got {self.bottleneck_ratio!r}.")
        check_choice("adapter_input", self.adapter_input, ADAPTER_INPUTS)
        check_choice("adapter arrangement", self.arrangement, ADAPTER_ARRANGEMENTS)


@dataclass(frozen=True)
class LoSASpec:
    """Shape of every LoSA low-rank mixer: hidden width ``rank`` of its token- and channel-mixing MLPs."""

    rank: int
    activation: str = "gelu"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ValueError(f"LoSA rank must be a positive integer, got {self.rank!r}.")


# Predicates on a trunk parameter: ``(name, last_block)``, where ``name`` is as in the trunk's
# ``named_parameters()`` and ``last_block`` is the name prefix of the trunk's last block (e.g.
# "layers.3.blocks.1." on Swin, "blocks.11." on ViT-B).
TrunkPredicate = Callable[[str, str], bool]


def _no_trunk_parameter(name: str, last_block: str) -> bool:
    return False


def _every_trunk_parameter(name: str, last_block: str) -> bool:
    return True


@dataclass(frozen=True)
class TuningMethod:
    """What trains in the backbone.

    Attributes:
        name: the name used in configs.
        highway: the adapters of the E3VA highway, or None for no highway.
        losa: the low-rank mixers of a LoSA side network (``e3va.losa``), or None for none.
        trunk_trainable: ``(name, last_block) -> bool`` on a trunk parameter (its name as in the trunk's
            ``named_parameters``, output norms aside; ``last_block`` is the name prefix of the trunk's last
            block); the trunk runs under autograd only if it selects some parameter.
        train_out_norms: whether the norms between the backbone and the FPN train.
        inject: adds the method's modules to the trunk in place (baselines that live inside it), called
            as ``inject(trunk, blocks)`` (``blocks``: the trunk's blocks in order), or
            ``inject(trunk, blocks, rank=r)`` when ``accepts_rank`` and a rank is given.
    """

    name: str
    highway: Optional[AdapterSpec] = None
    losa: Optional[LoSASpec] = None
    trunk_trainable: TrunkPredicate = _no_trunk_parameter
    train_out_norms: bool = False
    inject: Optional[Callable[..., None]] = None
    accepts_rank: bool = False


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


def _is_bias(name: str, last_block: str) -> bool:
    # BitFit's "bias terms" include Swin's relative-position bias tables: with them, Swin-B has the
    # paper's 0.20 M BitFit parameters. ViTDet's decomposed relative positions (rel_pos_h/w) are the
    # plain ViT's counterpart.
    return name.endswith((".bias", "relative_position_bias_table", ".rel_pos_h", ".rel_pos_w"))


def _is_layer_norm(name: str, last_block: str) -> bool:
    return ".norm" in name or name.startswith("norm") or "patch_embed.norm" in name


def _in_last_block(name: str, last_block: str) -> bool:
    # On Swin the last block is the paper's Partial-1 (12.60 M parameters on Swin-B).
    return name.startswith(last_block)


def _named(*fragments: str) -> TrunkPredicate:
    return lambda name, last_block: any(f in name for f in fragments)


register_tuning_method(TuningMethod("full", trunk_trainable=_every_trunk_parameter, train_out_norms=True))
register_tuning_method(TuningMethod("fixed"))
register_tuning_method(TuningMethod("bitfit", trunk_trainable=_is_bias, train_out_norms=True))
register_tuning_method(TuningMethod("norm", trunk_trainable=_is_layer_norm, train_out_norms=True))
register_tuning_method(TuningMethod("partial1", trunk_trainable=_in_last_block, train_out_norms=True))
register_tuning_method(
    TuningMethod(
        "adapter",
        trunk_trainable=_named(".adapter."),
        train_out_norms=True,
        inject=trunk_tuners.insert_sequential_adapters,
    )
)
register_tuning_method(
    TuningMethod(
        "lora",
        trunk_trainable=_named("lora_"),
        train_out_norms=True,
        inject=trunk_tuners.insert_lora,
        accepts_rank=True,
    )
)
register_tuning_method(
    TuningMethod(
        "adaptformer",
        trunk_trainable=_named(".adaptformer."),
        train_out_norms=True,
        inject=trunk_tuners.insert_parallel_mlp_adapters,
    )
)
# Ranks 8/16/32 with a bottleneck of half the stage width reproduce the paper's trainable parameter
# counts on Swin-B exactly (1.20 M / 2.35 M / 4.66 M, output norms included): see projects/E3VA/README.md.
register_tuning_method(TuningMethod("e3va", highway=AdapterSpec(rank=8), train_out_norms=True))
register_tuning_method(TuningMethod("e3va_plus", highway=AdapterSpec(rank=16), train_out_norms=True))
register_tuning_method(TuningMethod("e3va_plusplus", highway=AdapterSpec(rank=32), train_out_norms=True))
# Beyond the paper: e3va with frozen random down-projection input factors, which keeps a rank-16 projection
# of each adapter's input for backward instead of the input (the activation memory of a frozen trunk's
# highway is mostly those inputs). It meets a frozen trunk's memory on Swin but, in the README's transfer
# study, loses E3VA's accuracy gain: an experiment, not a recommendation.
register_tuning_method(
    TuningMethod("e3va_fa", highway=AdapterSpec(rank=8, train_down_input_factors=False), train_out_norms=True)
)

# LoSA (Mercea et al., CVPR 2024): a side network of low-rank mixers beside the frozen trunk. Rank 45 gives
# 1.21 M trainable parameters on Swin-B (window 7, output norms included), e3va's budget (1.20 M).
register_tuning_method(TuningMethod("losa", losa=LoSASpec(rank=45), train_out_norms=True))
