"""The input normalisation of Swin's ImageNet releases, for Detectron2 detectors built on them.

Detectron2's model-zoo detectors default to the Caffe2 ResNets' convention (BGR, mean subtracted, std 1):
a Swin trunk fed that sees inputs about 58 times larger than in its pretraining. The official Swin
weights were trained on RGB images in 0-255, normalised by ImageNet's mean and std.
"""
from detectron2 import model_zoo

_constants = model_zoo.get_config("common/data/constants.py").constants

SWIN_IMAGE_FORMAT = "RGB"  # data mappers read images in this order (``image_format``)


def use_swin_input(model):
    """Sets a detector config's ``pixel_mean``, ``pixel_std`` and ``input_format`` to the Swin releases';
    returns it."""
    model.pixel_mean = _constants.imagenet_rgb256_mean
    model.pixel_std = _constants.imagenet_rgb256_std
    model.input_format = SWIN_IMAGE_FORMAT
    return model
