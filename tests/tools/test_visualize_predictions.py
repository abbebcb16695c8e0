"""tools/visualize_predictions.py: instance predictions on the Shapes config (--input and --dataset), semantic
predictions with a stub model, and its errors."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata

from e3va.trainable import full_checkpoint
from e3va.visualize import draw_semantic_predictions, save_side_by_side
from helpers import CONFIGS, REPO, load_tool

TOOL = REPO / "tools" / "visualize_predictions.py"
SHAPES = CONFIGS / "Shapes" / "mask_rcnn_e3va.py"
SEMSEG_DATASET = "e3va_test_vis_semseg"


tool = load_tool("visualize_predictions")


def _save_weights(model: torch.nn.Module, path: Path) -> Path:
    torch.save(full_checkpoint(model), path)  # with its side-network record, as training writes it
    return path


@pytest.fixture(scope="module")
def shapes_weights(tmp_path_factory) -> Path:
    """A full checkpoint of the Shapes detector (nano Swin, freshly initialised heads)."""
    torch.manual_seed(0)
    model = instantiate(LazyConfig.load(str(SHAPES)).model)
    return _save_weights(model, tmp_path_factory.mktemp("weights") / "shapes_model.pth")


def _write_images(directory: Path) -> List[Path]:
    """Two images of different sizes and formats: coloured shapes on a grey background."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for name, (h, w) in (("first.png", (128, 128)), ("second.jpg", (96, 120))):
        image = np.full((h, w, 3), 110, np.uint8) + rng.integers(0, 20, (h, w, 3), dtype=np.uint8)
        cv2.circle(image, (w // 3, h // 3), 18, (40, 40, 230), -1)
        cv2.rectangle(image, (w // 2, h // 2), (w // 2 + 30, h // 2 + 25), (40, 220, 40), -1)
        assert cv2.imwrite(str(directory / name), image)
        paths.append(directory / name)
    return paths


def _panels(png: Path, source: Path, scale: float) -> List[np.ndarray]:
    """The drawn file split into panels of the source image's (scaled) size, checking the layout."""
    drawn = cv2.imread(str(png))
    assert drawn is not None and drawn.size > 0, png
    h, w = cv2.imread(str(source)).shape[:2]
    ph, pw = round(h * scale), round(w * scale)
    assert drawn.shape[0] == ph and drawn.shape[1] % pw == 0, (drawn.shape, (ph, pw))
    return [drawn[:, i : i + pw] for i in range(0, drawn.shape[1], pw)]


def _difference(panel: np.ndarray, source: Path) -> float:
    """Mean absolute difference between a panel and the source image resized to it."""
    image = cv2.imread(str(source))
    resized = cv2.resize(image, (panel.shape[1], panel.shape[0]), interpolation=cv2.INTER_LINEAR)
    return float(np.abs(panel.astype(np.float32) - resized.astype(np.float32)).mean())


def test_input_images_are_drawn_with_instance_predictions(tmp_path, shapes_weights, restore_loggers):
    images = _write_images(tmp_path / "images")
    out = tmp_path / "vis"
    # The heads are untrained, so the predictions score about 1/5 (uniform over 4 classes + background).
    written = tool.main([
        "--config-file", str(SHAPES), "--weights", str(shapes_weights),
        "--input", str(images[0]), str(images[1].parent), "--output", str(out),
        "--score-thresh", "0.1", "--scale", "2",
    ])
    # The directory holds both images again: the duplicate stem gets a suffix instead of overwriting.
    assert [p.name for p in written] == ["first.png", "first_1.png", "second.png"]
    for png, source in zip(written, [images[0], images[0], images[1]]):
        (panel,) = _panels(png, source, scale=2.0)  # predictions only: no ground truth without --dataset
        assert _difference(panel, source) > 1.0, f"{png} looks like the plain input image"


def test_dataset_images_get_ground_truth_beside_predictions(tmp_path, shapes_weights, restore_loggers):
    out = tmp_path / "vis"
    written = tool.main([
        "--config-file", str(SHAPES), "--weights", str(shapes_weights),
        "--dataset", "shapes_val", "--max-images", "2", "--output", str(out), "--score-thresh", "0.1",
    ])
    records = DatasetCatalog.get("shapes_val")[:2]
    assert [p.name for p in written] == [Path(r["file_name"]).stem + ".png" for r in records]
    for png, record in zip(written, records):
        prediction, truth = _panels(png, Path(record["file_name"]), scale=1.0)
        assert _difference(prediction, Path(record["file_name"])) > 1.0
        assert _difference(truth, Path(record["file_name"])) > 1.0
        assert not np.array_equal(prediction, truth)


def test_unknown_dataset_is_named_with_the_registered_ones(tmp_path, shapes_weights, capsys, restore_loggers):
    with pytest.raises(SystemExit) as exit_info:
        tool.main([
            "--config-file", str(SHAPES), "--weights", str(shapes_weights),
            "--dataset", "shapes_vall", "--output", str(tmp_path),
        ])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'shapes_vall'" in err and "Did you mean ['shapes_val'" in err
    assert "Registered datasets:" in err and "shapes_train" in err and "voc_2007_test" in err
    assert not list(tmp_path.iterdir())


def test_missing_input_and_cuda_config_without_cuda_fail_clearly(tmp_path, shapes_weights, capsys, restore_loggers):
    base = ["--config-file", str(SHAPES), "--weights", str(shapes_weights), "--output", str(tmp_path / "o")]
    with pytest.raises(SystemExit):
        tool.main([*base, "--input", str(tmp_path / "nope.jpg")])
    assert "nope.jpg" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tool.main(["--config-file", str(SHAPES), "--weights", str(tmp_path / "none.pth"), "--output", str(tmp_path),
                   "--input", str(tmp_path)])
    assert "none.pth" in capsys.readouterr().err
    if torch.cuda.is_available():
        return
    images = _write_images(tmp_path / "images")
    with pytest.raises(SystemExit):
        tool.main([*base, "--input", str(images[0]), "train.device=cuda"])
    assert "train.device=cpu" in capsys.readouterr().err


def test_an_unreadable_image_is_named_and_skipped_and_16_bit_images_keep_their_range(
        tmp_path, shapes_weights, capsys, restore_loggers):
    images = _write_images(tmp_path / "images")
    corrupt = tmp_path / "images" / "corrupt.jpg"
    corrupt.write_bytes(images[1].read_bytes()[:300])  # a JPEG cut short, as an interrupted copy leaves it
    deep = tmp_path / "images" / "deep.png"
    ramp = np.linspace(0, 65535, 96 * 128).reshape(96, 128).astype(np.uint16)  # 16-bit grayscale
    assert cv2.imwrite(str(deep), ramp)
    with pytest.raises(SystemExit) as exit_info:  # score threshold 1: nothing drawn over the images
        tool.main(["--config-file", str(SHAPES), "--weights", str(shapes_weights), "--input", str(tmp_path / "images"),
                   "--output", str(tmp_path / "vis"), "--score-thresh", "1"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image(s)" in err and str(corrupt) in err
    assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == ["deep.png", "first.png", "second.png"]
    drawn = cv2.imread(str(tmp_path / "vis" / "deep.png"))
    assert abs(float(drawn.mean()) - 127.5) < 5, drawn.mean()  # 65535 -> 255: the ramp, not a white picture


# ---- semantic segmentation, with a stub model (the sem-seg configs are not needed)
STUB_CONFIG = '''
import detectron2.data.transforms as T
import torch
import torch.nn.functional as F
from detectron2.config import LazyCall as L
from torch import nn


class ColourSegmenter(nn.Module):
    """Scores class c by the brightness of BGR channel c: 0 blue, 1 green, 2 red."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, batched_inputs):
        outputs = []
        for x in batched_inputs:
            scores = x["image"].float()[None] * self.gain
            # The image arrives resized by the test augmentation; answer at the original size, as
            # Detectron2's SemanticSegmentor does.
            scores = F.interpolate(scores, size=(x["height"], x["width"]), mode="bilinear")[0]
            outputs.append({"sem_seg": scores})
        return outputs


model = L(ColourSegmenter)()
dataloader = dict(test=dict(
    dataset=dict(names="%s"),
    mapper=dict(augmentations=[L(T.ResizeShortestEdge)(short_edge_length=48, max_size=64)]),
))
train = dict(device="cpu")
''' % SEMSEG_DATASET


@pytest.fixture
def semseg_setup(tmp_path):
    """A stub config and its weights, and a registered sem-seg dataset of two images with label PNGs."""
    config = tmp_path / "stub_semseg.py"
    config.write_text(STUB_CONFIG)
    weights = _save_weights(instantiate(LazyConfig.load(str(config)).model), tmp_path / "stub.pth")
    images = _write_images(tmp_path / "images")
    records = []
    for path in images:
        image = cv2.imread(str(path))
        labels = image.argmax(axis=2).astype(np.uint8)
        labels[:4] = 255  # an ignored band, as ADE20K's label 0 becomes
        label_path = path.with_name(path.stem + "_labels.png")
        assert cv2.imwrite(str(label_path), labels)
        records.append({"file_name": str(path), "sem_seg_file_name": str(label_path),
                        "height": image.shape[0], "width": image.shape[1]})
    DatasetCatalog.register(SEMSEG_DATASET, lambda: records)
    MetadataCatalog.get(SEMSEG_DATASET).set(
        stuff_classes=["blue", "green", "red"], stuff_colors=[[0, 0, 255], [0, 255, 0], [255, 0, 0]],
        ignore_label=255,
    )
    yield config, weights, images
    DatasetCatalog.remove(SEMSEG_DATASET)
    MetadataCatalog.remove(SEMSEG_DATASET)


def test_semantic_predictions_are_drawn(tmp_path, semseg_setup, restore_loggers):
    config, weights, images = semseg_setup
    written = tool.main(["--config-file", str(config), "--weights", str(weights),
                         "--input", *map(str, images), "--output", str(tmp_path / "in")])
    for png, source in zip(written, images):
        (panel,) = _panels(png, source, scale=1.0)
        assert _difference(panel, source) > 1.0

    written = tool.main(["--config-file", str(config), "--weights", str(weights),
                         "--dataset", SEMSEG_DATASET, "--max-images", "1", "--output", str(tmp_path / "ds")])
    assert len(written) == 1
    prediction, truth = _panels(written[0], images[0], scale=1.0)
    assert _difference(prediction, images[0]) > 1.0 and _difference(truth, images[0]) > 1.0


def test_semantic_drawing_without_class_names_uses_indices():
    image = np.full((32, 40, 3), 100, np.uint8)
    scores = torch.zeros(3, 16, 20)  # half the image's size: resized (nearest) to it
    scores[2, :, 10:] = 1.0
    drawn = draw_semantic_predictions(image, scores, Metadata(name="none"), scale=1.0)
    assert drawn.shape == image.shape and np.abs(drawn.astype(int) - image).mean() > 1.0


def test_save_side_by_side_keeps_its_layout(tmp_path):
    left, right = np.zeros((8, 5, 3), np.uint8), np.full((8, 6, 3), 255, np.uint8)
    path = save_side_by_side(tmp_path / "pair.png", left, right)
    assert cv2.imread(str(path)).shape == (8, 11, 3)


@pytest.mark.slow
def test_command_line_runs_as_a_script(tmp_path, shapes_weights):
    images = _write_images(tmp_path / "images")
    cmd = [sys.executable, str(TOOL), "--config-file", str(SHAPES), "--weights", str(shapes_weights),
           "--input", str(images[1]), "--output", str(tmp_path / "vis"), "--score-thresh", "0.1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (tmp_path / "vis" / "second.png").stat().st_size > 0
