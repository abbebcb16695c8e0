"""Reading checkpoint files safely, and matching their names to a model's.

Every ``.pth`` file is read with ``torch.load(weights_only=True)``: a checkpoint is data, and a file that
needs arbitrary unpickling could run code. Such a file is refused unless the caller opts in
(``allow_unsafe_pickle=True`` or the environment variable ``E3VA_ALLOW_UNSAFE_PICKLE=1``).
"""
from __future__ import annotations

import contextlib
import os
import pickle
import zipfile
from typing import Any, Dict, Iterator, Optional
from urllib.parse import urlparse

import torch

__all__ = [
    "ALLOW_UNSAFE_PICKLE_ENV",
    "CheckpointReadError",
    "WeightsDownloadError",
    "align_with_wrapped_layers",
    "explain_download_failure",
    "read_checkpoint_file",
    "unsafe_pickle_allowed",
]

ALLOW_UNSAFE_PICKLE_ENV = "E3VA_ALLOW_UNSAFE_PICKLE"


class CheckpointReadError(RuntimeError):
    """A checkpoint file could not be read: corrupted, truncated, or needing unsafe unpickling."""


class WeightsDownloadError(OSError):
    """Weights named by a URL or a timm model name could not be fetched (offline?); the message says which
    file to download and where to point ``train.init_checkpoint``."""


def _timm_download(name: str) -> str:
    """Where a timm model name's pretrained weights can be downloaded by hand (its release URL, else its
    Hugging Face repository)."""
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
    except Exception:  # an unknown tag: the name itself is all there is to say
        cfg = None
    if cfg is not None and cfg.url:
        return cfg.url
    if cfg is not None and cfg.hf_hub_id:
        return f"https://huggingface.co/{cfg.hf_hub_id} (its {cfg.hf_hub_filename or 'model.safetensors'})"
    return f"the pretrained weights of the timm model {name}"


@contextlib.contextmanager
def explain_download_failure(source: str) -> Iterator[None]:
    """Turns a failed download of ``source`` (a URL or a timm model name) into :class:`WeightsDownloadError`,
    which names the file to fetch by hand and the ``train.init_checkpoint`` override that uses it, instead of
    a raw ``URLError`` or Hugging Face ``LocalEntryNotFoundError`` (both OSErrors, as is requests' error)."""
    try:
        yield
    except OSError as error:
        is_url = "://" in source
        url = source if is_url else _timm_download(source)
        name = os.path.basename(urlparse(url).path) if "://" in url and " " not in url else "the downloaded file"
        raise WeightsDownloadError(
            f"Could not fetch {'' if is_url else 'the timm model '}{source} ({type(error).__name__}: {error}). "
            f"Offline? Download {url} on a machine with network access, copy it here and point the config at it: "
            f"train.init_checkpoint=/path/to/{name} (or --weights /path/to/{name} for the tools)."
        ) from error


def unsafe_pickle_allowed(allow: Optional[bool]) -> bool:
    return allow if allow is not None else os.environ.get(ALLOW_UNSAFE_PICKLE_ENV, "") == "1"


def read_checkpoint_file(path: str, *, allow_unsafe_pickle: Optional[bool] = None,
                         mmap: bool = False) -> Dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that say what to do.

    A file that holds more than tensors and plain containers is refused, with the opt-in spelled out;
    a truncated or corrupted file raises :class:`CheckpointReadError` (nothing is loaded anywhere).
    ``allow_unsafe_pickle=None`` reads the ``E3VA_ALLOW_UNSAFE_PICKLE`` environment variable. ``mmap=True``
    maps the tensors instead of reading them (cheap for looking at a large file's names and shapes); it
    applies to the zip archives ``torch.save`` writes, other files are read whole.
    """
    if not os.path.isfile(path):  # not "0 bytes ... truncated": say what is wrong
        raise FileNotFoundError(
            f"Checkpoint {path} " + ("is a directory, not a file." if os.path.isdir(path) else "does not exist.")
        )
    unsafe = unsafe_pickle_allowed(allow_unsafe_pickle)
    mmap = mmap and not unsafe and zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not unsafe, mmap=mmap)
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
