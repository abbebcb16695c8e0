"""tools/saved_input_drift.py: compact storage keeps less for backward, and moves gradients by what it reports."""
import json
import subprocess
import sys

from helpers import REPO


def test_saved_input_drift_reports_memory_and_gradient_error_per_dtype(tmp_path):
    cmd = [sys.executable, str(REPO / "tools" / "saved_input_drift.py"), "--size", "nano", "--input-size", "64",
           "--output", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(results) == ["float32", "bfloat16", "float8_e4m3fn"]
    exact, bf16, fp8 = results.values()
    assert exact["grad_rel_l2"] == 0.0
    assert fp8["saved_mb"] < bf16["saved_mb"] < exact["saved_mb"]
    assert 0.0 < bf16["grad_rel_l2"] < fp8["grad_rel_l2"] < 0.1, results
    assert json.loads((tmp_path / "nano_e3va_64.json").read_text())["results"] == results


def test_unknown_dtype_lists_the_valid_ones():
    cmd = [sys.executable, str(REPO / "tools" / "saved_input_drift.py"), "--size", "nano", "--dtypes", "int4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "float8_e4m3fn" in proc.stderr
