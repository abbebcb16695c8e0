"""LazyConfig overrides that catch typos.

Detectron2's ``LazyConfig.apply_overrides`` creates any key it is given, so ``train.max_iters=3`` trains for
the config's ``train.max_iter`` and says nothing. Here an override must name an existing key, a parameter
of the ``LazyCall`` it lands in (``model.backbone.bottom_up.rank=8`` where the config leaves ``rank`` at
its default), or one of the optional keys the tools read with ``cfg.train.get`` (:data:`OPTIONAL_KEYS`).
Anything else is an error naming the closest keys. Hydra's ``+key=value`` still adds a new key.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Any, Iterator, List, Optional, Sequence, Tuple

from detectron2.config import LazyConfig
from omegaconf import DictConfig, ListConfig

__all__ = ["OPTIONAL_KEYS", "ConfigOverrideError", "apply_overrides", "load_config"]

# Keys that configs may leave out and that are read with a default; overriding them is not a typo.
OPTIONAL_KEYS = {
    "train.seed": "Detectron2's default_setup (seeds the generators; -1 or absent: a random seed)",
    "train.cudnn_benchmark": "Detectron2's default_setup",
    "train.float32_precision": "Detectron2's default_setup",
    "train.trainable_checkpoint": "a trainable-only file loaded on top of train.init_checkpoint",
    "train.trainable_only_checkpoints": "write trainable-only checkpoints",
    "train.allow_overwrite": "let a fresh run write into an output_dir that holds checkpoints",
}


class ConfigOverrideError(ValueError):
    """An override names a key that the config does not have."""


def _target_of(node: DictConfig) -> Optional[Any]:
    """The callable of a ``LazyCall`` node, or None."""
    target = node.get("_target_") if "_target_" in node else None
    if isinstance(target, str):
        from detectron2.utils.registry import locate

        try:
            target = locate(target)
        except Exception:  # an unresolvable target: instantiate() will name it
            return None
    return target


def _parameters(target: Any) -> Tuple[List[str], bool]:
    """The keyword names ``target`` accepts, and whether it takes ``**kwargs`` (then any name)."""
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: do not guess
        return [], True
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"]
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def _get(node: Any, part: Any) -> Any:
    try:
        return node[part]
    except Exception:  # an interpolation that does not resolve yet: a leaf for our purposes
        return None


def _child(node: Any, part: str) -> Tuple[bool, Any]:
    """``(exists, child)`` of a config node; list items are addressed by index."""
    if isinstance(node, DictConfig):
        return (True, _get(node, part)) if part in node else (False, None)
    if isinstance(node, ListConfig) and part.lstrip("-").isdigit() and -len(node) <= int(part) < len(node):
        return True, _get(node, int(part))
    return False, None


def _all_keys(node: Any, prefix: str = "") -> Iterator[str]:
    """Every dotted key of the config, with the accepted parameters of its ``LazyCall`` nodes."""
    if isinstance(node, DictConfig):
        names = [k for k in node.keys() if k != "_target_"]
        target = _target_of(node)
        if target is not None:
            names += [n for n in _parameters(target)[0] if n not in names]
        for name in names:
            key = f"{prefix}{name}"
            yield key
            if name in node:
                yield from _all_keys(_get(node, name), key + ".")
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            yield from _all_keys(item, f"{prefix}{i}.")


def _closest(key: str, cfg: DictConfig) -> List[str]:
    candidates = sorted(set(_all_keys(cfg)) | set(OPTIONAL_KEYS))
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.6)
    if not close:  # a typo in an early part of a long key: compare the last part alone
        leaf = key.rpartition(".")[2]
        close = [c for c in candidates if difflib.get_close_matches(leaf, [c.rpartition(".")[2]], cutoff=0.75)][:3]
    return close


def check_override_key(cfg: DictConfig, key: str, override: str) -> None:
    """Raises :class:`ConfigOverrideError` unless ``key`` exists in ``cfg``, is a parameter of the
    ``LazyCall`` it lands in, or is in :data:`OPTIONAL_KEYS`."""
    if key in OPTIONAL_KEYS:
        return
    node: Any = cfg
    parts = key.split(".")
    for depth, part in enumerate(parts):
        exists, child = _child(node, part)
        if exists:
            node = child
            continue
        parent = ".".join(parts[:depth]) or "the config"
        target = _target_of(node) if isinstance(node, DictConfig) else None
        if target is not None:
            accepted, any_name = _parameters(target)
            if any_name or part in accepted:
                return  # a constructor argument the config leaves at its default
            name = getattr(target, "__qualname__", repr(target))
            close = difflib.get_close_matches(part, accepted, n=3)
            raise ConfigOverrideError(
                f"Override {override!r}: {parent} builds {name}, which takes no parameter {part!r}"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + f". It accepts: {', '.join(accepted)}."
            )
        close = _closest(key, cfg)
        raise ConfigOverrideError(
            f"Override {override!r}: the config has no key {key!r} ({parent} has no {part!r})."
            + (f" Closest existing keys: {', '.join(close)}." if close else "")
            + f" To add a new key on purpose, write +{override.lstrip('+')}."
        )


def apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """``LazyConfig.apply_overrides`` after checking that every override names an existing key
    (``+key=value`` adds one); raises :class:`ConfigOverrideError` naming the closest keys."""
    overrides = list(overrides)
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    for override, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides)):
        if parsed.type in (OverrideType.ADD, OverrideType.FORCE_ADD):
            continue  # "+key=value": adding is what the user asked for
        check_override_key(cfg, parsed.key_or_group, override)
    return LazyConfig.apply_overrides(cfg, overrides)


def load_config(config_file: str, overrides: Sequence[str] = ()) -> DictConfig:
    """``LazyConfig.load(config_file)`` with ``overrides`` applied through :func:`apply_overrides`."""
    return apply_overrides(LazyConfig.load(config_file), overrides)
