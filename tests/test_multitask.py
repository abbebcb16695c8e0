"""One trunk pass for several tasks (e3va.multitask): outputs equal each task's own model, and the refusals."""
import json

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import LazyCall as L
from detectron2.config import instantiate
from detectron2.data import transforms as T
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from e3va import NANO_SWIN_WEIGHTS, E3VACheckpointer, load_trainable, save_trainable
from e3va.multitask import MultiTaskError, MultiTaskModel, TaskSpec
from helpers import load_config, load_tool, tiny_detector

DETECT = "Shapes/mask_rcnn_e3va.py"
SEGMENT = "Shapes/semseg_upernet_e3va.py"


def _config(relpath, **bottom_up):
    cfg = load_config(relpath)
    cfg.model.backbone.bottom_up.update(bottom_up)
    if "roi_heads" in cfg.model:  # random heads: keep every box, so that the comparison sees many
        cfg.model.roi_heads.box_predictor.test_score_thresh = 0.0
    return cfg


def _task_file(cfg, path, seed):
    """A trainable-only task file for ``cfg`` on the nano base weights, every trained tensor moved off its
    initialisation (side network, output norms, FPN, heads)."""
    torch.manual_seed(seed)
    model = instantiate(cfg.model)
    E3VACheckpointer(model).load(str(NANO_SWIN_WEIGHTS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return save_trainable(model, path)


def _alone(cfg, task_file):
    torch.manual_seed(123)  # another initialisation than the task file's: loading must set everything
    model = instantiate(cfg.model)
    E3VACheckpointer(model).load(str(NANO_SWIN_WEIGHTS))
    load_trainable(model, task_file)
    return model.eval()


def _inputs(height=83, width=101, seed=0):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), generator=generator).float()
    return [{"image": image, "height": height, "width": width}]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Four tasks on the nano trunk: E3VA Mask R-CNN, E3VA UperNet, LoSA Mask R-CNN, heads-only (fixed)
    UperNet (name -> cfg, task file)."""
    root = tmp_path_factory.mktemp("tasks")
    cfgs = {"detect": _config(DETECT), "segment": _config(SEGMENT), "losa": _config(DETECT, tuning="losa"),
            "fixed": _config(SEGMENT, tuning="fixed")}
    return {name: (cfg, _task_file(cfg, root / f"{name}.pth", seed))
            for seed, (name, cfg) in enumerate(cfgs.items())}


def _close(a, b):
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_each_task_equals_its_own_model(tasks):
    inputs = _inputs()
    model = MultiTaskModel.from_configs(str(NANO_SWIN_WEIGHTS), [TaskSpec(n, c, [f]) for n, (c, f) in tasks.items()])
    with torch.no_grad():
        together = model(inputs)
    assert list(together) == list(tasks)
    alone_params = 0
    for name, (cfg, task_file) in tasks.items():
        single = _alone(cfg, task_file)
        alone_params += sum(p.numel() for p in single.parameters())
        with torch.no_grad():
            alone = single(inputs)[0]
        got = together[name][0]
        if "instances" in alone:
            a, b = alone["instances"], got["instances"]
            assert len(a) > 0 and len(a) == len(b), name
            assert _close(a.pred_boxes.tensor, b.pred_boxes.tensor), name
            assert _close(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes), name
            assert _close(a.pred_masks.float(), b.pred_masks.float()), name
        else:
            assert _close(alone["sem_seg"], got["sem_seg"]), name
    # One trunk: every task's backbone holds the same stages, and their parameters are counted once.
    assert {id(backbone.trunk.layers) for backbone in model._backbones.values()} == {id(model.trunk.layers)}
    shared = sum(p.numel() for n, p in model.trunk.named_parameters() if not n.startswith("norm"))  # out norms: per task
    assert sum(p.numel() for p in model.parameters()) == alone_params - (len(tasks) - 1) * shared


def test_one_trunk_pass_per_batch(tasks):
    model = MultiTaskModel.from_configs(str(NANO_SWIN_WEIGHTS), [TaskSpec(n, c, [f]) for n, (c, f) in tasks.items()])
    calls = []
    model.trunk.patch_embed.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        model(_inputs())
    assert len(calls) == 1


def test_tasks_that_cannot_share_are_refused(tasks, tmp_path):
    (det_cfg, det_file), (seg_cfg, seg_file) = tasks["detect"], tasks["segment"]
    base = str(NANO_SWIN_WEIGHTS)

    lora = _config(DETECT, tuning="lora")
    with pytest.raises(MultiTaskError, match=r"Task 'lora'.*changes the trunk"):
        MultiTaskModel.from_configs(base, [TaskSpec("det", det_cfg, [det_file]), TaskSpec("lora", lora)])

    resized = _config(SEGMENT)
    resized.dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=256, max_size=512)]
    with pytest.raises(MultiTaskError, match=r"Task 'seg' resizes test images with \[ResizeShortestEdge"):
        MultiTaskModel.from_configs(base, [TaskSpec("det", det_cfg, [det_file]), TaskSpec("seg", resized, [seg_file])])

    normalised = _config(SEGMENT)
    normalised.model.pixel_std = [1.0, 1.0, 1.0]
    with pytest.raises(MultiTaskError, match=r"Task 'seg' prepares images with pixel_std=\[1.0, 1.0, 1.0\]"):
        MultiTaskModel.from_configs(base, [TaskSpec("det", det_cfg, [det_file]), TaskSpec("seg", normalised, [seg_file])])

    windowed = _config(SEGMENT, window_size=12)
    with pytest.raises(MultiTaskError, match=r"Task 'seg' has a Swin-nano, window 12.*window 7"):
        MultiTaskModel.from_configs(base, [TaskSpec("det", det_cfg, [det_file]), TaskSpec("seg", windowed)])

    # A full checkpoint whose trunk is not the base's.
    other = instantiate(seg_cfg.model)
    E3VACheckpointer(other).load(base)
    with torch.no_grad():
        other.backbone.bottom_up.trunk.layers[1].blocks[0].mlp.fc1.weight.mul_(1.01)
    E3VACheckpointer(other, save_dir=str(tmp_path)).save("other_trunk")  # as training saves it
    full = tmp_path / "other_trunk.pth"
    with pytest.raises(MultiTaskError, match=r"Task 'seg' holds other frozen trunk weights.*layers\.1\.blocks\.0\.mlp"):
        MultiTaskModel.from_configs(base, [TaskSpec("det", det_cfg, [det_file]), TaskSpec("seg", seg_cfg, [str(full)])])

    vit = tiny_detector("COCO/mask_rcnn_vit_b_e3va.py")
    with pytest.raises(MultiTaskError, match=r"Task 'vit' has a E3VAViT backbone.*Swin trunks"):
        MultiTaskModel({"vit": vit})

    # A task file trained on other base weights: the loader's fingerprint check, named by task.
    foreign = save_trainable(other, tmp_path / "foreign.pth")
    with pytest.raises(MultiTaskError, match=r"Task 'seg'.*other frozen base weights"):
        MultiTaskModel.from_configs(base, [TaskSpec("det", det_cfg, [det_file]), TaskSpec("seg", seg_cfg, [str(foreign)])])


def test_joint_training_step_sums_the_tasks_losses(tasks):
    """Training mode: one trunk pass, every task's losses under its name, weighted, and gradients reach
    every task's side network (never the trunk)."""
    model = MultiTaskModel.from_configs(str(NANO_SWIN_WEIGHTS), [TaskSpec(n, c, [f]) for n, (c, f) in tasks.items()],
                                        loss_weights={"segment": 0.5})
    model.train()
    image = torch.randint(0, 256, (3, 64, 64)).float()
    instances = Instances((64, 64), gt_boxes=Boxes(torch.tensor([[8.0, 8.0, 40.0, 40.0]])),
                          gt_classes=torch.tensor([1]))
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[:, 8:40, 8:40] = True
    instances.gt_masks = BitMasks(mask)
    sem_seg = torch.full((64, 64), 4, dtype=torch.long)
    sem_seg[8:40, 8:40] = 1
    with EventStorage():  # Detectron2's training-time logging, as its trainers provide
        losses = model([{"image": image, "height": 64, "width": 64, "instances": instances, "sem_seg": sem_seg}])
    assert {k.split("/")[0] for k in losses} == set(tasks)
    sum(losses.values()).backward()
    for name, backbone in model._backbones.items():
        side = backbone.side_network
        if side is None:  # fixed: heads only
            continue
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in side.parameters()), name
    assert all(p.grad is None for p in model.trunk.layers.parameters())


def test_task_file_of_a_multitask_model_loads_into_the_single_task_config(tasks, tmp_path):
    """Parameter names are unchanged by sharing: a task's part of a multi-task model (e.g. after a joint run)
    is a task file for its single-task config."""
    model = MultiTaskModel.from_configs(str(NANO_SWIN_WEIGHTS), [TaskSpec(n, c, [f]) for n, (c, f) in tasks.items()])
    with torch.no_grad():
        for p in model.tasks["segment"].parameters():
            if p.requires_grad:
                p.mul_(1.5)
    cfg, _ = tasks["segment"]
    path = save_trainable(model.tasks["segment"], tmp_path / "segment.pth")
    alone = _alone(cfg, path)
    inputs = _inputs(seed=3)
    with torch.no_grad():
        assert _close(alone(inputs)[0]["sem_seg"], model(inputs)["segment"][0]["sem_seg"])


def test_multitask_infer_tool_writes_pictures_and_raw_outputs(tasks, tmp_path):
    tool = load_tool("multitask_infer")
    image = np.zeros((70, 90, 3), np.uint8)
    cv2.circle(image, (30, 30), 15, (0, 200, 0), -1)
    cv2.imwrite(str(tmp_path / "one.png"), image)
    (_, file_d), (_, file_s) = tasks["detect"], tasks["segment"]
    out = tmp_path / "out"
    written = tool.main(["--base", str(NANO_SWIN_WEIGHTS),
                         "--task", f"detect=configs/{DETECT}:{file_d}", "--task", f"segment=configs/{SEGMENT}:{file_s}",
                         "--input", str(tmp_path / "one.png"), "--output", str(out), "--score-thresh", "0.0"])
    assert written == [out / "one.png"]
    picture = cv2.imread(str(out / "one.png"))
    assert picture.shape[1] == 2 * 90  # one panel per task, side by side
    instances = json.loads((out / "one" / "detect.json").read_text())
    assert instances and {"bbox", "score", "category_id", "segmentation"} <= set(instances[0])
    labels = cv2.imread(str(out / "one" / "segment_sem_seg.png"), cv2.IMREAD_UNCHANGED)
    assert labels.shape == (70, 90) and labels.max() < 5


def test_multitask_infer_tool_names_a_task_that_cannot_share(tmp_path, capsys):
    tool = load_tool("multitask_infer")
    cv2.imwrite(str(tmp_path / "one.png"), np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--base", str(NANO_SWIN_WEIGHTS), "--task", f"a=configs/{DETECT}",
                   "--task", f"b=configs/{DETECT}", "--input", str(tmp_path / "one.png"), "--output", str(tmp_path),
                   "model.backbone.bottom_up.tuning=full"])
    assert exit_info.value.code == 2
    assert "Task 'a'" in capsys.readouterr().err


def test_joint_config_trains_and_its_task_files_load_into_the_single_task_configs(tmp_path, restore_loggers):
    """configs/Shapes/multitask_e3va.py through the training tool, two steps on a small shapes split: both
    tasks are evaluated in one pass, and each task file serves its single-task config."""
    from detectron2.engine import default_argument_parser

    from e3va.data.shapes import register_shapes_datasets

    register_shapes_datasets(tmp_path / "data", num_train=4, num_val=2, image_size=64, names=("mt_train", "mt_val"),
                             sem_seg_names=("mt_sem_train", "mt_sem_val"))
    out = tmp_path / "out"
    data = ["dataloader.train.dataset.instances=mt_train", "dataloader.train.dataset.sem_seg=mt_sem_train",
            "dataloader.test.dataset.instances=mt_val", "dataloader.test.dataset.sem_seg=mt_sem_val",
            "dataloader.evaluator.0.evaluator.dataset_name=mt_val",
            "dataloader.evaluator.1.evaluator.dataset_name=mt_sem_val", "dataloader.train.total_batch_size=2"]
    args = default_argument_parser().parse_args(
        ["--config-file", "configs/Shapes/multitask_e3va.py", "train.max_iter=2", "train.eval_period=2",
         f"train.output_dir={out}", *data])
    results = load_tool("lazyconfig_train_net").main(args)
    assert {"detect/bbox", "detect/segm", "segment/sem_seg"} <= set(results)

    for name, relpath in (("detect", DETECT), ("segment", SEGMENT)):
        single = instantiate(load_config(relpath).model)
        E3VACheckpointer(single).load(str(NANO_SWIN_WEIGHTS))
        before = {k: v.clone() for k, v in single.backbone.bottom_up.side_network.state_dict().items()}
        load_trainable(single, out / f"{name}_trainable.pth")  # refused if any name, shape or base differed
        after = single.backbone.bottom_up.side_network.state_dict()
        assert any(not torch.equal(before[k], after[k]) for k in before), name  # trained: moved off init
