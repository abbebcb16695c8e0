"""What one benchmark run shares (:class:`BenchmarkSettings`, the config it loads) and the shape of a
method's record (:data:`RECORD_FIELDS`, :func:`failed_record`)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from e3va import backbone_config_key

from ..overrides import apply_overrides

__all__ = ["BenchmarkSettings", "RECORD_FIELDS", "base_record", "failed_record", "load_benchmark_config", "record_ok"]

# Every record has these keys (None where a failed worker could not measure them).
RECORD_FIELDS = (
    "method",
    "status",
    "backbone_trainable_params",
    "head_trainable_params",
    "trainable_params",
    "total_params",
    "peak_memory_mb",
    "peak_rss_abs_mb",
    "memory_before_step_mb",
    "step_time_s",
    "step_times_s",
    "final_loss",
    "device",
    "config",
    "overrides",
    "input_size",
    "batch_size",
    "iters",
    "warmup",
    "torch_version",
)


@dataclass
class BenchmarkSettings:
    """What every method of one benchmark shares. Plain JSON types, so a worker process can receive it."""

    config_file: str
    overrides: List[str] = field(default_factory=list)  # LazyConfig KEY=VALUE, applied before the method's
    input_size: int = 512
    batch_size: int = 2
    iters: int = 5  # timed steps
    warmup: int = 2  # untimed steps before them (but inside the memory window)
    device: str = "cpu"
    seed: int = 0
    instances_per_image: int = 3

    def __post_init__(self) -> None:
        checks = {
            "input_size": (self.input_size, 32),
            "batch_size": (self.batch_size, 1),
            "iters": (self.iters, 1),
            "warmup": (self.warmup, 0),
            "instances_per_image": (self.instances_per_image, 1),
        }
        for name, (value, low) in checks.items():
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        if torch.device(self.device).type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda' (optionally 'cuda:N'), got {self.device!r}.")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "BenchmarkSettings":
        return cls(**json.loads(text))


def load_benchmark_config(config_file: str, overrides: Sequence[str] = (), method: Optional[str] = None):
    """The LazyConfig of ``config_file`` with ``overrides`` and, given ``method``, the tuning override.

    Raises ValueError naming the file or the override that does not apply.
    """
    from detectron2.config import LazyConfig

    if not Path(config_file).is_file():
        raise ValueError(f"Config file {config_file!r} does not exist; pass a LazyConfig .py file, "
                         "e.g. configs/COCO/mask_rcnn_swin_t_e3va.py.")
    cfg = LazyConfig.load(config_file)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"Overrides must look like KEY=VALUE, got {bad}.")
    try:
        cfg = apply_overrides(cfg, list(overrides))  # a mistyped key is an error, naming the closest
    except Exception as e:  # omegaconf/Detectron2 raise several types; say which override failed
        raise ValueError(f"Could not apply overrides {list(overrides)} to {config_file}: {e}") from e
    try:
        key = backbone_config_key(cfg)
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}") from e
    if method is not None:
        cfg = LazyConfig.apply_overrides(cfg, [f"{key}.tuning={method}"])
    return cfg


def base_record(method: str, settings: BenchmarkSettings) -> Dict[str, Any]:
    """A record of ``method`` with every field of :data:`RECORD_FIELDS` (None until measured) and the settings'."""
    record: Dict[str, Any] = {k: None for k in RECORD_FIELDS}
    record.update(
        method=method,
        config=settings.config_file,
        overrides=list(settings.overrides),
        input_size=settings.input_size,
        batch_size=settings.batch_size,
        iters=settings.iters,
        warmup=settings.warmup,
        torch_version=torch.__version__,
        step_times_s=[],
    )
    return record


def failed_record(method: str, settings: BenchmarkSettings, reason: str, **known: Any) -> Dict[str, Any]:
    """A record for a method that could not be measured; ``known`` keeps what was (e.g. parameter counts)."""
    record = base_record(method, settings)
    record.update({k: v for k, v in known.items() if v is not None})
    record["status"] = f"failed: {reason}"
    return record


def record_ok(record: Mapping[str, Any]) -> bool:
    """Whether ``record`` is a measurement (``status`` ``"ok"``), not a failure."""
    return record.get("status") == "ok"
