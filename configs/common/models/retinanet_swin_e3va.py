"""RetinaNet with FPN on an E3VA-tuned Swin: Detectron2's model-zoo RetinaNet, Swin bottom-up.

RetinaNet predicts on P3-P7 (strides 8-128): the FPN takes the Swin's p1..p3 (strides 8, 16, 32, which
the FPN names P3-P5 from their strides) and ``LastLevelP6P7`` adds P6 and P7 from the FPN's own P5
output, as Detectron2's FCOS config does (Sec. 2.2 of arXiv:2006.09214; the model-zoo ResNet RetinaNet
feeds it C5 instead).
Choose the tuning method with one override: ``model.backbone.bottom_up.tuning=e3va_plus``.
"""
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling.backbone.fpn import LastLevelP6P7

from .e3va_swin import e3va_swin
from .swin_input import use_swin_input

model = use_swin_input(model_zoo.get_config("common/models/retinanet.py").model)
model.backbone.bottom_up = e3va_swin(out_features=("p1", "p2", "p3"))
model.backbone.in_features = "${.bottom_up.out_features}"
# FPN.forward looks ``in_feature`` up among the bottom-up outputs first, then among its own. "p5" is
# not a Swin output name (those are p0..p3, where the Swin's "p3" is stride 32, not the FPN's stride-8
# P3), so P6 is computed from the FPN's P5 (256 channels, out_channels).
model.backbone.top_block = L(LastLevelP6P7)(
    in_channels="${..out_channels}", out_channels="${..out_channels}", in_feature="p5"
)
