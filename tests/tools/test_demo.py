"""`make demo` end to end, shortened: shapes data, training through Detectron2's engine from the shipped
pretrained trunk, COCO evaluation, prediction images drawn with Detectron2's Visualizer."""
import pytest
import json
import os
import subprocess
import sys

import cv2
import numpy as np

from e3va import NANO_SWIN_WEIGHTS
from helpers import REPO


@pytest.mark.slow
def test_demo_trains_evaluates_and_draws(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "E3VA_DATASETS": str(tmp_path / "shapes")}
    init = str(NANO_SWIN_WEIGHTS) if NANO_SWIN_WEIGHTS.is_file() else ""
    cmd = [sys.executable, str(REPO / "tools" / "demo.py"), "--max-iter", "3", "--num-images", "2",
           "--output-dir", str(out), "--score-thresh", "0.0", "train.log_period=1",
           f"train.init_checkpoint={init}", "dataloader.test.dataset.names=shapes_val"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "E3VA demo: done" in proc.stdout

    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["tuning"] == "e3va" and summary["iterations"] == 3
    assert 0 <= summary["bbox_AP"] <= 100 and 0 <= summary["segm_AP"] <= 100
    assert summary["peak_rss_mb"] > 0 and summary["trainable_params"] < summary["total_params"]
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert any("peak_rss_mb" in m for m in metrics)
    assert (out / "model_final.pth").is_file()

    drawings = sorted((out / "predictions").glob("*.png"))
    assert len(drawings) == 2
    for path in drawings:
        drawn = cv2.imread(str(path))
        source = cv2.imread(str(tmp_path / "shapes" / "val" / path.name))
        assert drawn is not None and source is not None
        # prediction | ground truth, each drawn at twice the image size, over the original pixels
        assert drawn.shape[0] == 2 * source.shape[0] and drawn.shape[1] == 4 * source.shape[1]
        gt = drawn[:, drawn.shape[1] // 2:]
        assert not np.array_equal(cv2.resize(source, gt.shape[1::-1]), gt)
