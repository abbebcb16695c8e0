"""tools/transfer_study.py trains each method in its own process and tabulates COCO AP."""
import json
import os
import subprocess
import sys

from e3va import NANO_SWIN_WEIGHTS
from helpers import REPO


def test_transfer_study_tabulates_two_methods(tmp_path):
    env = {**os.environ, "E3VA_DATASETS": str(tmp_path / "shapes")}
    init = str(NANO_SWIN_WEIGHTS) if NANO_SWIN_WEIGHTS.is_file() else ""
    cmd = [sys.executable, str(REPO / "tools" / "transfer_study.py"), "--methods", "fixed,e3va",
           "--max-iter", "2", "--output", str(tmp_path / "out"), f"train.init_checkpoint={init}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    records = json.loads((tmp_path / "out" / "transfer.json").read_text())
    assert [r["tuning"] for r in records] == ["fixed", "e3va"]
    assert all(r["status"] == "ok" for r in records)
    assert records[0]["backbone_trainable_params"] == 0 < records[1]["backbone_trainable_params"]
    table = (tmp_path / "out" / "transfer.md").read_text()
    assert "| fixed |" in table and "| e3va |" in table and "transfer_study.py" in table


def test_transfer_study_rejects_unknown_methods(tmp_path):
    cmd = [sys.executable, str(REPO / "tools" / "transfer_study.py"), "--methods", "e3va,bogus"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "bogus" in proc.stderr and "e3va_plus" in proc.stderr
