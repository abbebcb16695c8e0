"""The E3VA Swin bottom-up every model config starts from: Swin-T, e3va, window 7, drop-path 0.2.

Dataset configs change its size and weights; the tuning method is one override,
``model.backbone.bottom_up.tuning=...`` (see ``e3va.TUNING_METHODS``).
"""
from typing import Sequence

from detectron2.config import LazyCall as L

from e3va import E3VASwin


def e3va_swin(out_features: Sequence[str] = ("p0", "p1", "p2", "p3")):
    """A LazyConfig node for ``E3VASwin`` with the defaults above and the given output levels."""
    return L(E3VASwin)(size="T", tuning="e3va", window_size=7, drop_path_rate=0.2, out_features=tuple(out_features))
