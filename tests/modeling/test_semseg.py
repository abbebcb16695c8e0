"""Semantic segmentation: the UperNet head, the shapes semantic labels, and the sem-seg configs (Shapes,
ADE20K, the FPN-head alternative) training a step on the CPU with every tuning method."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, List

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, get_cfg, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.engine import default_argument_parser
from detectron2.evaluation import SemSegEvaluator
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_sem_seg_head
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead
from detectron2.utils.events import EventStorage
from pycocotools.coco import COCO

from e3va import NANO_SWIN_WEIGHTS, SWIN_PRETRAINED_URLS, TUNING_METHODS, E3VASwin
from e3va.data.sem_seg import load_sem_seg_label
from e3va.data.shapes import (
    SHAPES_SEM_SEG_BACKGROUND,
    SHAPES_SEM_SEG_CLASSES,
    ensure_shapes_sem_seg_dataset,
    generate_shapes_dataset,
    generate_shapes_sem_seg,
    register_shapes_datasets,
)
from e3va.engine import training as tool
from e3va.modeling import IdentityNeck, UperNetHead, swin_output_shape

from helpers import CONFIGS, load_config

SHAPES_CONFIG = "Shapes/semseg_upernet_e3va.py"
ADE_CONFIGS = {"ADE20K/upernet_swin_b_e3va.py": "B", "ADE20K/upernet_swin_l_e3va.py": "L"}
COMMON_MODELS = "common/models/semantic_seg_swin_e3va.py"
NAMES = ("t_semseg_coco_train", "t_semseg_coco_val")
SEM_NAMES = ("t_semseg_train", "t_semseg_val")


def _files(root: Path) -> Dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def sem_seg_batch(
    num_classes: int, batch_size: int = 2, height: int = 64, width: int = 96, seed: int = 0
) -> List[Dict]:
    """Training inputs with ``sem_seg`` targets; a corner of each target is 255 (ignored)."""
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(batch_size):
        target = torch.randint(0, num_classes, (height, width), generator=g)
        target[: height // 4, : width // 4] = 255
        image = torch.randint(0, 256, (3, height, width), generator=g, dtype=torch.uint8)
        batch.append({"image": image, "sem_seg": target, "height": height, "width": width})
    return batch


def train_one_step(model: torch.nn.Module, num_classes: int, optimizer=None) -> Dict[str, torch.Tensor]:
    """One forward, backward and optimizer step; checks the frozen trunk stays as it was."""
    model.train()
    bottom_up = model.backbone.bottom_up
    frozen = {n: p.detach().clone() for n, p in bottom_up.trunk.named_parameters() if not p.requires_grad}
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with EventStorage():
        losses = model(sem_seg_batch(num_classes))
    assert set(losses) == {"loss_sem_seg"} and torch.isfinite(losses["loss_sem_seg"])
    losses["loss_sem_seg"].backward()
    optimizer.step()
    for name, p in bottom_up.trunk.named_parameters():
        if name in frozen:
            assert p.grad is None and torch.equal(p, frozen[name]), name
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)}])
    assert out["sem_seg"].shape == (num_classes, 50, 70)
    return losses


def _tiny(cfg, conv_dims: int = 32):
    """Nano Swin and a narrow head: the config's wiring at a fraction of the cost."""
    cfg.model.backbone.bottom_up.size = "nano"
    cfg.model.sem_seg_head.conv_dims = conv_dims
    return cfg


# ---------------------------------------------------------------------------------------- the head
def _features(shapes: Dict[str, ShapeSpec], size: int = 64, batch: int = 2) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        f: torch.randn(batch, s.channels, size // s.stride, size // s.stride, generator=g) for f, s in shapes.items()
    }


def test_swin_output_shape_matches_the_backbone_and_identity_neck_passes_features():
    backbone = E3VASwin("nano").eval()  # no drop path
    assert swin_output_shape("nano") == backbone.output_shape()
    assert swin_output_shape("B", ("p1", "p3")) == {
        "p1": ShapeSpec(channels=256, stride=8), "p3": ShapeSpec(channels=1024, stride=32)}
    neck = IdentityNeck(backbone, in_features=["p0", "p2"])
    assert neck.output_shape() == {k: v for k, v in backbone.output_shape().items() if k in ("p0", "p2")}
    assert neck.size_divisibility == 32
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out, ref = neck(x), backbone(x)
    assert set(out) == {"p0", "p2"} and torch.equal(out["p2"], ref["p2"])
    with pytest.raises(ValueError, match="p9"):
        IdentityNeck(backbone, in_features=["p9"])


def test_upernet_head_shapes_and_cross_entropy_with_ignore_value():
    torch.manual_seed(0)
    shapes = swin_output_shape("nano")
    head = UperNetHead(shapes, num_classes=5, conv_dims=64, norm="GN", ignore_value=255)
    assert head.in_features == ["p0", "p1", "p2", "p3"] and head.common_stride == 4
    assert len(head.ppm.stages) == 4 and len(head.lateral_convs) == len(head.fpn_convs) == 3
    features = _features(shapes)

    head.eval()
    logits, losses = head(features)
    assert logits.shape == (2, 5, 64, 64) and losses == {}

    head.train()
    head.dropout = torch.nn.Identity()  # so the two passes below see the same logits
    targets = torch.randint(0, 5, (2, 64, 64))
    targets[:, :20] = 255
    none, losses = head(features, targets)
    assert none is None and set(losses) == {"loss_sem_seg"}
    # The loss is the cross-entropy of the upsampled logits over the pixels that are not 255 ...
    upsampled = torch.nn.functional.interpolate(head.layers(features), size=(64, 64), mode="bilinear",
                                                align_corners=False)
    valid = targets != 255
    expected = torch.nn.functional.cross_entropy(upsampled.permute(0, 2, 3, 1)[valid], targets[valid])
    assert losses["loss_sem_seg"].item() == pytest.approx(expected.item(), rel=1e-5)
    # ... so the ignored pixels get no gradient: the upsampled logits' gradient is exactly zero there and
    # not elsewhere (the head's own upsampling, caught by a hook on its output),
    grads = []
    original = torch.nn.functional.interpolate

    def capture(*args, **kwargs):
        out = original(*args, **kwargs)
        if out.requires_grad and out.shape[-2:] == (64, 64):
            out.register_hook(grads.append)
        return out

    torch.nn.functional.interpolate = capture
    try:
        head(features, targets)[1]["loss_sem_seg"].backward()
    finally:
        torch.nn.functional.interpolate = original
    (grad,) = grads
    assert torch.all(grad.permute(0, 2, 3, 1)[~valid] == 0)
    assert torch.all(grad.abs().sum(1)[valid] > 0)
    # and an all-ignored target gives a zero loss, not NaN, that still backpropagates.
    empty = head(features, torch.full((2, 64, 64), 255))[1]["loss_sem_seg"]
    assert empty.item() == 0.0
    empty.backward()
    assert head.predictor.weight.grad is not None

    weighted = UperNetHead(shapes, num_classes=5, conv_dims=64, loss_weight=0.0).train()
    assert weighted(features, targets)[1]["loss_sem_seg"].item() == 0.0
    with pytest.raises(ValueError, match="targets"):
        head(features)
    with pytest.raises(ValueError, match="common_stride=8"):
        UperNetHead(shapes, num_classes=5, common_stride=8)
    with pytest.raises(ValueError, match="conv_dims=32"):  # GroupNorm cannot normalize the 1x1 branch
        UperNetHead(shapes, num_classes=5, conv_dims=32, norm="GN")
    UperNetHead(shapes, num_classes=5, conv_dims=32, norm="BN", pool_scales=(1, 2)).train()(features, targets)


def test_upernet_head_builds_from_a_yacs_config():
    cfg = get_cfg()
    cfg.MODEL.SEM_SEG_HEAD.NAME = "UperNetHead"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["p0", "p1", "p2", "p3"]
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 7
    cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM = 64
    cfg.MODEL.SEM_SEG_HEAD.POOL_SCALES = [1, 2]
    head = build_sem_seg_head(cfg, {**swin_output_shape("nano"), "extra": ShapeSpec(channels=3, stride=2)})
    assert isinstance(head, UperNetHead) and head.in_features == ["p0", "p1", "p2", "p3"]
    assert len(head.ppm.stages) == 2 and head.ignore_value == 255 and head.predictor.out_channels == 7


# ------------------------------------------------------------------------------- shapes semantic labels
@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    """Tiny shapes splits registered under test names, both as COCO and as semantic segmentation."""
    root = tmp_path_factory.mktemp("shapes_semseg")
    register_shapes_datasets(root, num_train=4, num_val=4, names=NAMES, sem_seg_names=SEM_NAMES)
    yield root
    for name in NAMES + SEM_NAMES:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_semantic_labels_agree_with_the_coco_instance_masks(shapes_root):
    meta = MetadataCatalog.get(SEM_NAMES[1])
    assert meta.evaluator_type == "sem_seg" and meta.ignore_label == 255
    assert meta.stuff_classes == list(SHAPES_SEM_SEG_CLASSES) == ["circle", "square", "triangle", "star", "background"]
    assert not (shapes_root / "val_sem_seg").exists()  # registration alone generates nothing

    dicts = DatasetCatalog.get(SEM_NAMES[1])  # Detectron2's load_sem_seg, after generating the files
    coco_files = _files(shapes_root)
    assert len(dicts) == 4
    coco = COCO(str(shapes_root / "val.json"))
    by_name = {im["file_name"]: im["id"] for im in coco.loadImgs(coco.getImgIds())}
    some_class = set()
    for d in dicts:
        label = cv2.imread(d["sem_seg_file_name"], cv2.IMREAD_UNCHANGED)
        assert label.dtype == np.uint8 and label.shape == (128, 128)
        assert Path(d["sem_seg_file_name"]).name == Path(d["file_name"]).name
        covered = np.zeros_like(label, dtype=bool)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=by_name[Path(d["file_name"]).name])):
            mask = coco.annToMask(ann).astype(bool)
            assert (label[mask] == ann["category_id"] - 1).all()  # each visible instance carries its class
            covered |= mask
            some_class.add(ann["category_id"] - 1)
        assert (label[~covered] == SHAPES_SEM_SEG_BACKGROUND).all()  # the rest is background, nothing ignored
    assert len(some_class) >= 2

    # Up to date: nothing rewritten; the COCO files are left exactly as they were.
    label_dir = ensure_shapes_sem_seg_dataset(SEM_NAMES[1])
    stamp = (label_dir / "000000.png").stat().st_mtime_ns
    assert generate_shapes_sem_seg(shapes_root, "val", num_images=4) == label_dir
    assert (label_dir / "000000.png").stat().st_mtime_ns == stamp
    assert {k: v for k, v in _files(shapes_root).items() if not k.startswith("val_sem_seg")} == {
        k: v for k, v in coco_files.items() if not k.startswith("val_sem_seg")}


def test_semantic_labels_are_deterministic_and_leave_coco_output_unchanged(tmp_path):
    generate_shapes_dataset(tmp_path / "coco_only", "val", num_images=3, image_size=64, seed=5)
    generate_shapes_sem_seg(tmp_path / "a", "val", num_images=3, image_size=64, seed=5)
    generate_shapes_sem_seg(tmp_path / "b", "val", num_images=3, image_size=64, seed=5)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a == b
    assert {k: v for k, v in a.items() if not k.startswith("val_sem_seg/")} == _files(tmp_path / "coco_only")
    assert sorted(k for k in a if k.startswith("val_sem_seg/")) == [
        "val_sem_seg/000000.png", "val_sem_seg/000001.png", "val_sem_seg/000002.png", "val_sem_seg/info.json"]
    # Missing labels are regenerated; other parameters regenerate everything.
    (tmp_path / "a" / "val_sem_seg" / "000001.png").unlink()
    generate_shapes_sem_seg(tmp_path / "a", "val", num_images=3, image_size=64, seed=5)
    assert _files(tmp_path / "a") == b
    generate_shapes_sem_seg(tmp_path / "a", "val", num_images=2, image_size=64, seed=5)
    assert sorted(p.name for p in (tmp_path / "a" / "val_sem_seg").glob("*.png")) == ["000000.png", "000001.png"]


def test_default_semantic_registration_and_label_reader(tmp_path):
    assert MetadataCatalog.get("shapes_sem_seg_val").evaluator_type == "sem_seg"  # import e3va registers them
    label = np.array([[0, 4], [255, 2]], np.uint8)
    cv2.imwrite(str(tmp_path / "l.png"), label)
    read = load_sem_seg_label(str(tmp_path / "l.png"), dtype=int)  # what SemSegEvaluator calls
    assert read.dtype == int and (read == label).all()


# ------------------------------------------------------------------------------------ the Shapes config
def test_shapes_config_trains_and_evaluates_miou_through_the_training_tool(shapes_root, tmp_path, restore_loggers):
    out = tmp_path / "out"
    args = default_argument_parser().parse_args([
        "--config-file", str(CONFIGS / SHAPES_CONFIG),
        f"dataloader.train.dataset.names={SEM_NAMES[0]}",
        f"dataloader.test.dataset.names={SEM_NAMES[1]}",
        "dataloader.train.num_workers=0", "dataloader.test.num_workers=0",
        "dataloader.train.total_batch_size=2",
        "train.max_iter=2", "train.eval_period=2", "train.checkpointer.period=100",
        f"train.output_dir={out}",
    ])
    results = tool.main(args)["sem_seg"]
    assert {"mIoU", "pACC", "fwIoU", "mACC", "IoU-background"} <= set(results)
    assert 0.0 <= results["mIoU"] <= 100.0 and 0.0 <= results["pACC"] <= 100.0
    assert (out / "model_final.pth").is_file()

    cfg = load_config(SHAPES_CONFIG)
    assert cfg.train.device == "cpu" and cfg.train.init_checkpoint == str(NANO_SWIN_WEIGHTS)
    assert cfg.model.sem_seg_head.num_classes == 5 and cfg.dataloader.evaluator._target_ is SemSegEvaluator


def test_shapes_config_starts_from_the_nano_weights():
    cfg = load_config(SHAPES_CONFIG)
    model = instantiate(cfg.model)
    tool.build_checkpointer(model).load(cfg.train.init_checkpoint)
    nano = torch.load(NANO_SWIN_WEIGHTS, weights_only=True)["model"]
    assert torch.equal(model.backbone.bottom_up.trunk.patch_embed.proj.weight, nano["patch_embed.proj.weight"])


@pytest.mark.parametrize("tuning", sorted(TUNING_METHODS))
def test_every_tuning_method_trains_a_step_on_the_shapes_config(tuning):
    torch.manual_seed(0)
    cfg = LazyConfig.apply_overrides(load_config(SHAPES_CONFIG), [f"model.backbone.bottom_up.tuning={tuning}"])
    model = instantiate(cfg.model)
    bottom_up = model.backbone.bottom_up
    assert bottom_up.method.name == tuning
    train_one_step(model, num_classes=5)
    trained = [n for n, p in bottom_up.named_parameters() if p.requires_grad]
    if tuning == "fixed":
        assert not trained
    else:
        missing = [n for n, p in bottom_up.named_parameters() if p.requires_grad and p.grad is None]
        assert trained and not missing, missing


# ------------------------------------------------------------------------------------ ADE20K configs
@pytest.mark.parametrize("relpath", sorted(ADE_CONFIGS))
def test_ade20k_config_follows_the_swin_recipe_and_names_the_builtin_datasets(relpath):
    cfg = load_config(relpath)
    size = ADE_CONFIGS[relpath]
    meta = MetadataCatalog.get("ade20k_sem_seg_val")  # Detectron2's builtin registration, not loaded here
    assert cfg.dataloader.train.dataset.names == "ade20k_sem_seg_train"
    assert cfg.dataloader.test.dataset.names == "ade20k_sem_seg_val"
    assert cfg.dataloader.evaluator._target_ is SemSegEvaluator
    assert cfg.dataloader.evaluator.dataset_name == "ade20k_sem_seg_val"  # the interpolation, resolved
    assert cfg.model.sem_seg_head.num_classes == len(meta.stuff_classes) == 150
    assert cfg.model.sem_seg_head.ignore_value == meta.ignore_label == 255
    assert cfg.model.sem_seg_head._target_ is UperNetHead and cfg.model.sem_seg_head.conv_dims == 512
    assert cfg.dataloader.train.total_batch_size == 16 and cfg.train.max_iter == 160000
    assert cfg.dataloader.train.mapper.image_format == "RGB" and cfg.dataloader.train.mapper.is_train
    crop = [a for a in cfg.dataloader.train.mapper.augmentations if "crop_size" in a][0]
    assert tuple(crop.crop_size) == (512, 512) and crop.ignored_category == 255
    assert cfg.optimizer._target_ is torch.optim.AdamW
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (6e-5, 0.01)
    bottom_up = cfg.model.backbone.bottom_up
    assert bottom_up._target_ is E3VASwin and (bottom_up.size, bottom_up.window_size) == (size, 12)
    key = f"{size}_in22k_w12"
    assert cfg.train.init_checkpoint == SWIN_PRETRAINED_URLS[key]
    assert f"swin_{ {'B': 'base', 'L': 'large'}[size] }_patch4_window12_384_22k" in cfg.train.init_checkpoint

    lr = instantiate(cfg.lr_multiplier)
    assert lr(0.0) == pytest.approx(1e-6) and lr(1500 / 160000) == pytest.approx(1 - 1500 / 160000, rel=1e-3)
    assert lr(0.5) == pytest.approx(0.5) and lr(0.999) == pytest.approx(0.001, abs=1e-6)


@pytest.mark.parametrize("relpath", sorted(ADE_CONFIGS))
def test_ade20k_config_trains_a_step_on_a_synthetic_batch(relpath):
    torch.manual_seed(0)
    cfg = _tiny(load_config(relpath))
    model = instantiate(cfg.model)
    assert isinstance(model.backbone, IdentityNeck) and model.backbone.bottom_up.trunk.layers[0].window_size == 12
    assert isinstance(model.sem_seg_head.ppm.stages[0][1].norm, torch.nn.SyncBatchNorm)  # plain BN on the CPU
    optimizer = tool.build_optimizer(cfg, model)  # the config's AdamW and its parameter groups
    losses = train_one_step(model, num_classes=150, optimizer=optimizer)
    assert losses["loss_sem_seg"].item() == pytest.approx(np.log(150), rel=0.2)  # a fresh classifier


def test_ade20k_train_mapper_crops_image_and_labels_together(tmp_path):
    cfg = load_config("ADE20K/upernet_swin_b_e3va.py")
    mapper = instantiate(cfg.dataloader.train.mapper)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    label = np.zeros((300, 400), np.uint8)
    label[100:200, 150:300] = 7
    label[:20] = 255
    cv2.imwrite(str(tmp_path / "a.jpg"), image)
    cv2.imwrite(str(tmp_path / "a.png"), label)
    for _ in range(3):
        out = mapper({"file_name": str(tmp_path / "a.jpg"), "sem_seg_file_name": str(tmp_path / "a.png")})
        h, w = out["image"].shape[1:]
        assert out["image"].shape[0] == 3 and h <= 512 and w <= 512 and out["sem_seg"].shape == (h, w)
        assert set(out["sem_seg"].unique().tolist()) <= {0, 7, 255}


# ------------------------------------------------------------------------------ the FPN-head alternative
def test_fpn_head_alternative_trains_a_step():
    torch.manual_seed(0)
    cfg = load_config(COMMON_MODELS)
    cfg.model_fpn.backbone.bottom_up.size = "nano"
    cfg.model_fpn.sem_seg_head.num_classes = 5
    model = instantiate(cfg.model_fpn)
    assert isinstance(model.sem_seg_head, SemSegFPNHead)
    assert type(model.backbone).__name__ == "FPN" and isinstance(model.backbone.bottom_up, E3VASwin)
    assert sorted(model.backbone.output_shape()) == ["p2", "p3", "p4", "p5"]
    train_one_step(model, num_classes=5)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.bottom_up.highway.parameters())


def test_the_upernet_model_of_the_common_file_has_the_swin_at_the_documented_path():
    cfg = LazyConfig.apply_overrides(load_config(COMMON_MODELS), ["model.backbone.bottom_up.tuning=lora",
                                                                  "model.backbone.bottom_up.size=nano"])
    model = instantiate(cfg.model)
    assert model.backbone.bottom_up.method.name == "lora"
    assert model.sem_seg_head.ppm.stages[0][1].in_channels == 256  # channels followed the size override
    assert any(k.startswith("backbone.bottom_up.trunk.") for k in model.state_dict())
