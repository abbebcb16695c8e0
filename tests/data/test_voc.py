"""Pascal VOC detection: the configs in configs/VOC train one CPU iteration and evaluate with Detectron2's
PascalVOCDetectionEvaluator on a synthetic VOC-format dataset; a missing dataset root fails clearly."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Tuple

import cv2
import detectron2.data.transforms as T
import numpy as np
import pytest
from detectron2.config import LazyCall as L
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_pascal_voc
from detectron2.engine import default_argument_parser
from detectron2.evaluation import PascalVOCDetectionEvaluator

from e3va import NANO_SWIN_WEIGHTS
from e3va.data.roots import DatasetRootError, UnknownDatasetError, dataset_dicts, require_dataset_root
from e3va.data.voc import VOC_CLASSES, build_voc_evaluator
from e3va.engine.training import do_train
from helpers import REPO, load_config

SYNTH = "voc_e3va_synth"  # the voc_ prefix makes require_dataset_root check it like a builtin VOC split
CLASSES = ("car", "dog", "person")  # drawn; the models still predict all 20 VOC classes
COLORS = {"car": (40, 40, 220), "dog": (40, 200, 40), "person": (220, 60, 40)}  # BGR
SPLITS = {"trainval": ["000001", "000002", "000003"], "test": ["000004", "000005"]}


def _boxes(rng: np.random.Generator, width: int, height: int) -> List[Tuple[str, int, int, int, int]]:
    """Two or three class-coloured boxes, 1-based inclusive pixel coordinates as in the devkit."""
    boxes = []
    for _ in range(int(rng.integers(2, 4))):
        w, h = int(rng.integers(24, 56)), int(rng.integers(24, 56))
        x, y = int(rng.integers(1, width - w)), int(rng.integers(1, height - h))
        boxes.append((str(rng.choice(CLASSES)), x, y, x + w - 1, y + h - 1))
    return boxes


def _annotation_xml(image_id: str, width: int, height: int, boxes) -> str:
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = f"{image_id}.jpg"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", width), ("height", height), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    for name, x0, y0, x1, y1 in boxes:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = name
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), (x0, y0, x1, y1)):
            ET.SubElement(box, tag).text = str(value)
    return ET.tostring(root, encoding="unicode")


def write_synthetic_voc(dirname: Path, seed: int = 0, width: int = 128, height: int = 96) -> Path:
    """A VOC devkit year directory: JPEGImages/, Annotations/, ImageSets/Main/{trainval,test}.txt."""
    rng = np.random.default_rng(seed)
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (dirname / sub).mkdir(parents=True, exist_ok=True)
    for split, ids in SPLITS.items():
        (dirname / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for image_id in ids:
            noise = rng.integers(0, 30, (height, width, 3), dtype=np.uint8)
            image = np.full((height, width, 3), 128, np.uint8) + noise
            boxes = _boxes(rng, width, height)
            for name, x0, y0, x1, y1 in boxes:
                image[y0 - 1 : y1, x0 - 1 : x1] = COLORS[name]
            assert cv2.imwrite(str(dirname / "JPEGImages" / f"{image_id}.jpg"), image)
            xml = _annotation_xml(image_id, width, height, boxes)
            (dirname / "Annotations" / f"{image_id}.xml").write_text(xml)
    return dirname


@pytest.fixture(scope="module")
def synthetic_voc(tmp_path_factory) -> Dict[str, str]:
    """The synthetic dataset, registered with Detectron2's register_pascal_voc as <SYNTH>_{trainval,test}."""
    dirname = write_synthetic_voc(tmp_path_factory.mktemp("voc") / "VOC2007")
    names = {}
    for split in SPLITS:
        name = f"{SYNTH}_{split}"
        if name in DatasetCatalog.list():  # e.g. the module run twice in one process
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_pascal_voc(name, str(dirname), split, 2007, VOC_CLASSES)
        names[split] = name
    yield names
    for name in names.values():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def tiny_voc_config(relpath: str, names: Dict[str, str], output_dir: Path):
    """A configs/VOC config with the nano Swin, 96-pixel images, batch 2, one iteration, on the CPU."""
    cfg = load_config(relpath)
    cfg.model.backbone.bottom_up.size = "nano"
    cfg.model.backbone.bottom_up.drop_path_rate = 0.0
    cfg.dataloader.train.dataset.names = names["trainval"]
    cfg.dataloader.test.dataset.names = names["test"]  # the evaluator follows through ${..test.dataset.names}
    cfg.dataloader.train.mapper.augmentations = [
        L(T.ResizeShortestEdge)(short_edge_length=(96,), max_size=128, sample_style="choice"),
        L(T.RandomFlip)(horizontal=True),
    ]
    cfg.dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=96, max_size=128)]
    cfg.dataloader.train.total_batch_size = 2
    cfg.dataloader.train.num_workers = 0
    cfg.dataloader.test.num_workers = 0
    cfg.train.update(
        device="cpu", max_iter=1, eval_period=1, log_period=1, output_dir=str(output_dir),
        init_checkpoint=str(NANO_SWIN_WEIGHTS),
    )
    cfg.train.checkpointer.period = 1000
    return cfg


@pytest.mark.parametrize("relpath", ["VOC/retinanet_swin_l_e3va.py", "VOC/faster_rcnn_swin_l_e3va.py"])
def test_voc_config_is_swin_l_on_voc(relpath):
    cfg = load_config(relpath)
    bottom_up = cfg.model.backbone.bottom_up
    assert (bottom_up.size, bottom_up.window_size, bottom_up.tuning) == ("L", 7, "e3va")
    assert cfg.train.init_checkpoint.endswith("swin_large_patch4_window7_224_22k.pth")
    num_classes = cfg.model.num_classes if "retinanet" in relpath else cfg.model.roi_heads.num_classes
    assert num_classes == 20
    assert list(cfg.dataloader.train.dataset.names) == ["voc_2007_trainval", "voc_2012_trainval"]
    assert cfg.dataloader.test.dataset.names == "voc_2007_test"
    assert cfg.train.max_iter == 18000 and cfg.train.amp.enabled
    assert list(cfg.lr_multiplier.scheduler.milestones) == [12000, 16000, 18000]


def test_retinanet_fpn_levels_line_up_with_the_head():
    from detectron2.config import instantiate

    cfg = load_config("VOC/retinanet_swin_l_e3va.py")
    cfg.model.backbone.bottom_up.size = "nano"
    backbone = instantiate(cfg.model.backbone)
    shapes = backbone.output_shape()
    assert list(shapes) == list(cfg.model.head_in_features) == ["p3", "p4", "p5", "p6", "p7"]
    assert [s.stride for s in shapes.values()] == [8, 16, 32, 64, 128]
    assert backbone.top_block.p6.in_channels == 256  # fed from the FPN's P5, not the Swin's stage 4


@pytest.mark.parametrize("relpath", ["VOC/retinanet_swin_l_e3va.py", "VOC/faster_rcnn_swin_l_e3va.py"])
def test_voc_config_trains_and_evaluates_on_synthetic_voc(relpath, synthetic_voc, tmp_path, restore_loggers):
    cfg = tiny_voc_config(relpath, synthetic_voc, tmp_path)
    result = do_train(default_argument_parser().parse_args([]), cfg)

    bbox = result.eval_results["bbox"]
    assert set(bbox) == {"AP", "AP50", "AP75"}
    assert all(math.isfinite(float(v)) and 0.0 <= float(v) <= 100.0 for v in bbox.values())
    assert (tmp_path / "metrics.json").is_file()


@pytest.mark.slow
def test_cli_trains_on_the_builtin_voc_names_under_detectron2_datasets(tmp_path):
    """The config as written (voc_2007_trainval + voc_2012_trainval -> voc_2007_test), found by Detectron2
    through $DETECTRON2_DATASETS, trained and evaluated by tools/lazyconfig_train_net.py."""
    root = tmp_path / "datasets"
    write_synthetic_voc(root / "VOC2007")
    write_synthetic_voc(root / "VOC2012", seed=1)
    output = tmp_path / "out"
    overrides = [
        "model.backbone.bottom_up.size=nano",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[96]",
        "dataloader.train.mapper.augmentations.0.max_size=128",
        "dataloader.test.mapper.augmentations.0.short_edge_length=96",
        "dataloader.test.mapper.augmentations.0.max_size=128",
        "dataloader.train.total_batch_size=2",
        "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0",
        "train.device=cpu",
        "train.max_iter=1",
        "train.eval_period=1",
        f"train.output_dir={output}",
        f"train.init_checkpoint={NANO_SWIN_WEIGHTS}",
    ]
    cmd = [sys.executable, str(REPO / "tools" / "lazyconfig_train_net.py"),
           "--config-file", str(REPO / "configs" / "VOC" / "faster_rcnn_swin_l_e3va.py"), *overrides]
    env = {**os.environ, "DETECTRON2_DATASETS": str(root), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Evaluating voc_2007_test" in log and "copypaste: AP,AP50,AP75" in log
    assert (output / "metrics.json").is_file()


def test_synthetic_voc_loads_through_dataset_dicts(synthetic_voc):
    records = dataset_dicts(synthetic_voc["trainval"])
    assert len(records) == len(SPLITS["trainval"])
    assert all(record["annotations"] for record in records)
    assert isinstance(build_voc_evaluator(synthetic_voc["test"]), PascalVOCDetectionEvaluator)


def test_missing_voc_root_names_the_environment_variable_and_layout(tmp_path):
    name = "voc_e3va_missing_test"
    register_pascal_voc(name, str(tmp_path / "nowhere" / "VOC2007"), "test", 2007, VOC_CLASSES)
    try:
        for call in (lambda: dataset_dicts([name]), lambda: build_voc_evaluator(name)):
            with pytest.raises(FileNotFoundError) as error:
                call()
            assert isinstance(error.value, DatasetRootError)
            message = str(error.value)
            assert "DETECTRON2_DATASETS" in message and name in message
            assert "$DETECTRON2_DATASETS/VOC2007/{JPEGImages/, Annotations/, ImageSets/Main/test.txt}" in message
            assert str(tmp_path / "nowhere" / "VOC2007" / "JPEGImages") in message
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_builtin_voc_split_without_data_fails_clearly(monkeypatch, tmp_path):
    try:
        require_dataset_root("voc_2007_test")
    except DatasetRootError as error:
        assert "DETECTRON2_DATASETS" in str(error) and "VOC2007" in str(error)
    else:
        pytest.skip("Pascal VOC 2007 is installed here: nothing is missing.")


def test_unregistered_dataset_names_it_and_close_matches():
    with pytest.raises(KeyError) as error:
        dataset_dicts("voc_2007_tset")
    assert isinstance(error.value, UnknownDatasetError)
    assert "'voc_2007_tset'" in str(error.value) and "voc_2007_test" in str(error.value)
