"""Semantic segmentation on an E3VA-tuned Swin, through Detectron2's ``SemanticSegmentor``.

``model``: UperNet (``e3va.modeling.UperNetHead``, Swin's segmentation recipe: PPM + FPN fusion,
512 channels, SyncBN) on the Swin's p0..p3 (strides 4..32). The Swin sits under an ``IdentityNeck``,
which passes its features through, so that it lives at ``model.backbone.bottom_up`` as in the detection
configs, and the tuning method is the same one override:
``model.backbone.bottom_up.tuning=e3va_plus`` (see ``e3va.TUNING_METHODS``).

``model_fpn``: the light alternative, Detectron2's own ``SemSegFPNHead`` (Panoptic FPN's semantic
branch: 128 channels, GN) on Detectron2's ``FPN`` (256 channels) over the same Swin, also at
``model.backbone.bottom_up``. A config selects it with
``from ..common.models.semantic_seg_swin_e3va import model_fpn as model``.

Both normalize RGB input with the ImageNet statistics of the Swin releases (Detectron2's
``imagenet_rgb256_mean/std``); use ``image_format="RGB"`` in the data mapper. ``num_classes`` is
ADE20K-150's and ``ignore_value`` Detectron2's 255; dataset configs set their own.
"""
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling import FPN, SemanticSegmentor
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead

from e3va.modeling import IdentityNeck, UperNetHead, swin_output_shape

from .e3va_swin import e3va_swin

_constants = model_zoo.get_config("common/data/constants.py").constants


model = L(SemanticSegmentor)(
    backbone=L(IdentityNeck)(bottom_up=e3va_swin(), in_features="${.bottom_up.out_features}"),
    sem_seg_head=L(UperNetHead)(
        # Channels follow the Swin's size (and its overrides): no need to build the backbone first.
        input_shape=L(swin_output_shape)(
            size="${...backbone.bottom_up.size}", out_features="${...backbone.in_features}"
        ),
        num_classes=150,
        conv_dims=512,
        common_stride=4,
        loss_weight=1.0,
        norm="SyncBN",  # Swin's recipe; "GN" for one image per GPU (see e3va.modeling.upernet)
        ignore_value=255,
        pool_scales=(1, 2, 3, 6),
        dropout=0.1,
    ),
    pixel_mean=_constants.imagenet_rgb256_mean,
    pixel_std=_constants.imagenet_rgb256_std,
)

model_fpn = L(SemanticSegmentor)(
    backbone=L(FPN)(
        bottom_up=e3va_swin(),
        in_features="${.bottom_up.out_features}",
        out_channels=256,
        top_block=None,
    ),
    sem_seg_head=L(SemSegFPNHead)(
        # FPN names its outputs by stride: p2..p5 for strides 4..32.
        input_shape={
            f: L(ShapeSpec)(stride=s, channels="${....backbone.out_channels}")
            for f, s in zip(["p2", "p3", "p4", "p5"], [4, 8, 16, 32])
        },
        num_classes=150,
        conv_dims=128,
        common_stride=4,
        loss_weight=1.0,
        norm="GN",
        ignore_value=255,
    ),
    pixel_mean=_constants.imagenet_rgb256_mean,
    pixel_std=_constants.imagenet_rgb256_std,
)
