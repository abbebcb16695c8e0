"""Small builders shared by the tests: tiny models and synthetic Detectron2 batches."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Dict, List, Optional

import torch
from detectron2.config import LazyConfig, instantiate

from e3va import backbone_config_key
from e3va.synthetic import synthetic_batch as _synthetic_batch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def load_tool(name: str):
    """Imports ``tools/<name>.py`` as a module (the tools are scripts, not a package), freshly each call."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(relpath: str):
    """Loads ``configs/<relpath>`` with Detectron2's LazyConfig."""
    return LazyConfig.load(str(CONFIGS / relpath))


TINY_IMAGE = 64  # side of the test images; ViT configs pad to it instead of ViTDet's 1024


def make_tiny(cfg, tuning: Optional[str] = None):
    """Shrinks a config's backbone in place to its "nano" preset (Swin or ViT), for CPU tests; returns
    the backbone's config node. ``tuning`` sets the tuning method."""
    key = backbone_config_key(cfg)
    node = cfg
    for part in key.split(".")[:-1]:
        node = node[part]
    backbone = node[key.split(".")[-1]]
    backbone.size = "nano"
    if key.endswith(".net"):  # ViT + SimpleFeaturePyramid
        backbone.img_size = TINY_IMAGE
        backbone.window_size = 2  # a 4x4 token grid: windowed blocks still see several windows
        node.square_pad = TINY_IMAGE
    if tuning is not None:
        backbone.tuning = tuning
    return backbone


def tiny_detector(relpath: str, tuning: str = "e3va", num_classes: int = 3) -> torch.nn.Module:
    """The detector of a config, on a "nano" trunk, small enough for one CPU step."""
    cfg = load_config(relpath)
    make_tiny(cfg, tuning)
    cfg.model.roi_heads.num_classes = num_classes
    return instantiate(cfg.model)


def perturb(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Adds seeded noise to every parameter of ``module`` (moves a zero-initialised side network off zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def synthetic_batch(batch_size: int = 2, size: int = 64, num_classes: int = 3, seed: int = 0) -> List[Dict]:
    """Detectron2-style training inputs: random images with two box+mask instances each
    (``e3va.synthetic.synthetic_batch``, which the benchmark tool also feeds its models)."""
    return _synthetic_batch(batch_size, size, num_classes, seed, num_instances=2)


# The paper's tuning methods (its Table 1 rows), for tests that go over all of them.
PAPER_METHODS = ["full", "fixed", "bitfit", "norm", "partial1", "adapter", "lora", "adaptformer",
                 "e3va", "e3va_plus", "e3va_plusplus"]


def trunk_outputs_during_training_step(model):
    """Outputs of every trunk module during a training forward, except the highway's own use of the
    inherited patch-merging layers (each called a second time, after the trunk's call, on the highway's
    state, which has a graph)."""
    seen = []
    calls = {}

    def hook(module, args, output):
        calls[module] = calls.get(module, 0) + 1
        if getattr(module, "_in_downsample", False) and calls[module] > 1:
            return
        outs = output if isinstance(output, tuple) else (output,)
        seen.extend(o for o in outs if torch.is_tensor(o))

    for name, module in model.trunk.named_modules():
        module._in_downsample = "downsample" in name
    handles = [m.register_forward_hook(hook) for n, m in model.trunk.named_modules() if not n.startswith("norm")]
    out = model(torch.randn(2, 3, 64, 64))
    for h in handles:
        h.remove()
    return out, seen
