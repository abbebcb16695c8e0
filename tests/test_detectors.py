"""Every config instantiates, and Mask R-CNN / Cascade Mask R-CNN train a step on tiny images."""
import pytest
import torch
from detectron2.config import instantiate
from detectron2.utils.events import EventStorage

from helpers import CONFIGS, load_config, synthetic_batch, tiny_detector

ALL_CONFIGS = sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.glob("*/*.py") if p.parent.name != "common")


def test_configs_were_found():
    assert {"COCO/mask_rcnn_swin_t_e3va.py", "COCO/cascade_mask_rcnn_swin_l_e3va.py"} <= set(ALL_CONFIGS)


@pytest.mark.parametrize("relpath", ALL_CONFIGS)
def test_every_config_instantiates(relpath):
    cfg = load_config(relpath)
    cfg.model.backbone.bottom_up.size = "nano"  # the same wiring, a fraction of the build time
    model = instantiate(cfg.model)
    assert type(model.backbone.bottom_up).__name__ == "E3VASwin"
    for key in ("dataloader", "optimizer", "lr_multiplier", "train"):
        assert key in cfg, f"{relpath} lacks `{key}`"


@pytest.mark.parametrize("relpath", sorted(p for p in ALL_CONFIGS if p.startswith("COCO/")))
def test_coco_configs_follow_the_paper_recipe(relpath):
    cfg = load_config(relpath)
    assert cfg.train.init_checkpoint.startswith("https://github.com/SwinTransformer/storage/")
    assert cfg.optimizer._target_ is torch.optim.AdamW
    assert cfg.train.max_iter == 270000
    size = cfg.model.backbone.bottom_up.size
    assert f"swin_{ {'T': 'tiny', 'B': 'base', 'L': 'large'}[size] }_" in cfg.train.init_checkpoint


@pytest.mark.parametrize(
    "relpath", ["common/models/mask_rcnn_swin_e3va.py", "common/models/cascade_mask_rcnn_swin_e3va.py"]
)
def test_one_training_iteration_updates_only_trainable_parameters(relpath):
    torch.manual_seed(0)
    model = tiny_detector(relpath).train()
    trunk = model.backbone.bottom_up.trunk
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
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.bottom_up.highway.parameters())

    model.eval()
    with torch.no_grad():
        (result,) = model([{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)}])
    assert "instances" in result
