"""tools/trunk_precision_drift.py: a bf16 trunk stays close to fp32, and the tool reports by how much."""
import pytest
import json
import subprocess
import sys

from helpers import REPO


def test_bfloat16_drift_is_reported_per_level_and_small():
    cmd = [sys.executable, str(REPO / "tools" / "trunk_precision_drift.py"), "--size", "nano", "--input-size", "96"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    drift = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(drift) == {"p0", "p1", "p2", "p3"}
    for level in drift.values():
        assert 0.0 < level["max_abs_diff"] < 0.15, level  # bf16 differs, but little: LayerNorm-scaled outputs
        assert level["fp32_std"] > 0.1


@pytest.mark.slow
def test_compiled_trunk_drift_and_timing_are_reported():
    cmd = [sys.executable, str(REPO / "tools" / "trunk_precision_drift.py"), "--size", "nano", "--input-size", "64",
           "--dtype", "float32", "--compile", "eager", "--time", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    drift = json.loads(proc.stdout.strip().splitlines()[-1])
    timing = drift.pop("timing")
    assert set(drift) == {"p0", "p1", "p2", "p3"}
    assert all(level["max_abs_diff"] < 1e-4 for level in drift.values()), drift  # the same fp32 computation
    assert len(timing["variant_s"]) == len(timing["reference_s"]) == 1 and timing["variant_median_s"] > 0
    assert "compiled (eager)" in proc.stdout


def test_comparing_fp32_with_itself_is_refused():
    cmd = [sys.executable, str(REPO / "tools" / "trunk_precision_drift.py"), "--size", "nano", "--dtype", "float32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "compare the reference with itself" in proc.stderr
