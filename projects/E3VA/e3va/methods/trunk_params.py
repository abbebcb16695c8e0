"""Methods that only choose which trunk parameters train: full, fixed, BitFit, norm, Partial-1."""
from __future__ import annotations

from .base import TuningMethod, register_tuning_method

__all__: list = []


def _every_trunk_parameter(name: str, last_block: str) -> bool:
    return True


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


register_tuning_method(TuningMethod("full", trunk_trainable=_every_trunk_parameter, train_out_norms=True))
register_tuning_method(TuningMethod("fixed"))
register_tuning_method(TuningMethod("bitfit", trunk_trainable=_is_bias, train_out_norms=True))
register_tuning_method(TuningMethod("norm", trunk_trainable=_is_layer_norm, train_out_norms=True))
register_tuning_method(TuningMethod("partial1", trunk_trainable=_in_last_block, train_out_norms=True))
