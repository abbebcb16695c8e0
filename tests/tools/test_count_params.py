"""The trainable-parameter counts the README states, and tools/count_params.py and tools/checkpoint_sizes.py.

Large trunks are built on the meta device: shapes without memory, so Swin-L and ViT-B count in seconds.
"""
import json
import subprocess
import sys

import pytest
import torch

from e3va import E3VASwin, E3VAViT
from e3va.engine.params import count_parameters
from helpers import REPO


def _trainable_millions(cls, size: str, tuning: str, monkeypatch) -> float:
    linspace = torch.linspace  # the trunks read their drop-path rates with .item(): keep those on the CPU
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))
    with torch.device("meta"):
        backbone = cls(size, tuning=tuning)
    return round(count_parameters(backbone)[0] / 1e6, 2)


@pytest.mark.parametrize(
    "cls, size, tuning, millions",
    [
        (E3VASwin, "L", "e3va", 1.79),  # README: "On Swin-L ... e3va 1.79 M, e3va_plus 3.53 M, e3va_plusplus 6.99 M"
        (E3VASwin, "L", "e3va_plus", 3.53),
        (E3VASwin, "L", "e3va_plusplus", 6.99),
        (E3VASwin, "B", "losa", 1.21),  # README: "Rank 45 trains 1.21 M parameters on Swin-B (0.46 M on Swin-T)"
        (E3VASwin, "T", "losa", 0.46),
        (E3VAViT, "B", "losa", 1.05),  # README's ViT config table
        (E3VAViT, "B", "e3va", 0.91),
    ],
)
def test_the_readmes_parameter_counts(cls, size, tuning, millions, monkeypatch):
    assert _trainable_millions(cls, size, tuning, monkeypatch) == millions


def test_nano_e3va_count_from_its_formula():
    """Per block two adapters of width C, bottleneck C/2, rank 8, dual branches, biases; four output norms."""
    expected = 0
    for dim, depth in zip((32, 64, 128, 256), (2, 2, 2, 2)):
        k, r = dim // 2, 8
        adapter = (2 * k * r + 2 * r * dim + k) + (2 * dim * r + 2 * r * k + dim)
        expected += depth * 2 * adapter + 2 * dim
    assert count_parameters(E3VASwin("nano", tuning="e3va"))[0] == expected


@pytest.mark.slow
def test_count_params_tool_prints_each_methods_count():
    cmd = [sys.executable, str(REPO / "tools" / "count_params.py"), "--size", "nano", "--methods", "fixed,e3va"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    e3va = count_parameters(E3VASwin("nano", tuning="e3va"))[0]
    assert "| fixed | 0 (0.00 M) |" in proc.stdout and f"| e3va | {e3va:,d} " in proc.stdout
    proc = subprocess.run([*cmd[:2], "--size", "XL"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "XL" in proc.stderr


@pytest.mark.slow
def test_checkpoint_sizes_tool_reports_a_task_file_far_smaller_than_the_checkpoint():
    config = str(REPO / "configs" / "Shapes" / "mask_rcnn_e3va.py")
    cmd = [sys.executable, str(REPO / "tools" / "checkpoint_sizes.py"), "--config-file", config, "--tuning", "e3va,full"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = {r["tuning"]: r for r in json.loads(proc.stdout.strip().splitlines()[-1])}
    e3va, full = records["e3va"], records["full"]
    # The backbone's part of the e3va task file is its highway and output norms, in fp32.
    assert e3va["backbone_trainable_bytes"] == 4 * count_parameters(E3VASwin("nano", tuning="e3va"))[0]
    # Full fine-tuning's holds every backbone tensor (index buffers ride with the attention that owns them).
    assert full["backbone_trainable_bytes"] == full["backbone_full_bytes"]
    assert e3va["trainable_only_bytes"] < min(full["trainable_only_bytes"], e3va["full_bytes"])

