"""Per-parameter learning rates for Detectron2's ``get_default_optimizer_params(lr_factor_func=...)``."""
from __future__ import annotations

__all__ = ["BackboneLRFactor"]


class BackboneLRFactor:
    """``lr_factor_func`` that scales the learning rate of the parameters under ``prefix`` (the tuned
    backbone: trunk and side network) by ``factor`` and leaves the rest (FPN, heads) at the base rate.

    Lets every method share the heads' learning rate while its own trainable backbone parameters get the
    rate chosen for it (tools/transfer_study.py's sweep): in a config,
    ``optimizer.params.lr_factor_func = L(BackboneLRFactor)(factor=0.1)``.
    """

    def __init__(self, factor: float = 1.0, prefix: str = "backbone.bottom_up.") -> None:
        if not factor > 0:
            raise ValueError(f"factor must be a positive number, got {factor!r}.")
        self.factor = float(factor)
        self.prefix = prefix

    def __call__(self, name: str) -> float:
        return self.factor if name.startswith(self.prefix) else 1.0

    def __repr__(self) -> str:
        return f"BackboneLRFactor(factor={self.factor}, prefix={self.prefix!r})"
