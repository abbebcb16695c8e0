"""Loading pretrained Swin classification weights into an E3VA detector.

Detectron2's ``DetectionCheckpointer`` expects parameter names of the whole detector. Official Swin
releases (``{"model": state_dict}``, the Microsoft format) name the trunk's parameters only, so we
place them under the trunk's prefix and drop what a detector has no use for.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

__all__ = ["E3VACheckpointer", "align_with_wrapped_layers", "is_swin_classification_state_dict", "swin_classification_to_trunk"]

logger = logging.getLogger("e3va")

# The classification head and final norm have no counterpart in a detector; the index and mask
# buffers are recomputed by the trunk for its own window size.
_DROPPED_PREFIXES = ("head.", "norm.")
_DROPPED_SUFFIXES = ("relative_position_index", "attn_mask")


def is_swin_classification_state_dict(state_dict: Dict[str, torch.Tensor]) -> bool:
    """True for a state dict laid out as the official Swin release (trunk names at the top level)."""
    return "patch_embed.proj.weight" in state_dict and any(k.startswith("layers.0.blocks.0.") for k in state_dict)


def swin_classification_to_trunk(
    state_dict: Dict[str, torch.Tensor], prefix: str
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Renames an official Swin state dict's keys to ``prefix + key``; returns it and the dropped keys."""
    converted, dropped = {}, []
    for key, value in state_dict.items():
        if key.startswith(_DROPPED_PREFIXES) or key.endswith(_DROPPED_SUFFIXES):
            dropped.append(key)
        else:
            converted[prefix + key] = value
    return converted, dropped


def align_with_wrapped_layers(state_dict: Dict[str, torch.Tensor], model_keys) -> Dict[str, torch.Tensor]:
    """Renames ``a.b.weight`` to ``a.b.base_layer.weight`` where the model wraps layer ``a.b`` (PEFT's
    LoRA does), so one checkpoint loads into every tuning method."""
    model_keys = set(model_keys)
    aligned = {}
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        wrapped = f"{module}.base_layer.{leaf}"
        aligned[wrapped if key not in model_keys and wrapped in model_keys else key] = value
    return aligned


def _trunk_prefix(model: nn.Module) -> str:
    from .backbone import E3VASwin  # local: backbone imports Detectron2's modeling, heavier than needed here

    for name, module in model.named_modules():
        if isinstance(module, E3VASwin):
            return f"{name}.trunk." if name else "trunk."
    raise ValueError(
        f"This checkpoint holds Swin classification weights, but the model ({type(model).__name__}) "
        "has no E3VASwin backbone to put them in."
    )


class E3VACheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` that also reads official Swin classification checkpoints."""

    def _load_file(self, filename: str) -> dict:
        loaded = super()._load_file(filename)
        state_dict = loaded.get("model", {})
        if isinstance(state_dict, dict) and is_swin_classification_state_dict(state_dict):
            prefix = _trunk_prefix(self.model)
            loaded["model"], dropped = swin_classification_to_trunk(state_dict, prefix)
            logger.info(
                f"Read {filename} as Swin classification weights under '{prefix}'; "
                f"dropped {len(dropped)} keys with no detector counterpart (head, final norm, index buffers)."
            )
        return loaded

    def _load_model(self, checkpoint: dict):
        checkpoint["model"] = align_with_wrapped_layers(checkpoint["model"], self.model.state_dict().keys())
        return super()._load_model(checkpoint)
