"""The synthetic shapes dataset: determinism, COCO validity, occlusion, lazy registration, evaluation."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import BoxMode, Boxes, Instances, polygons_to_bitmask
from pycocotools.coco import COCO

import e3va.data.shapes.generate as generate_module
from e3va.data.shapes import (
    SHAPES_CLASSES,
    build_shapes_evaluator,
    default_shapes_root,
    ensure_shapes_dataset,
    generate_shapes_dataset,
    register_shapes_datasets,
)


def _all_files(root: Path) -> dict:
    # Dot files are the generator's lock files.
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")]
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


@pytest.fixture
def names(request):
    """A dataset-name pair unique to the test, removed from the catalogs afterwards."""
    pair = (f"t_{request.node.name}_train", f"t_{request.node.name}_val")
    yield pair
    for name in pair:
        if name in DatasetCatalog:
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)


@pytest.fixture(scope="module")
def train_json(tmp_path_factory) -> Path:
    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes"), "train", num_images=12, seed=3)


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    for d, seed in (("a", 0), ("b", 0), ("c", 1)):
        generate_shapes_dataset(tmp_path / d, "val", num_images=5, image_size=96, seed=seed)
    a, b, c = (_all_files(tmp_path / d) for d in "abc")
    assert sorted(a) == ["val.json"] + [f"val/{i:06d}.png" for i in range(5)]
    assert a == b
    assert all(a[k] != c[k] for k in a)


def test_train_and_val_splits_differ(tmp_path):
    generate_shapes_dataset(tmp_path, "train", num_images=2, seed=0)
    generate_shapes_dataset(tmp_path, "val", num_images=2, seed=0)
    assert (tmp_path / "train" / "000000.png").read_bytes() != (tmp_path / "val" / "000000.png").read_bytes()


def test_json_is_valid_coco_for_pycocotools_and_detectron2(train_json):
    coco = COCO(str(train_json))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPES_CLASSES)
    assert len(coco.getImgIds()) == 12
    anns = coco.loadAnns(coco.getAnnIds())
    assert all(a["iscrowd"] == 0 and 1 <= a["category_id"] <= len(SHAPES_CLASSES) for a in anns)
    per_image = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
    assert min(per_image) >= 1 and max(per_image) <= 6

    dicts = load_coco_json(str(train_json), str(train_json.parent / "train"))
    assert len(dicts) == 12
    for d in dicts:
        assert os.path.isfile(d["file_name"]) and (d["height"], d["width"]) == (128, 128)
        for a in d["annotations"]:
            # Without a dataset name load_coco_json keeps the json's 1-based ids.
            assert a["bbox_mode"] == BoxMode.XYWH_ABS and 1 <= a["category_id"] <= len(SHAPES_CLASSES)
            assert all(len(p) >= 6 for p in a["segmentation"])


def test_masks_are_non_empty_match_bbox_and_never_overlap(train_json):
    coco = COCO(str(train_json))
    some_boxes_overlap = False
    for img_id in coco.getImgIds():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        masks = np.stack([coco.annToMask(a) for a in anns])
        # Occlusion: every pixel belongs to at most one instance.
        assert masks.sum(axis=0).max() <= 1
        for a, m in zip(anns, masks):
            ys, xs = np.nonzero(m)
            assert len(xs) > 0 and m.sum() == pytest.approx(a["area"])
            from_mask = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert np.allclose(from_mask, a["bbox"], atol=1.0), (from_mask, a["bbox"])
        boxes = np.array([a["bbox"] for a in anns])
        x0, y0, x1, y1 = boxes[:, 0], boxes[:, 1], boxes[:, 0] + boxes[:, 2], boxes[:, 1] + boxes[:, 3]
        iw = np.minimum(x1[:, None], x1[None]) - np.maximum(x0[:, None], x0[None])
        ih = np.minimum(y1[:, None], y1[None]) - np.maximum(y0[:, None], y0[None])
        np.fill_diagonal(iw, 0)
        some_boxes_overlap |= bool(((iw > 0) & (ih > 0)).any())
    assert some_boxes_overlap, "no overlapping shapes in 12 images: the occlusion test would be vacuous"


def test_generation_is_skipped_when_up_to_date_and_redone_when_parameters_change(tmp_path):
    json_path = generate_shapes_dataset(tmp_path, "val", num_images=3)
    stamp = json_path.stat().st_mtime_ns
    assert generate_shapes_dataset(tmp_path, "val", num_images=3) == json_path
    assert json_path.stat().st_mtime_ns == stamp

    generate_shapes_dataset(tmp_path, "val", num_images=2, image_size=64)
    data = json.loads(json_path.read_text())
    assert data["info"]["parameters"]["num_images"] == 2 and len(data["images"]) == 2
    assert data["images"][0]["height"] == 64
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == ["000000.png", "000001.png"]
    assert not list(tmp_path.rglob("*.tmp"))

    (tmp_path / "val" / "000001.png").unlink()  # a missing image forces regeneration too
    generate_shapes_dataset(tmp_path, "val", num_images=2, image_size=64)
    assert (tmp_path / "val" / "000001.png").is_file()


_SLOW_GENERATOR = """
import sys, time
import e3va.data.shapes.generate as g
write = g._write_coco_split
def slow(*args):
    print("building", flush=True)
    time.sleep(2)
    write(*args)
g._write_coco_split = slow
g.generate_shapes_dataset(sys.argv[1], "val", num_images=2, image_size=64)
"""


@pytest.mark.slow
def test_a_second_process_waits_for_the_first_and_reuses_its_files(tmp_path, monkeypatch):
    first = subprocess.Popen([sys.executable, "-c", _SLOW_GENERATOR, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "building"

        def must_not_build(*args):
            raise AssertionError("the second process rebuilt the split instead of waiting for the first")

        monkeypatch.setattr(generate_module, "_write_coco_split", must_not_build)
        json_path = generate_shapes_dataset(tmp_path, "val", num_images=2, image_size=64)
    finally:
        assert first.wait(timeout=120) == 0
    assert [im["file_name"] for im in json.loads(json_path.read_text())["images"]] == ["000000.png", "000001.png"]


def test_bad_arguments_raise_value_errors_naming_them(tmp_path):
    with pytest.raises(ValueError, match="'test'.*train.*val"):
        generate_shapes_dataset(tmp_path, "test", num_images=1)
    with pytest.raises(ValueError, match="num_images.*0"):
        generate_shapes_dataset(tmp_path, "train", num_images=0)
    with pytest.raises(ValueError, match="image_size.*16"):
        generate_shapes_dataset(tmp_path, "train", num_images=1, image_size=16)
    with pytest.raises(ValueError, match="'nope'"):
        ensure_shapes_dataset("nope")


def test_unknown_dataset_name_error_names_it():
    with pytest.raises(KeyError, match="no_such_dataset"):
        DatasetCatalog.get("no_such_dataset")


def test_registration_is_lazy_idempotent_and_loads_coco_dicts(tmp_path, names):
    train, val = register_shapes_datasets(tmp_path, num_train=4, num_val=2, names=names)
    register_shapes_datasets(tmp_path, num_train=4, num_val=2, names=names)  # idempotent
    assert not (tmp_path / "train.json").exists()  # nothing generated yet

    meta = MetadataCatalog.get(train)
    assert meta.evaluator_type == "coco" and meta.thing_classes == list(SHAPES_CLASSES)
    assert meta.json_file == str(tmp_path / "train.json") and meta.image_root == str(tmp_path / "train")

    dicts = DatasetCatalog.get(train)
    assert len(dicts) == 4 and all(d["annotations"] for d in dicts)
    # Registered under a name, load_coco_json maps category ids to contiguous 0-based ones.
    assert {a["category_id"] for d in dicts for a in d["annotations"]} <= set(range(len(SHAPES_CLASSES)))
    assert not (tmp_path / "val.json").exists()

    # Re-registering with other parameters replaces the registration instead of raising.
    register_shapes_datasets(tmp_path, num_train=3, num_val=2, names=names)
    assert len(DatasetCatalog.get(train)) == 3

    # The config's default mapper (polygon masks) accepts the dicts.
    mapper = DatasetMapper(is_train=True, augmentations=[], image_format="BGR", use_instance_mask=True)
    out = mapper(dicts[0])
    assert out["image"].shape == (3, 128, 128)
    assert len(out["instances"].gt_masks) == len(dicts[0]["annotations"])


def test_a_foreign_dataset_name_is_not_overwritten(tmp_path, names):
    DatasetCatalog.register(names[0], lambda: [])
    with pytest.raises(ValueError, match=names[0]):
        register_shapes_datasets(tmp_path, names=names)


def test_evaluator_can_be_built_before_the_dataset_is_loaded(tmp_path, names):
    _, val = register_shapes_datasets(tmp_path, num_train=2, num_val=2, names=names)
    assert isinstance(build_shapes_evaluator(val), COCOEvaluator)
    assert (tmp_path / "val.json").is_file() and not (tmp_path / "train.json").exists()
    # Once ensured, plain COCOEvaluator works too.
    assert isinstance(COCOEvaluator(val), COCOEvaluator)


def test_ground_truth_as_predictions_scores_ap_100(tmp_path, names):
    _, val = register_shapes_datasets(tmp_path, num_train=2, num_val=8, names=names)
    evaluator = build_shapes_evaluator(val)
    evaluator.reset()
    for d in DatasetCatalog.get(val):
        h, w = d["height"], d["width"]
        anns = d["annotations"]
        inst = Instances((h, w))
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        inst.scores = torch.ones(len(anns))
        inst.pred_classes = torch.tensor([a["category_id"] for a in anns])
        inst.pred_masks = torch.from_numpy(np.stack([polygons_to_bitmask(a["segmentation"], h, w) for a in anns]))
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0, abs=0.1)
    assert results["segm"]["AP"] == pytest.approx(100.0, abs=0.1)


def test_default_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("E3VA_DATASETS", str(tmp_path / "e3va"))
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "d2"))
    assert default_shapes_root() == tmp_path / "e3va"
    monkeypatch.delenv("E3VA_DATASETS")
    assert default_shapes_root() == tmp_path / "d2" / "shapes"
    monkeypatch.delenv("DETECTRON2_DATASETS")
    assert default_shapes_root() == Path("~/.cache/e3va/shapes").expanduser()
