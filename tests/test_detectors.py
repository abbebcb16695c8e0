"""Every config instantiates, and Mask R-CNN / Cascade Mask R-CNN train a step on tiny images."""
import pytest
import torch
from detectron2.config import instantiate
from detectron2.utils.events import EventStorage

from e3va import NANO_SWIN_WEIGHTS, SWIN_PRETRAINED_URLS, VIT_PRETRAINED_CHECKPOINTS, find_tuned_backbone
from e3va.swin import NANO_IMAGE_FORMAT, NANO_PIXEL_MEAN, NANO_PIXEL_STD
from helpers import CONFIGS, load_config, make_tiny, synthetic_batch, tiny_detector

ALL_CONFIGS = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.glob("*/*.py") if p.parent.name != "common")


def test_configs_were_found():
    assert {"COCO/mask_rcnn_swin_t_e3va.py", "COCO/cascade_mask_rcnn_swin_l_e3va.py"} <= set(ALL_CONFIGS)


def _task_models(cfg):
    """The model nodes of a config: its model, or each task's model of a multi-task config
    (``e3va.multitask.MultiTaskModel``, e.g. configs/Shapes/multitask_e3va.py)."""
    models = cfg.model.get("models")
    return [cfg.model] if models is None else [models[name] for name in models if name != "_target_"]


@pytest.mark.parametrize("relpath", ALL_CONFIGS)
def test_every_config_instantiates(relpath):
    cfg = load_config(relpath)
    if "models" not in cfg.model:  # multi-task configs are on the nano trunk already
        make_tiny(cfg)  # the same wiring, a fraction of the build time
    model = instantiate(cfg.model)
    _, backbone = find_tuned_backbone(model)
    assert type(backbone).__name__ == ("E3VAViT" if "_vit_" in relpath else "E3VASwin")
    for key in ("dataloader", "optimizer", "lr_multiplier", "train"):
        assert key in cfg, f"{relpath} lacks `{key}`"


@pytest.mark.parametrize("relpath", sorted(p for p in ALL_CONFIGS if p.startswith("COCO/") and "_swin_" in p))
def test_coco_swin_configs_follow_the_paper_recipe(relpath):
    cfg = load_config(relpath)
    assert cfg.train.init_checkpoint.startswith("https://github.com/SwinTransformer/storage/")
    assert cfg.optimizer._target_ is torch.optim.AdamW
    assert cfg.train.max_iter == 270000
    size = cfg.model.backbone.bottom_up.size
    assert f"swin_{ {'T': 'tiny', 'B': 'base', 'L': 'large'}[size] }_" in cfg.train.init_checkpoint


@pytest.mark.parametrize("relpath", sorted(p for p in ALL_CONFIGS if p.startswith("COCO/") and "_vit_" in p))
def test_coco_vit_configs_follow_the_vitdet_recipe(relpath):
    cfg = load_config(relpath)
    net = cfg.model.backbone.net
    assert (net.size, net.img_size, net.window_size, net.drop_path_rate) == ("B", 1024, 14, 0.1)
    assert cfg.model.backbone.square_pad == 1024
    assert cfg.train.init_checkpoint == VIT_PRETRAINED_CHECKPOINTS["B"]
    assert "mae_pretrain_vit_base.pth" in cfg.train.init_checkpoint
    assert cfg.train.max_iter == 184375 and cfg.dataloader.train.total_batch_size == 64
    assert cfg.optimizer._target_ is torch.optim.AdamW and cfg.optimizer.weight_decay == 0.1
    crop = [a for a in cfg.dataloader.train.mapper.augmentations if "crop_size" in a]
    assert [tuple(a.crop_size) for a in crop] == [(1024, 1024)]  # large-scale jitter
    assert net.tuning == relpath.rsplit("_", 1)[-1][: -len(".py")]


IMAGENET_RGB = ("RGB", (123.675, 116.28, 103.53), (58.395, 57.12, 57.375))  # the official Swin releases
NANO_BGR = (NANO_IMAGE_FORMAT, NANO_PIXEL_MEAN, NANO_PIXEL_STD)  # tools/pretrain_nano_swin.py


@pytest.mark.parametrize("relpath", ALL_CONFIGS)
def test_input_is_normalised_as_the_trunk_was_pretrained(relpath):
    """Detectron2's detector defaults (BGR, std 1) would feed a Swin inputs ~58x too large."""
    cfg = load_config(relpath)
    image_format = cfg.dataloader.train.mapper.image_format
    assert cfg.dataloader.test.mapper.image_format == image_format
    expected = NANO_BGR if cfg.train.init_checkpoint == str(NANO_SWIN_WEIGHTS) else IMAGENET_RGB
    if expected is IMAGENET_RGB:  # the Swin releases and MAE's ViTs were both pretrained so
        known = [*SWIN_PRETRAINED_URLS.values(), *VIT_PRETRAINED_CHECKPOINTS.values()]
        assert cfg.train.init_checkpoint in known, cfg.train.init_checkpoint
    for model in _task_models(cfg):
        if "input_format" in model:
            assert model.input_format == image_format
        found = (image_format, tuple(model.pixel_mean), tuple(model.pixel_std))
        assert found[0] == expected[0], found
        assert found[1] == pytest.approx(expected[1]) and found[2] == pytest.approx(expected[2]), found


@pytest.mark.parametrize(
    "relpath, tuning",
    [
        ("common/models/mask_rcnn_swin_e3va.py", "e3va"),
        ("common/models/cascade_mask_rcnn_swin_e3va.py", "e3va"),
        ("COCO/mask_rcnn_vit_b_losa.py", "losa"),
        ("COCO/cascade_mask_rcnn_vit_b_losa.py", "losa"),
        ("COCO/mask_rcnn_vit_b_e3va.py", "e3va"),
        ("COCO/cascade_mask_rcnn_vit_b_e3va.py", "e3va"),
    ],
)
@pytest.mark.slow
def test_one_training_iteration_updates_only_trainable_parameters(relpath, tuning):
    torch.manual_seed(0)
    model = tiny_detector(relpath, tuning).train()
    _, backbone = find_tuned_backbone(model)
    trunk = backbone.trunk
    frozen_before = {n: p.detach().clone() for n, p in trunk.named_parameters() if not p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    with EventStorage():  # Detectron2's heads log training statistics into it
        losses = model(synthetic_batch())
    assert {"loss_mask", "loss_rpn_cls"} <= set(losses)
    cascade = "cascade" in relpath
    assert ("loss_cls_stage2" in losses) == cascade and ("loss_cls" in losses) != cascade
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    optimizer.step()

    for name, p in trunk.named_parameters():
        if name in frozen_before:
            assert p.grad is None, name
            assert torch.equal(p, frozen_before[name]), name
    side = backbone.side_network
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in side.parameters())

    model.eval()
    with torch.no_grad():
        (result,) = model([{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)}])
    assert "instances" in result
