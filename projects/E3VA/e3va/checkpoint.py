"""Reading checkpoints safely, and loading pretrained Swin weights and trainable-only files into a detector.

Detectron2's ``DetectionCheckpointer`` expects parameter names of the whole detector. Official Swin
releases (``{"model": state_dict}``, the Microsoft format) name the trunk's parameters only, so we
place them under the trunk's prefix and drop what a detector has no use for.

Every ``.pth`` file is read with ``torch.load(weights_only=True)``: a checkpoint is data, and a file that
needs arbitrary unpickling could run code. Such a file is refused unless the caller opts in
(``allow_unsafe_pickle=True`` or the environment variable ``E3VA_ALLOW_UNSAFE_PICKLE=1``).
"""
from __future__ import annotations

import logging
import os
import pickle
import zipfile
from typing import Any, Dict, Optional, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from .atomic import atomic_torch_save, atomic_write_text
from .trainable import (
    SIDE_NETWORK_KEY,
    TRAINABLE_META_KEY,
    apply_trainable,
    check_side_network,
    full_checkpoint,
    holds_side_network,
    is_trainable_checkpoint,
    side_network_of,
    trainable_checkpoint,
)

__all__ = [
    "ALLOW_UNSAFE_PICKLE_ENV",
    "CheckpointReadError",
    "E3VACheckpointer",
    "align_with_wrapped_layers",
    "is_swin_classification_state_dict",
    "read_checkpoint_file",
]

ALLOW_UNSAFE_PICKLE_ENV = "E3VA_ALLOW_UNSAFE_PICKLE"


class CheckpointReadError(RuntimeError):
    """A checkpoint file could not be read: corrupted, truncated, or needing unsafe unpickling."""


def _unsafe_pickle_allowed(allow: Optional[bool]) -> bool:
    return allow if allow is not None else os.environ.get(ALLOW_UNSAFE_PICKLE_ENV, "") == "1"


def read_checkpoint_file(path: str, *, allow_unsafe_pickle: Optional[bool] = None) -> Dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that say what to do.

    A file that holds more than tensors and plain containers is refused, with the opt-in spelled out;
    a truncated or corrupted file raises :class:`CheckpointReadError` (nothing is loaded anywhere).
    ``allow_unsafe_pickle=None`` reads the ``E3VA_ALLOW_UNSAFE_PICKLE`` environment variable.
    """
    unsafe = _unsafe_pickle_allowed(allow_unsafe_pickle)
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe)
    except pickle.UnpicklingError as e:
        if not unsafe and not zipfile.is_zipfile(path):
            # torch.save writes zip archives; anything else is damaged, or a plain pickle.
            raise CheckpointReadError(
                f"{path} is not a PyTorch checkpoint archive: it is truncated or corrupted, or a plain pickle. "
                f"Nothing was loaded. If it is a pickle you trust, opt in with {ALLOW_UNSAFE_PICKLE_ENV}=1."
            ) from e
        if not unsafe and "weights only" in str(e).lower():
            raise CheckpointReadError(
                f"{path} holds Python objects beyond tensors, which only arbitrary unpickling can read, "
                "and that can run code. If you trust the file, opt in with "
                f"{ALLOW_UNSAFE_PICKLE_ENV}=1 (or E3VACheckpointer(..., allow_unsafe_pickle=True)). "
                f"torch said: {str(e).splitlines()[0]}"
            ) from e
        raise CheckpointReadError(f"{path} is not a readable checkpoint (corrupted?): {e}") from e
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as e:
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise CheckpointReadError(
            f"{path} ({size:,d} bytes) could not be read as a PyTorch checkpoint: it is truncated or corrupted "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Nothing was loaded."
        ) from e

logger = logging.getLogger("e3va")


def is_swin_classification_state_dict(state_dict: Dict[str, torch.Tensor]) -> bool:
    """True for a Swin classification state dict, official or timm layout (trunk names at the top level)."""
    return "patch_embed.proj.weight" in state_dict and any(k.startswith("layers.0.blocks.0.") for k in state_dict)


def align_with_wrapped_layers(state_dict: Dict[str, torch.Tensor], model_keys) -> Dict[str, torch.Tensor]:
    """Renames ``a.b.weight`` to ``a.b.base_layer.weight`` where the model wraps layer ``a.b`` (PEFT's
    LoRA does), so one checkpoint loads into every tuning method. Checkpoint names may also be suffixes
    of the model's (e.g. MAE's ``blocks.0.attn.qkv.weight``, matched by Detectron2's heuristics)."""
    model_keys = set(model_keys)
    wrapped_model_keys = [k for k in model_keys if ".base_layer." in k]
    aligned = {}
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        wrapped = f"{module}.base_layer.{leaf}"
        is_wrapped = key not in model_keys and any(
            k == wrapped or k.endswith("." + wrapped) for k in wrapped_model_keys
        )
        aligned[wrapped if is_wrapped else key] = value
    return aligned


def _find_swin_trunk(model: nn.Module) -> Tuple[str, nn.Module]:
    """``(prefix, trunk)`` of the model's E3VA Swin backbone, e.g. ``("backbone.bottom_up.trunk.", ...)``."""
    from .backbone import E3VASwin, find_tuned_backbone  # local: backbone imports Detectron2's modeling

    try:
        name, backbone = find_tuned_backbone(model)
    except ValueError:
        backbone = None
    if not isinstance(backbone, E3VASwin):
        raise ValueError(
            f"This checkpoint holds Swin classification weights, but the model "
            f"({type(getattr(model, 'module', model)).__name__}) has no E3VASwin backbone to put them in"
            + (f" (its backbone is {type(backbone).__name__})." if backbone is not None else ".")
        )
    return (f"{name}.trunk." if name else "trunk."), backbone.trunk


def _is_timm_model_name(path: str) -> bool:
    if not path or os.path.exists(path) or "://" in path or path.endswith((".pth", ".pt", ".pkl", ".pyth")):
        return False
    import timm

    return timm.is_model(path)


class E3VACheckpointer(DetectionCheckpointer):
    """Detectron2's checkpointer that also reads Swin classification checkpoints (official or timm layout,
    a file, URL or timm model name; sizes checked, bias tables resized to the trunk's window) and
    trainable-only checkpoints, and reads every file with ``weights_only=True``.

    With ``trainable_only=True`` its checkpoints hold the trainable parameters only (plus the optimizer,
    scheduler and iteration, as Detectron2's do): resuming from one first loads the base weights, the
    ``path`` given to :meth:`resume_or_load` (``train.init_checkpoint``), then the trainable part.
    """

    def __init__(
        self,
        model: nn.Module,
        save_dir: str = "",
        *,
        trainable_only: bool = False,
        config: Optional[str] = None,
        allow_unsafe_pickle: Optional[bool] = None,
        **checkpointables: Any,
    ) -> None:
        super().__init__(model, save_dir, **checkpointables)
        self.trainable_only = trainable_only
        self.config = config  # stored in trainable-only checkpoints, to say what they were trained with
        self.allow_unsafe_pickle = allow_unsafe_pickle

    # ---- writing
    def save(self, name: str, **kwargs: Any) -> None:
        """As fvcore's, but atomic: the file goes to a temporary name in ``save_dir``, is fsync'ed and
        renamed over ``<name>.pth``; only then does ``last_checkpoint`` name it. A run killed while saving
        leaves the previous checkpoint and a ``last_checkpoint`` that names a complete file."""
        if not self.save_dir or not self.save_to_disk:
            return
        if self.trainable_only:
            data = trainable_checkpoint(self.model, self.config)
            kind = "trainable-only checkpoint"
        else:
            data = full_checkpoint(self.model)  # with the side network's record: what its tensors mean
            kind = "checkpoint"
        data.update({key: obj.state_dict() for key, obj in self.checkpointables.items()})
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        if os.path.basename(save_file) != basename:
            raise ValueError(f"Checkpoint name {name!r} must be a plain file name, without directories.")
        self.logger.info(f"Saving {kind} to {save_file}")
        atomic_torch_save(data, save_file)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """Writes ``last_checkpoint`` atomically (fvcore truncates it first)."""
        atomic_write_text(last_filename_basename, os.path.join(self.save_dir, "last_checkpoint"))

    # ---- reading
    def _load_file(self, filename: str) -> dict:
        if filename.endswith(".pkl") and not _unsafe_pickle_allowed(self.allow_unsafe_pickle):
            raise CheckpointReadError(
                f"{filename}: .pkl checkpoints (Detectron2 / Caffe2 model zoo) are read with pickle, which can "
                f"run code. If you trust the file, opt in with {ALLOW_UNSAFE_PICKLE_ENV}=1 "
                "(or E3VACheckpointer(..., allow_unsafe_pickle=True))."
            )
        loaded = super()._load_file(filename)
        state_dict = loaded.get("model", {})
        if isinstance(state_dict, dict) and is_swin_classification_state_dict(state_dict):
            loaded["model"] = self._swin_classification_to_model(state_dict, filename)
        return loaded

    def _swin_classification_to_model(self, state_dict: Dict[str, torch.Tensor], source: str) -> Dict[str, torch.Tensor]:
        """Official or timm Swin weights, checked against the trunk's size, adapted to its window
        and renamed under its prefix; everything not copied as is gets logged by name."""
        from .pretrained import adapt_to_trunk, detect_swin_format, timm_to_official  # pretrained imports us

        layout = detect_swin_format(state_dict)
        if layout == "timm":
            state_dict = timm_to_official(state_dict)
        prefix, trunk = _find_swin_trunk(self.model)
        adapted, report = adapt_to_trunk(state_dict, trunk)  # raises, naming both sizes, if they differ
        logger.info(f"Read {source} as Swin classification weights ({layout} layout) for '{prefix}'.")
        for line in report.lines():
            logger.info(line)
        return {prefix + key: value for key, value in adapted.items()}

    def load(self, path: str, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """As Detectron2's, and ``path`` may also be a timm model name such as
        ``swin_base_patch4_window7_224.ms_in22k`` (timm fetches the weights)."""
        if not _is_timm_model_name(path):
            return super().load(path, *args, **kwargs)
        from .pretrained import load_swin_pretrained

        self.logger.info(f"[E3VACheckpointer] Loading timm model {path} ...")
        incompatible = self._load_model({"model": self._swin_classification_to_model(load_swin_pretrained(path), path)})
        if incompatible is not None:
            self._log_incompatible_keys(incompatible)
        return {}

    def _torch_load(self, f: str) -> Dict[str, Any]:
        return read_checkpoint_file(f, allow_unsafe_pickle=self.allow_unsafe_pickle)

    def _load_model(self, checkpoint: dict):
        if is_trainable_checkpoint(checkpoint):
            url = self._parsed_url_during_load
            apply_trainable(self.model, checkpoint, url.geturl() if url else "checkpoint")
            state, meta = checkpoint.pop("model"), checkpoint.pop(TRAINABLE_META_KEY)
            self.logger.info(
                f"Loaded the trainable part ({len(state)} tensors, tuning={meta.get('tuning')!r}) on top of "
                "the frozen base weights."
            )
            return None
        if holds_side_network(checkpoint["model"]) and side_network_of(self.model):
            url = self._parsed_url_during_load
            check_side_network(self.model, checkpoint.get(SIDE_NETWORK_KEY), url.geturl() if url else "checkpoint")
        checkpoint["model"] = align_with_wrapped_layers(checkpoint["model"], self.model.state_dict().keys())
        return super()._load_model(checkpoint)

    def _holds_trainable_only(self, path: str) -> bool:
        local = self.path_manager.get_local_path(path)
        try:  # mmap: only the keys are read, even from a multi-GB full checkpoint
            return is_trainable_checkpoint(torch.load(local, map_location="cpu", weights_only=True, mmap=True))
        except Exception:  # let load() report the problem with its full message
            return False

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        if resume and self.has_checkpoint():
            last = self.get_checkpoint_file()
            if self._holds_trainable_only(last) and path:
                self.logger.info(f"{last} holds the trainable part only: loading the base weights {path} first.")
                self.load(path, checkpointables=[])
            return self.load(last)
        return self.load(path, checkpointables=[])
