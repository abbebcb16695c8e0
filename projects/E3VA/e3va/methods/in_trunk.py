"""The paper's comparison methods that insert modules *inside* the trunk: adapter, LoRA, AdaptFormer.

They work on any trunk whose blocks have ``norm1``, ``attn.proj``, ``norm2`` and ``mlp.fc2`` (Detectron2's
Swin and ViT blocks both do); each takes the trunk and its blocks in order.

Unlike E3VA's highway they sit on the trunk's forward path, so training them backpropagates through the
trunk. Each keeps every original parameter name (extra modules hang under the layer they adapt, and
PEFT's ``base_layer`` renaming is undone by ``e3va.checkpoint`` when loading), so pretrained checkpoints
load into any method.
"""
from __future__ import annotations

from typing import Callable, Sequence

from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from .base import TrunkLayout, TrunkPredicate, TuningMethod, TuningOptions, register_tuning_method

__all__ = ["BottleneckAdapter", "insert_lora", "insert_parallel_mlp_adapters", "insert_sequential_adapters"]


class BottleneckAdapter(nn.Module):
    """``scale * up(act(down(x)))``, the standard adapter; ``up`` starts at zero."""

    def __init__(self, dim: int, bottleneck: int, scale: float = 1.0) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim)
        self.scale = scale
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.scale * self.up(self.act(self.down(x)))


def _add_to_output(module: nn.Module, output_adapter: nn.Module) -> None:
    """Makes ``module`` return ``out + adapter(out)`` (a sequential adapter with its own skip)."""
    module.adapter = output_adapter
    module.register_forward_hook(lambda mod, args, out: out + mod.adapter(out))


def insert_sequential_adapters(trunk: nn.Module, blocks: Sequence[nn.Module], bottleneck: int = 64) -> None:
    """Houlsby-style adapters after the attention output projection and after the MLP of every block."""
    for block in blocks:
        dim = block.norm1.normalized_shape[0]
        _add_to_output(block.attn.proj, BottleneckAdapter(dim, bottleneck))
        _add_to_output(block.mlp.fc2, BottleneckAdapter(dim, bottleneck))


def insert_parallel_mlp_adapters(
    trunk: nn.Module, blocks: Sequence[nn.Module], bottleneck: int = 128, scale: float = 0.1
) -> None:
    """AdaptFormer: ``h + MLP(LN(h)) + s * adapter(h)`` in every block, the adapter inside the trunk."""
    for block in blocks:
        dim = block.norm1.normalized_shape[0]
        block.mlp.adaptformer = BottleneckAdapter(dim, bottleneck, scale)
        # The MLP sees LN(h); the adapter reads h itself, the input of norm2, kept until the MLP returns.
        block.norm2.register_forward_pre_hook(_remember_input(block.mlp))
        block.mlp.register_forward_hook(_add_parallel_branch)


def _remember_input(mlp: nn.Module):
    def hook(module, args):
        mlp._adapter_input = args[0]

    return hook


def _add_parallel_branch(mlp: nn.Module, args, out):
    h, mlp._adapter_input = mlp._adapter_input, None
    return out + mlp.adaptformer(h)


def insert_lora(trunk: nn.Module, blocks: Sequence[nn.Module], rank: int = 16, alpha: int = 32) -> None:
    """LoRA on every attention ``qkv`` and output ``proj``, through PEFT (which finds them by name in
    ``trunk``: every block's ``attn.qkv`` and ``attn.proj``)."""
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=r".*attn\.(qkv|proj)")
    inject_adapter_in_model(config, trunk)


def _named(*fragments: str) -> TrunkPredicate:
    return lambda name, last_block: any(f in name for f in fragments)


def _inserting(insert: Callable[..., None], takes_rank: bool = False):
    """An ``attach`` that inserts modules into the trunk's blocks (``rank`` passed on when given)."""

    def attach(layout: TrunkLayout, options: TuningOptions) -> None:
        kwargs = {"rank": options.rank} if takes_rank and options.rank is not None else {}
        insert(layout.trunk, layout.blocks, **kwargs)

    return attach


for _name, _fragment, _insert, _takes_rank in (
    ("adapter", ".adapter.", insert_sequential_adapters, False),
    ("lora", "lora_", insert_lora, True),
    ("adaptformer", ".adaptformer.", insert_parallel_mlp_adapters, False),
):
    register_tuning_method(TuningMethod(
        _name, trunk_trainable=_named(_fragment), train_out_norms=True, attach=_inserting(_insert, _takes_rank),
        options=("rank",) if _takes_rank else (),
    ))
