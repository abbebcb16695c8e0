"""Pretrained Swin classification weights, from any common source, made to fit an E3VA trunk.

The trunk is Detectron2's ``SwinTransformer``, whose parameter names are those of Microsoft's official
Swin release ("official" layout). timm (0.9 and later) publishes the same weights under another layout:
each stage's patch merging sits at the *start* of the next stage (``layers.{i+1}.downsample``, not
``layers.{i}.downsample``) and the classifier is ``head.fc``. This module reads either, converts to the
official layout, checks that the architecture fits the trunk, and adapts what legitimately differs
between a classification checkpoint and a detection trunk (window size, output norms, index buffers).

    state_dict = load_swin_pretrained("swin_base_patch4_window7_224.ms_in22k")   # or a file, or a URL
    trunk_state, report = adapt_to_trunk(state_dict, trunk)
    trunk.load_state_dict(trunk_state)

``tools/convert_pretrained.py`` wraps this into a file that Detectron2's plain ``DetectionCheckpointer``
loads.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from timm.layers.pos_embed_rel import resize_rel_pos_bias_table_simple
from torch import nn

from .checkpoint_io import align_with_wrapped_layers, explain_download_failure, read_checkpoint_file
from .swin import SWIN_PRESETS

__all__ = [
    "SWIN_FORMATS",
    "AdaptReport",
    "adapt_to_trunk",
    "check_fits",
    "detect_swin_format",
    "infer_swin_architecture",
    "is_swin_classification_state_dict",
    "load_swin_pretrained",
    "resize_relative_position_bias",
    "swin_preset_name",
    "timm_to_official",
    "trunk_architecture",
]

StateDict = Dict[str, torch.Tensor]

SWIN_FORMATS = ("official", "timm")

# What a classification checkpoint has and a detection trunk does not: the classifier and the final
# norm (the trunk has one norm per output instead).
_CLASSIFIER_PREFIXES = ("head.", "norm.")
# Buffers derived from the window size (and, for the mask, the input size): never learned, so they
# are recomputed for the trunk's own window rather than trusted from the file.
_DERIVED_BUFFER_SUFFIXES = ("relative_position_index", "attn_mask")
# The detection trunk's per-output LayerNorms; classification training never saw them.
_OUTPUT_NORM = re.compile(r"^norm\d+\.")

_BLOCK_KEY = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_DOWNSAMPLE_KEY = re.compile(r"^layers\.(\d+)\.downsample\.")
_BIAS_TABLE = "attn.relative_position_bias_table"


# --------------------------------------------------------------------------------------------------
# Format detection and timm -> official
# --------------------------------------------------------------------------------------------------


def is_swin_classification_state_dict(state_dict: Dict[str, torch.Tensor]) -> bool:
    """True for a Swin classification state dict, official or timm layout (trunk names at the top level)."""
    return "patch_embed.proj.weight" in state_dict and any(k.startswith("layers.0.blocks.0.") for k in state_dict)


def _describe_keys(state_dict: Mapping[str, Any], limit: int = 5) -> str:
    keys = list(state_dict)
    if not keys:
        return "an empty state dict"
    shown = ", ".join(repr(k) for k in keys[:limit]) + (", ..." if len(keys) > limit else "")
    return f"[{shown}] ({len(keys)} key{'s' if len(keys) > 1 else ''})"


def _require_swin(state_dict: Mapping[str, Any]) -> None:
    """Raises a ValueError naming what was found unless ``state_dict`` holds Swin (V1) trunk weights."""
    has_embed = "patch_embed.proj.weight" in state_dict
    has_blocks = any(_BLOCK_KEY.match(k) and k.endswith(_BIAS_TABLE) for k in state_dict)
    if has_embed and has_blocks:
        return
    found = _describe_keys(state_dict)
    hint = ""
    nested = next((k for k in state_dict if k.endswith(".patch_embed.proj.weight")), None)
    if nested is not None:
        prefix = nested[: -len("patch_embed.proj.weight")]
        hint = (
            f" The keys look like Swin weights under the prefix {prefix!r}: a detector's own checkpoint "
            "loads with DetectionCheckpointer as it is, without conversion."
        )
    elif any(k.endswith(("logit_scale", "cpb_mlp.0.weight")) for k in state_dict):
        hint = " This looks like a Swin V2 checkpoint (logit_scale, cpb_mlp), which the V1 trunk cannot use."
    raise ValueError(
        "Not a Swin classification state dict: expected 'patch_embed.proj.weight' and "
        f"'layers.<i>.blocks.<j>.{_BIAS_TABLE}' at the top level (official or timm layout), found {found}.{hint}"
    )


def _layout_evidence(state_dict: Mapping[str, Any]) -> Optional[str]:
    """The layout the keys prove, or None when official and timm would name everything the same.

    Patch merging decides: official Swin has it at the end of stages 0..n-2, timm at the start of
    stages 1..n-1, so stage 0 has one only in the official layout. The classifier names tell a
    headless timm checkpoint apart only if merging is absent too (a one-stage model).
    """
    stages = {int(m.group(1)) for m in map(_DOWNSAMPLE_KEY.match, state_dict) if m}
    if stages:
        return "official" if 0 in stages else "timm"
    if any(k.startswith("head.fc.") for k in state_dict):
        return "timm"
    if any(k.startswith("head.") for k in state_dict):
        return "official"
    return None


def detect_swin_format(state_dict: Mapping[str, Any]) -> str:
    """Returns "official" or "timm", the layout of a Swin classification state dict.

    Raises ValueError, naming a few of the keys found, when it is not a Swin classification state dict.
    Where both layouts name every key the same (no patch merging, no head), returns "official".
    """
    _require_swin(state_dict)
    return _layout_evidence(state_dict) or "official"


def _official_key(timm_key: str) -> str:
    # timm's stage i+1 opens with the merging that ends the official stage i.
    match = _DOWNSAMPLE_KEY.match(timm_key)
    if match:
        stage = int(match.group(1))
        return f"layers.{stage - 1}.downsample." + timm_key[match.end():]
    if timm_key.startswith("head.fc."):
        return "head." + timm_key[len("head.fc."):]
    return timm_key


def timm_to_official(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Renames a timm (0.9+) Swin state dict to the official layout; drops the derived buffers.

    Only names change. Patch merging's channel order is the same in both: timm's
    ``reshape(B, H/2, 2, W/2, 2, C).permute(0, 1, 3, 4, 2, 5)`` concatenates the 2x2 neighbours
    column-major, (0,0), (1,0), (0,1), (1,1), as official Swin's ``cat([x0, x1, x2, x3])`` does, so the
    merging's norm and reduction weights are used as they are (``tests/test_pretrained.py`` checks this
    against timm's own forward).
    """
    if any(k.startswith("layers.0.downsample.") for k in state_dict):
        raise ValueError(
            "timm_to_official got a state dict with 'layers.0.downsample.*': that is the official layout "
            "already (timm has no patch merging in stage 0)."
        )
    return {
        _official_key(key): value
        for key, value in state_dict.items()
        if not key.endswith(_DERIVED_BUFFER_SUFFIXES)
    }


# --------------------------------------------------------------------------------------------------
# Architecture: inferred from shapes, compared with the trunk
# --------------------------------------------------------------------------------------------------


def _window_of_table(rows: int, key: str) -> int:
    # A table has one row per relative offset: (2w - 1) ** 2 of them for a w x w window.
    side = math.isqrt(rows)
    if side * side != rows or side % 2 == 0:
        raise ValueError(f"{key} has {rows} rows; a square window's table has (2*w - 1)**2 rows.")
    return (side + 1) // 2


def infer_swin_architecture(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """``dict(embed_dim, depths, num_heads, window_size)`` of an official-layout Swin state dict.

    Read from tensor shapes only (meta tensors work): embed_dim from the patch embedding, depths from
    the block indices, heads and window from each stage's relative-position-bias tables. window_size
    is an int when every stage uses the same window, else a tuple with one per stage.
    """
    _require_swin(state_dict)
    blocks: Dict[int, int] = {}
    tables: Dict[int, torch.Tensor] = {}
    for key, value in state_dict.items():
        match = _BLOCK_KEY.match(key)
        if match:
            stage, block = int(match.group(1)), int(match.group(2))
            blocks[stage] = max(blocks.get(stage, 0), block + 1)
            if block == 0 and key.endswith(_BIAS_TABLE):
                tables[stage] = value
    stages = sorted(blocks)
    if stages != list(range(len(stages))) or sorted(tables) != stages:
        raise ValueError(
            f"Swin stages are not numbered 0..n-1 with a bias table in block 0: stages {stages}, "
            f"tables in stages {sorted(tables)}."
        )
    windows = tuple(
        _window_of_table(tables[s].shape[0], f"layers.{s}.blocks.0.{_BIAS_TABLE}") for s in stages
    )
    return dict(
        embed_dim=int(state_dict["patch_embed.proj.weight"].shape[0]),
        depths=tuple(blocks[s] for s in stages),
        num_heads=tuple(int(tables[s].shape[1]) for s in stages),
        window_size=windows[0] if len(set(windows)) == 1 else windows,
    )


def trunk_architecture(trunk: nn.Module) -> Dict[str, Any]:
    """The same dict as ``infer_swin_architecture``, read from a Detectron2 ``SwinTransformer``'s modules
    (so that it holds for trunks whose layers a tuning method has wrapped)."""
    return dict(
        embed_dim=int(trunk.embed_dim),
        depths=tuple(len(stage.blocks) for stage in trunk.layers),
        num_heads=tuple(int(stage.blocks[0].attn.num_heads) for stage in trunk.layers),
        window_size=int(trunk.layers[0].window_size),
    )


def swin_preset_name(architecture: Mapping[str, Any]) -> Optional[str]:
    """The ``SWIN_PRESETS`` size (T, S, B, L, nano) with this embed_dim, depths and heads, else None."""
    for name, preset in SWIN_PRESETS.items():
        if all(tuple(architecture[k]) == tuple(preset[k]) for k in ("depths", "num_heads")) and int(
            architecture["embed_dim"]
        ) == int(preset["embed_dim"]):
            return name
    return None


def _describe_architecture(arch: Mapping[str, Any]) -> str:
    name = swin_preset_name(arch)
    label = f"Swin-{name}" if name else "no preset of e3va.swin.SWIN_PRESETS"
    return (
        f"embed_dim={arch['embed_dim']}, depths={tuple(arch['depths'])}, "
        f"num_heads={tuple(arch['num_heads'])} ({label})"
    )


def check_fits(state_dict: Mapping[str, torch.Tensor], trunk: nn.Module) -> Dict[str, Any]:
    """Raises ValueError unless the checkpoint's embed_dim, depths and heads are the trunk's.

    The window size may differ (``adapt_to_trunk`` interpolates the bias tables). Returns the
    checkpoint's architecture.
    """
    found = infer_swin_architecture(state_dict)
    wanted = trunk_architecture(trunk)
    keys = ("embed_dim", "depths", "num_heads")
    if any(tuple(_as_tuple(found[k])) != tuple(_as_tuple(wanted[k])) for k in keys):
        size = swin_preset_name(found)
        fix = (
            f"build the model with size={size!r} (e.g. model.backbone.bottom_up.size={size}) or use "
            "a checkpoint of the trunk's size."
            if size
            else "use a checkpoint of the trunk's size."
        )
        raise ValueError(
            f"The checkpoint is a Swin with {_describe_architecture(found)} but the model's trunk has "
            f"{_describe_architecture(wanted)}; {fix}"
        )
    return found


def _as_tuple(value: Any) -> Tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


# --------------------------------------------------------------------------------------------------
# Adapting to the trunk
# --------------------------------------------------------------------------------------------------


def resize_relative_position_bias(table: torch.Tensor, new_window: int) -> torch.Tensor:
    """Bicubically resamples a ``((2w-1)**2, heads)`` bias table to ``((2w'-1)**2, heads)``.

    As the Swin authors do when fine-tuning at another window: the table is each head's bias over the
    (2w-1) x (2w-1) grid of relative offsets, resampled as an image (``timm.layers``'
    ``resize_rel_pos_bias_table_simple``). The same window returns the table.
    """
    if table.dim() != 2:
        raise ValueError(f"A relative-position-bias table is 2-D (offsets, heads); got shape {tuple(table.shape)}.")
    if new_window < 1:
        raise ValueError(f"new_window must be a positive window size, got {new_window!r}.")
    if _window_of_table(table.shape[0], "the table") == new_window:  # raises for a table of no square window
        return table
    # timm's bicubic resampling, the Swin authors' own; in float32, as bicubic lacks some half dtypes on CPU.
    new_shape = ((2 * new_window - 1) ** 2, table.shape[1])
    return resize_rel_pos_bias_table_simple(table.float(), (new_window, new_window), new_shape).to(table.dtype)


@dataclass
class AdaptReport:
    """Every key of the checkpoint or the trunk that was not a plain name-for-name copy."""

    dropped: List[str] = field(default_factory=list)  # in the checkpoint, no use to a detector
    resized: List[str] = field(default_factory=list)  # bias tables interpolated to the trunk's window
    filled: List[str] = field(default_factory=list)  # trunk keys the checkpoint lacks, set by adapt_to_trunk
    missing: List[str] = field(default_factory=list)  # trunk keys the checkpoint lacks, left to the caller
    unexpected: List[str] = field(default_factory=list)  # checkpoint keys the trunk does not have

    def lines(self) -> List[str]:
        """A human-readable summary, one line per non-empty category, with every name."""
        notes = {
            "dropped": "classifier, final norm and derived buffers, no use to a detector",
            "resized": "relative-position-bias tables interpolated (bicubic) to the trunk's window",
            "filled": "not in the checkpoint: index buffers from the trunk, output norms as LayerNorm "
            "init (weight 1, bias 0)",
            "missing": "in the trunk but not in the checkpoint, not set",
            "unexpected": "in the checkpoint but not in the trunk, not used",
        }
        out = []
        for name, note in notes.items():
            keys = getattr(self, name)
            if keys:
                out.append(f"{name} ({len(keys)}; {note}): {', '.join(keys)}")
        return out


def _output_norm_init(name: str, like: torch.Tensor) -> torch.Tensor:
    # LayerNorm's own initialisation: classification never trained these norms, and starting them as
    # the identity affine keeps the trunk's features as pretrained.
    return torch.ones_like(like) if name.endswith(".weight") else torch.zeros_like(like)


def adapt_to_trunk(
    state_dict: Mapping[str, torch.Tensor],
    trunk: nn.Module,
    *,
    init_output_norms: bool = True,
) -> Tuple[StateDict, AdaptReport]:
    """Makes an official-layout Swin classification state dict fit ``trunk`` (a Detectron2 Swin).

    Checks the architecture (``check_fits``), drops the classifier, final norm and ``attn_mask``
    buffers, interpolates bias tables of another window size, takes ``relative_position_index`` from
    the trunk, and (``init_output_norms``) sets the trunk's output norms ``norm0..norm3`` to LayerNorm's
    initialisation, which classification checkpoints do not have. Returns the trunk's state dict
    (checkpoint keys the trunk lacks left out) and an ``AdaptReport`` naming every key that was not
    copied as is. Keys of layers a tuning method wrapped (``.base_layer``) are matched too.
    """
    check_fits(state_dict, trunk)
    target = trunk.state_dict()
    window = trunk_architecture(trunk)["window_size"]
    report = AdaptReport()
    kept: StateDict = {}
    for key, value in state_dict.items():
        if key.startswith(_CLASSIFIER_PREFIXES) or key.endswith(_DERIVED_BUFFER_SUFFIXES):
            report.dropped.append(key)
        elif key.endswith("relative_position_bias_table") and value.shape[0] != (2 * window - 1) ** 2:
            kept[key] = resize_relative_position_bias(value, window)
            report.resized.append(key)
        else:
            kept[key] = value
    kept = align_with_wrapped_layers(kept, target.keys())

    adapted: StateDict = {}
    for key, value in kept.items():
        if key not in target:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(target[key].shape):
            raise ValueError(
                f"{key} has shape {tuple(value.shape)} in the checkpoint but {tuple(target[key].shape)} in "
                "the trunk, although embed_dim, depths and heads agree (another mlp_ratio or patch size?)."
            )
        else:
            adapted[key] = value
    for key, value in target.items():
        if key in adapted:
            continue
        if key.endswith("relative_position_index"):
            adapted[key] = value.clone()
            report.filled.append(key)
        elif init_output_norms and _OUTPUT_NORM.match(key):
            adapted[key] = _output_norm_init(key, value)
            report.filled.append(key)
        else:
            report.missing.append(key)
    return adapted, report


# --------------------------------------------------------------------------------------------------
# Loading from a file, a URL or timm
# --------------------------------------------------------------------------------------------------


def _unwrap(loaded: Any, source: str) -> StateDict:
    """The state dict inside a checkpoint: ``{"model": sd}``, ``{"state_dict": sd}`` or ``sd`` itself."""
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{source} holds a {type(loaded).__name__}, not a state dict or a dict holding one.")
    for wrapper in ("model", "state_dict"):
        if isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
            break
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(
            f"{source} has no tensors under 'model', 'state_dict' or the top level; found {_describe_keys(loaded)}."
        )
    return tensors


def _read_file(path: str, source: str) -> StateDict:
    return _unwrap(read_checkpoint_file(path), source)  # weights_only=True, with clear errors


def _from_timm(name: str) -> StateDict:
    import timm  # local: only this source needs it

    with explain_download_failure(name):  # offline: say which file to fetch by hand
        model = timm.create_model(name, pretrained=True)
    return dict(model.state_dict())


def _read_source(source: str) -> StateDict:
    if os.path.exists(source):
        return _read_file(source, source)
    if source.startswith(("http://", "https://")):
        from detectron2.utils.file_io import PathManager  # caches downloads under ~/.torch/iopath_cache

        with explain_download_failure(source):
            local = PathManager.get_local_path(source)
        return _read_file(local, source)
    import timm

    if timm.is_model(source):
        return _from_timm(source)
    raise ValueError(
        f"Pretrained source {source!r} is not an existing file, an http(s) URL or a timm model name "
        "(e.g. 'swin_base_patch4_window7_224.ms_in22k'; see timm.list_models('swin*'))."
    )


def load_swin_pretrained(source: str, fmt: str = "auto") -> StateDict:
    """Reads Swin classification weights and returns them in the official layout.

    ``source``: a local file (``{"model": sd}``, ``{"state_dict": sd}`` or ``sd``), an http(s) URL
    (fetched and cached with Detectron2's PathManager), or a timm model name with its pretrained tag.
    ``fmt``: "auto" to detect the layout from the keys, or "official"/"timm" to state it; a stated
    layout that the keys contradict is an error.
    """
    if fmt not in ("auto",) + SWIN_FORMATS:
        raise ValueError(f"Unknown Swin checkpoint format {fmt!r}; expected 'auto', 'official' or 'timm'.")
    state_dict = _read_source(source)
    found = detect_swin_format(state_dict)
    evidence = _layout_evidence(state_dict)
    if fmt != "auto" and evidence is not None and evidence != fmt:
        raise ValueError(
            f"{source} was given as fmt={fmt!r} but its keys are in the {evidence} layout "
            "(official: 'layers.<i>.downsample.*' ends stages 0..n-2; timm: it starts stages 1..n-1); "
            "pass fmt='auto'."
        )
    layout = found if fmt == "auto" else fmt
    return timm_to_official(state_dict) if layout == "timm" else state_dict
