"""Per-task checkpoints that hold only what a tuning method trains.

An E3VA task changes about 1% of a Swin detector's backbone; the rest is the shared pretrained base. A
trainable-only file keeps the trainable parameters (and the buffers of the modules that own them, such as
batch-norm statistics), the tuning method, the config, and a fingerprint of the frozen base weights, so
that loading it on top of a different base, or into a model of another method, is refused instead of
silently producing a mismatched model.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Union

import torch
from torch import nn

from .atomic import atomic_torch_save
from .backbone import find_tuned_backbone
from .checkpoint_io import read_checkpoint_file

__all__ = [
    "SIDE_NETWORK_KEY",
    "TRAINABLE_FORMAT",
    "TRAINABLE_META_KEY",
    "TUNING_KEY",
    "LEGACY_SIDE_NETWORK",
    "TrainableCheckpointError",
    "apply_trainable",
    "base_fingerprint",
    "check_resumable",
    "check_side_network",
    "config_record",
    "check_trainable_checkpoint",
    "is_trainable_checkpoint",
    "full_checkpoint",
    "holds_side_network",
    "load_trainable",
    "missing_trainable",
    "save_trainable",
    "trainable_checkpoint",
    "trainable_metadata",
    "side_network_of",
    "trainable_state_dict",
    "tuning_method_of",
]

TRAINABLE_FORMAT = "e3va-trainable/1"
# The key under which a checkpoint says that its "model" entry holds the trainable part only.
TRAINABLE_META_KEY = "e3va_trainable"
# The key under which a full checkpoint records its side-network choices (trainable-only files keep them
# in their metadata): what its side network's tensors mean.
SIDE_NETWORK_KEY = "e3va_side_network"
# The key under which a full checkpoint records the tuning method it was trained with (trainable-only files
# keep it in their metadata): a --resume under another method is refused by name.
TUNING_KEY = "e3va_tuning"
# What a file trained before side-network choices were recorded was made with (a file without the record).
LEGACY_SIDE_NETWORK = {"adapter_input": "sublayer_input", "highway_downsample": "difference"}


class TrainableCheckpointError(ValueError):
    """A checkpoint does not fit the model it is loaded into (another method, shape, base or side network)."""


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel


def trainable_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """The parameters that require gradients, plus the buffers of the modules that own them.

    Buffers elsewhere (the trunk's index tables, the detector's pixel mean) are rebuilt from the config
    or belong to the base, so they are left out.
    """
    model = _unwrap(model)
    state: Dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not any(p.requires_grad for p in own.values()):
            continue
        prefix = f"{module_name}." if module_name else ""
        for name, p in own.items():
            if p.requires_grad:
                state[prefix + name] = p.detach().clone()
        for name, b in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                state[prefix + name] = b.detach().clone()
    return state


def base_fingerprint(model: nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and values of the frozen parameters.

    Two models agree on it exactly when a trainable-only checkpoint of one completes the other.
    """
    digest = hashlib.sha256()
    for name, p in sorted(_unwrap(model).named_parameters(), key=lambda item: item[0]):
        if p.requires_grad:
            continue
        t = p.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def tuning_method_of(model: nn.Module) -> Optional[str]:
    """The tuning method of the model's E3VA backbone, or None when it has none."""
    try:
        return find_tuned_backbone(model)[1].method.name
    except ValueError:
        return None


def side_network_of(model: nn.Module) -> Dict[str, str]:
    """The side-network choices of the model's E3VA backbone (``SideTunedBackbone.side_network_record``),
    empty when it has none."""
    try:
        return find_tuned_backbone(model)[1].side_network_record()
    except ValueError:
        return {}


def check_side_network(model: nn.Module, recorded: Optional[Mapping[str, str]], source: str) -> None:
    """Raises :class:`TrainableCheckpointError` when weights trained with other side-network choices
    (``recorded``; None for a file written before they were recorded, which used the legacy ones) are
    loaded into ``model``: the same tensors would silently mean another network. Names the override."""
    wanted = side_network_of(model)
    saved = dict(LEGACY_SIDE_NETWORK if recorded is None else recorded)
    defaults = {"arrangement": "parallel", "highway_merging": "frozen"}  # not recorded: all older files knew
    if "adapter_input" in wanted:
        wanted.setdefault("arrangement", "parallel")
    if "highway_downsample" in wanted:
        wanted.setdefault("highway_merging", "frozen")
    for key in wanted:
        saved.setdefault(key, defaults.get(key))
    diff = {k: (saved.get(k), v) for k, v in wanted.items() if saved.get(k) != v}
    if not diff:
        return
    option = {"arrangement": "adapter_arrangement"}
    fixes = " ".join(f"model.backbone.bottom_up.{option.get(k, k)}={saved[k]}" for k in diff if saved.get(k))
    described = ", ".join(f"{k}={file_value!r} in the file, {model_value!r} in the model"
                          for k, (file_value, model_value) in diff.items())
    when = " (a file without this record predates it: it used the legacy choices)" if recorded is None else ""
    raise TrainableCheckpointError(
        f"{source} was trained with other side-network choices than this model's: {described}{when}. "
        f"Build the model as it was trained, e.g. with the override(s) {fixes} "
        "(model.backbone.net.... on ViT configs)."
    )


def full_checkpoint(model: nn.Module, **extra: Any) -> Dict[str, Any]:
    """``{"model": the whole state dict, TUNING_KEY: its tuning method, SIDE_NETWORK_KEY: its side-network
    choices, **extra}``: what a full checkpoint holds, so that it loads back (and resumes) as trained."""
    method, record = tuning_method_of(model), side_network_of(model)
    return {"model": _unwrap(model).state_dict(), **({TUNING_KEY: method} if method else {}),
            **({SIDE_NETWORK_KEY: record} if record else {}), **extra}


def _fit_problems(expected: Mapping[str, torch.Tensor], saved: Mapping[str, Any], missing: str,
                  unexpected: str) -> List[str]:
    """The differences in names and shapes between the tensors a model ``expected`` and those ``saved``,
    as short phrases (``missing`` and ``unexpected`` describe the two kinds of extra names)."""
    absent = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    wrong_shape = [
        f"{k}: saved {tuple(saved[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(saved))
        if torch.is_tensor(saved[k]) and torch.is_tensor(expected[k])
        and tuple(saved[k].shape) != tuple(expected[k].shape)
    ]
    problems: List[str] = []
    if absent:
        problems.append(f"{len(absent)} {missing}, e.g. {absent[:3]}")
    if extra:
        problems.append(f"{len(extra)} {unexpected}, e.g. {extra[:3]}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatches, e.g. {wrong_shape[:3]}")
    return problems


def _without_ddp_prefix(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """``state_dict`` without DistributedDataParallel's ``module.`` prefix, which Detectron2's loader strips too."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def missing_trainable(model: nn.Module, state_dict: Mapping[str, Any]) -> List[str]:
    """The names of the tensors ``model`` trains (:func:`trainable_state_dict`) that the full state dict
    ``state_dict`` lacks: a file without them was not trained as this model (e.g. pretrained trunk weights)."""
    return sorted(set(trainable_state_dict(model)) - set(_without_ddp_prefix(state_dict)))


def check_resumable(model: nn.Module, checkpoint: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Raises :class:`TrainableCheckpointError` unless the full checkpoint ``checkpoint`` was written by a
    model built as ``model`` is: the same tuning method (when the file records it) and the same tensor names
    and shapes. ``--resume`` restores the optimizer's state by position, so a checkpoint of another method or
    shape would otherwise load in part (mismatches skipped) and crash inside the optimizer's first step."""
    method = tuning_method_of(model)
    recorded = checkpoint.get(TUNING_KEY)
    if recorded is not None and recorded != method:
        raise TrainableCheckpointError(
            f"--resume: {source} was trained with tuning={recorded!r}, but the model uses tuning={method!r}. "
            f"Resume with the method it was trained with (the override model.backbone.bottom_up.tuning={recorded}, "
            "or model.backbone.net.tuning=... on ViT configs), or start a new run in another train.output_dir. "
            "Nothing was loaded."
        )
    problems = _fit_problems(_unwrap(model).state_dict(), _without_ddp_prefix(checkpoint["model"]),
                             "tensors missing from the file",
                             "tensors the model does not have")
    if problems:
        hint = (f"it was trained with tuning={recorded!r}, as this model is: were its shapes (rank, "
                "bottleneck_ratio) or the detector's config different?" if recorded is not None else
                "was it trained with another tuning method (model.backbone.bottom_up.tuning=...), other adapter "
                "shapes (rank, bottleneck_ratio) or another detector config?")
        raise TrainableCheckpointError(
            f"--resume: {source} does not fit this model ({'; '.join(problems)}); {hint} Build the model as that "
            "run was built, or start a new run in another train.output_dir. Nothing was loaded."
        )


def holds_side_network(state_dict: Mapping[str, Any]) -> bool:
    """True when a full state dict holds side-network tensors (an E3VA highway's or LoSA's)."""
    return any(".highway." in f".{k}" or ".losa." in f".{k}" for k in state_dict)


def trainable_metadata(model: nn.Module, config: Optional[str] = None) -> Dict[str, Any]:
    """What a trainable-only checkpoint records beside the weights."""
    return {
        "format": TRAINABLE_FORMAT,
        "tuning": tuning_method_of(model),
        "side_network": side_network_of(model),
        "base_fingerprint": base_fingerprint(model),
        "config": config,
    }


def config_record(cfg: Any) -> Optional[str]:
    """A LazyConfig as the YAML Detectron2 writes (``LazyConfig.save``), to store beside the weights;
    None when the config holds objects YAML cannot write."""
    import tempfile

    from detectron2.config import LazyConfig

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.yaml"
        try:
            LazyConfig.save(cfg, str(path))
        except Exception:  # the record is informative; a config that cannot be written should not stop saving
            return None
        return path.read_text() if path.is_file() else None


def trainable_checkpoint(model: nn.Module, config: Optional[str] = None) -> Dict[str, Any]:
    """``{"model": trainable tensors, TRAINABLE_META_KEY: metadata}``: what every trainable-only file holds."""
    return {"model": trainable_state_dict(model), TRAINABLE_META_KEY: trainable_metadata(model, config)}


def is_trainable_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """True for a checkpoint dict written by :func:`save_trainable` or a trainable-only checkpointer."""
    return isinstance(checkpoint, Mapping) and TRAINABLE_META_KEY in checkpoint


def save_trainable(model: nn.Module, path: Union[str, os.PathLike], *, config: Optional[str] = None,
                   **extra: Any) -> Path:
    """Writes the trainable part of ``model`` to ``path`` (see the module docstring); returns the path.

    ``config`` is stored as given (e.g. :func:`config_record` of the LazyConfig); ``extra``
    entries (e.g. ``iteration``) are saved beside the weights.
    """
    data = {**trainable_checkpoint(model, config), **extra}
    return atomic_torch_save(data, path)  # a crash mid-write leaves the previous file, never a truncated one


def check_trainable_checkpoint(model: nn.Module, checkpoint: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Raises :class:`TrainableCheckpointError` unless ``checkpoint`` completes ``model`` exactly:
    same format, tuning method, trainable names and shapes, and frozen base weights."""
    meta = checkpoint.get(TRAINABLE_META_KEY)
    if not isinstance(meta, Mapping) or meta.get("format") != TRAINABLE_FORMAT:
        found = meta.get("format") if isinstance(meta, Mapping) else None
        raise TrainableCheckpointError(
            f"{source} is not a trainable-only checkpoint of format {TRAINABLE_FORMAT!r} (found {found!r})."
        )
    method = tuning_method_of(model)
    if meta.get("tuning") != method:
        raise TrainableCheckpointError(
            f"{source} was trained with tuning={meta.get('tuning')!r}, but the model uses tuning={method!r}; "
            f"build the model with tuning={meta.get('tuning')} (e.g. the override "
            f"model.backbone.bottom_up.tuning={meta.get('tuning')}, or model.backbone.net.tuning=... on ViT)."
        )
    if side_network_of(model):
        check_side_network(model, meta.get("side_network"), source)
    problems = _fit_problems(trainable_state_dict(model), checkpoint["model"],
                             "trainable tensors missing from the file", "tensors the model does not train")
    if problems:
        raise TrainableCheckpointError(
            f"{source} does not fit this model ({'; '.join(problems)}). Were the adapter shapes "
            "(rank, bottleneck_ratio) or the detector's config different?"
        )
    fingerprint = base_fingerprint(model)
    if meta.get("base_fingerprint") != fingerprint:
        raise TrainableCheckpointError(
            f"{source} was trained on other frozen base weights (fingerprint "
            f"{str(meta.get('base_fingerprint'))[:12]}…, this model's {fingerprint[:12]}…). Load the same "
            "pretrained weights (train.init_checkpoint) into the model first."
        )


def apply_trainable(model: nn.Module, checkpoint: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Copies a trainable-only checkpoint's tensors into ``model`` after
    :func:`check_trainable_checkpoint` passed, so a refused file leaves the model untouched."""
    check_trainable_checkpoint(model, checkpoint, source)
    target = _unwrap(model)
    tensors = {**dict(target.named_parameters()), **dict(target.named_buffers())}
    with torch.no_grad():
        for name, value in checkpoint["model"].items():
            tensors[name].copy_(value)


def load_trainable(model: nn.Module, path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Loads a trainable-only checkpoint file on top of ``model``, which already holds the base weights
    (see :func:`apply_trainable`). Returns the file's other entries (metadata, iteration, ...)."""
    checkpoint = read_checkpoint_file(str(path))
    apply_trainable(model, checkpoint, str(path))
    checkpoint.pop("model")
    return checkpoint
