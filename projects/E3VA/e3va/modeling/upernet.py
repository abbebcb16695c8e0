"""UperNet (Xiao et al., 2018, "Unified Perceptual Parsing") as a Detectron2 semantic segmentation head.

The decode head of Swin's segmentation recipe (mmsegmentation's ``UPerHead``): a pyramid pooling
module (PPM) on the coarsest level, a top-down FPN (1x1 lateral convs, 3x3 output convs), every level
upsampled to the finest and concatenated, a 3x3 fusion conv, dropout and a 1x1 classifier. It has
the interface of Detectron2's ``SemSegFPNHead`` (constructor, ``forward(features, targets)``, the
``loss_sem_seg`` loss), so ``SemanticSegmentor`` takes it as is; it is registered in
``SEM_SEG_HEADS_REGISTRY`` as ``"UperNetHead"`` for yacs configs.

Normalization: ``norm`` is any of Detectron2's ``get_norm`` names. The default, ``"GN"``, as Detectron2's
``SemSegFPNHead`` configs use, works at any batch size (with ``conv_dims >= 64``: its 32 groups must each
hold 2+ values on the PPM's 1x1 map). Swin's recipe uses ``"SyncBN"`` (the ADE20K configs do, at 2
images per GPU); outside a distributed run PyTorch's ``SyncBatchNorm`` is plain batch norm, also on
the CPU. In a multi-process run on the CPU (gloo), where PyTorch's ``SyncBatchNorm`` refuses CPU tensors,
the training engine swaps it for Detectron2's ``NaiveSyncBatchNorm``, which syncs the same statistics
over gloo, and logs it (``e3va.engine.distributed.convert_sync_batchnorm_for_cpu``). Unsynced batch norm
fails in training with one image per process: the PPM's 1x1 pooled branch then has a single value per
channel. Use ``"GN"`` there, or ``"SyncBN"`` over 2+ processes.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling.meta_arch.semantic_seg import SEM_SEG_HEADS_REGISTRY
from torch import nn
from torch.nn import functional as F

__all__ = ["PyramidPoolingModule", "UperNetHead"]

Norm = Optional[Union[str, Callable[[int], nn.Module]]]


def _conv_norm_relu(in_channels: int, out_channels: int, kernel_size: int, norm: Norm) -> Conv2d:
    """Conv (no bias under a norm), norm, ReLU: mmcv's ``ConvModule``, with Detectron2's layers."""
    conv = Conv2d(
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        padding=kernel_size // 2,
        bias=not norm,
        norm=get_norm(norm, out_channels),
        activation=F.relu,
    )
    weight_init.c2_msra_fill(conv)
    return conv


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class PyramidPoolingModule(nn.Module):
    """PSPNet's pooling branches: average-pool to ``s x s`` for each scale, 1x1 conv, upsample back."""

    def __init__(self, in_channels: int, channels: int, pool_scales: Sequence[int], norm: Norm) -> None:
        super().__init__()
        self.stages = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), _conv_norm_relu(in_channels, channels, 1, norm))
            for scale in pool_scales
        )

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [_resize(stage(x), x.shape[-2:]) for stage in self.stages]


@SEM_SEG_HEADS_REGISTRY.register()
class UperNetHead(nn.Module):
    """UperNet decode head: PPM + FPN fusion of multi-level features, per-pixel class logits.

    Args:
        input_shape: shapes (channels, stride) of the input features, e.g. a backbone's
            ``output_shape()``; all of them are used, finest to coarsest.
        num_classes: number of classes to predict.
        conv_dims: channels of every conv of the head (Swin's recipe: 512).
        common_stride: stride of the fused features and the logits before upsampling; must be the
            finest input stride (None: take it from ``input_shape``).
        loss_weight: multiplies the cross-entropy loss.
        norm: normalization of every conv but the classifier (``get_norm`` name or callable; see the
            module docstring for the choice).
        ignore_value: target value ignored by the loss (Detectron2's sem-seg convention: 255).
        pool_scales: output sizes of the PPM's pooling branches.
        dropout: ``Dropout2d`` probability before the classifier.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        conv_dims: int = 512,
        common_stride: Optional[int] = None,
        loss_weight: float = 1.0,
        norm: Norm = "GN",
        ignore_value: int = 255,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        shapes = sorted(input_shape.items(), key=lambda item: item[1].stride)
        if not shapes:
            raise ValueError("UperNetHead(input_shape=) cannot be empty!")
        self.in_features = [name for name, _ in shapes]
        strides = [s.stride for _, s in shapes]
        channels = [s.channels for _, s in shapes]
        if common_stride is None:
            common_stride = strides[0]
        if common_stride != strides[0]:
            raise ValueError(
                f"UperNetHead fuses its features at the finest input stride, {strides[0]} "
                f"({self.in_features[0]}), but common_stride={common_stride}."
            )
        if not pool_scales:
            raise ValueError("UperNetHead(pool_scales=) cannot be empty.")
        if norm == "GN" and 1 in pool_scales and conv_dims < 64:
            # get_norm("GN") has 32 groups: on the 1x1 pooled map each group must span 2+ channels.
            raise ValueError(
                f"UperNetHead(norm='GN', conv_dims={conv_dims}): GroupNorm's 32 groups cannot normalize the "
                "PPM's 1x1 branch with fewer than 64 channels; use conv_dims >= 64 or another norm."
            )
        self.common_stride = common_stride
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight

        # PPM on the coarsest level, then its bottleneck: the top of the FPN.
        self.ppm = PyramidPoolingModule(channels[-1], conv_dims, pool_scales, norm)
        self.bottleneck = _conv_norm_relu(channels[-1] + len(pool_scales) * conv_dims, conv_dims, 3, norm)
        # FPN on the other levels.
        self.lateral_convs = nn.ModuleList(_conv_norm_relu(c, conv_dims, 1, norm) for c in channels[:-1])
        self.fpn_convs = nn.ModuleList(_conv_norm_relu(conv_dims, conv_dims, 3, norm) for _ in channels[:-1])
        self.fpn_bottleneck = _conv_norm_relu(len(channels) * conv_dims, conv_dims, 3, norm)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.predictor = Conv2d(conv_dims, num_classes, kernel_size=1)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.zeros_(self.predictor.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> Dict:
        """Reads ``MODEL.SEM_SEG_HEAD`` as ``SemSegFPNHead`` does (``CONVS_DIM`` is ``conv_dims``), plus
        the optional keys ``POOL_SCALES`` and ``DROPOUT``."""
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "ignore_value": head.IGNORE_VALUE,
            "num_classes": head.NUM_CLASSES,
            "conv_dims": head.CONVS_DIM,
            "common_stride": head.COMMON_STRIDE,
            "norm": head.NORM,
            "loss_weight": head.LOSS_WEIGHT,
            "pool_scales": tuple(head.get("POOL_SCALES", (1, 2, 3, 6))),
            "dropout": head.get("DROPOUT", 0.1),
        }

    def forward(
        self, features: Dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None
    ) -> Tuple[Optional[torch.Tensor], Dict[str, torch.Tensor]]:
        """
        Returns:
            In training, ``(None, {"loss_sem_seg": loss})`` (``targets``: N x H x W class indices at the
            input resolution); in inference, ``(N x num_classes x H x W logits at the input resolution, {})``.
        """
        x = self.layers(features)
        if self.training:
            if targets is None:
                raise ValueError("UperNetHead needs `targets` in training mode.")
            return None, self.losses(x, targets)
        x = F.interpolate(x, scale_factor=self.common_stride, mode="bilinear", align_corners=False)
        return x, {}

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Class logits at ``common_stride``."""
        inputs = [features[f] for f in self.in_features]
        top = inputs[-1]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs[:-1])]
        laterals.append(self.bottleneck(torch.cat([top, *self.ppm(top)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        fused = self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(x, size) for x in outs[1:]], dim=1))
        return self.predictor(self.dropout(fused))

    def losses(self, predictions: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Cross-entropy at the targets' resolution, ``ignore_value`` pixels left out; zero (with a
        gradient) when every pixel is ignored, where the mean would be NaN."""
        predictions = predictions.float()  # https://github.com/pytorch/pytorch/issues/48163
        predictions = _resize(predictions, targets.shape[-2:])
        if not (targets != self.ignore_value).any():
            loss = predictions.sum() * 0.0
        else:
            loss = F.cross_entropy(predictions, targets, reduction="mean", ignore_index=self.ignore_value)
        return {"loss_sem_seg": loss * self.loss_weight}
