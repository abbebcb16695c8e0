"""Counting trainable parameters, as parameter-efficient tuning reports them."""
from __future__ import annotations

import logging
from typing import List, Optional, Tuple

from torch import nn

__all__ = [
    "count_parameters",
    "format_trainable_parameters",
    "print_trainable_parameters",
    "trainable_parameter_names",
]


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """Returns ``(trainable, total)`` numbers of parameter elements; shared parameters count once."""
    trainable = total = 0
    for p in model.parameters():  # parameters() already skips repeats of shared tensors
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def trainable_parameter_names(model: nn.Module) -> List[str]:
    """Names of the parameters that require gradients, in ``named_parameters()`` order."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def format_trainable_parameters(model: nn.Module) -> str:
    """The line :func:`print_trainable_parameters` prints."""
    trainable, total = count_parameters(model)
    percent = 100.0 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {percent:.4f}"


def print_trainable_parameters(model: nn.Module, logger: Optional[logging.Logger] = None) -> str:
    """Prints (or logs, given ``logger``) the counts in PEFT's format and returns the line.

    Example: ``trainable params: 1,234 || all params: 56,789 || trainable%: 2.1730``.
    """
    line = format_trainable_parameters(model)
    if logger is None:
        print(line)
    else:
        logger.info(line)
    return line
