"""``E3VACheckpointer``: Detectron2's checkpointer for E3VA models.

Detectron2's ``DetectionCheckpointer`` expects parameter names of the whole detector. Official Swin
releases (``{"model": state_dict}``, the Microsoft format) name the trunk's parameters only, so we
place them under the trunk's prefix and drop what a detector has no use for (``e3va.swin_weights``).
Trainable-only task files (``e3va.trainable``) load on top of the base weights. Every file is read
safely (``e3va.checkpoint_io``).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple
from urllib.parse import urlparse

import timm
import torch
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from .atomic import atomic_torch_save, atomic_write_text
from .backbone import find_tuned_backbone
from .checkpoint_io import (
    ALLOW_UNSAFE_PICKLE_ENV,
    CheckpointReadError,
    align_with_wrapped_layers,
    explain_download_failure,
    read_checkpoint_file,
    unsafe_pickle_allowed,
)
from .swin import E3VASwin
from .swin_weights import (
    adapt_to_trunk,
    detect_swin_format,
    is_swin_classification_state_dict,
    load_swin_pretrained,
    timm_to_official,
)
from .trainable import (
    SIDE_NETWORK_KEY,
    TRAINABLE_META_KEY,
    apply_trainable,
    check_resumable,
    check_side_network,
    full_checkpoint,
    holds_side_network,
    is_trainable_checkpoint,
    side_network_of,
    trainable_checkpoint,
)

# Reading files safely lives in checkpoint_io; these names stay importable from here.
__all__ = [
    "ALLOW_UNSAFE_PICKLE_ENV",
    "CheckpointReadError",
    "E3VACheckpointer",
    "align_with_wrapped_layers",
    "read_checkpoint_file",
]

logger = logging.getLogger("e3va")


def _find_swin_trunk(model: nn.Module) -> Tuple[str, nn.Module]:
    """``(prefix, trunk)`` of the model's E3VA Swin backbone, e.g. ``("backbone.bottom_up.trunk.", ...)``."""
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


def is_timm_model_name(path: str) -> bool:
    """True when ``path`` is no file or URL but a timm model name (whose pretrained weights timm fetches)."""
    if not path or os.path.exists(path) or "://" in path or path.endswith((".pth", ".pt", ".pkl", ".pyth")):
        return False
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
        self._resuming = False  # set by resume_or_load while it loads the last checkpoint

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
        if filename.endswith(".pkl") and not unsafe_pickle_allowed(self.allow_unsafe_pickle):
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
        if not is_timm_model_name(path):
            if "://" in path:  # fetch first (cached), so that an offline run says which file to download
                with explain_download_failure(path):
                    self.path_manager.get_local_path(urlparse(path)._replace(query="").geturl())
            return super().load(path, *args, **kwargs)
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
        url = self._parsed_url_during_load
        source = url.geturl() if url else "checkpoint"
        if self._resuming:  # before the model and then the optimizer take anything from it
            check_resumable(self.model, checkpoint, source)
        if holds_side_network(checkpoint["model"]) and side_network_of(self.model):
            check_side_network(self.model, checkpoint.get(SIDE_NETWORK_KEY), source)
        checkpoint["model"] = align_with_wrapped_layers(checkpoint["model"], self.model.state_dict().keys())
        return super()._load_model(checkpoint)

    def peek(self, path: str) -> Dict[str, Any]:
        """The checkpoint ``path`` (a file or URL) as stored, its tensors memory-mapped (cheap even for a
        multi-GB file), nothing loaded into the model; ``{}`` for a timm model name."""
        if is_timm_model_name(path):
            return {}
        local = self.path_manager.get_local_path(path)
        return read_checkpoint_file(local, allow_unsafe_pickle=self.allow_unsafe_pickle, mmap=True)

    def _holds_trainable_only(self, path: str) -> bool:
        try:
            return is_trainable_checkpoint(self.peek(path))
        except Exception:  # let load() report the problem with its full message
            return False

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        if resume and self.has_checkpoint():
            last = self.get_checkpoint_file()
            if self._holds_trainable_only(last) and path:
                self.logger.info(f"{last} holds the trainable part only: loading the base weights {path} first.")
                self.load(path, checkpointables=[])
            # A full checkpoint must come from a model built as this one (method, shapes): the optimizer's
            # state is restored by position, so a mismatch would otherwise crash inside its first step.
            self._resuming = True
            try:
                return self.load(last)
            finally:
                self._resuming = False
        return self.load(path, checkpointables=[])
