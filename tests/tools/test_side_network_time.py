"""tools/side_network_time.py: backbone time per method, interleaved, with the overhead against fixed."""
import pytest
import json
import subprocess
import sys

from helpers import REPO

TOOL = str(REPO / "tools" / "side_network_time.py")


@pytest.mark.slow
def test_times_and_overheads_are_reported_per_method(tmp_path):
    cmd = [sys.executable, TOOL, "--size", "nano", "--input-size", "64", "--batch-size", "1", "--iters", "3",
           "--warmup", "1", "--methods", "e3va,losa", "--output", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert list(summary) == ["fixed", "e3va", "losa"]  # fixed, the reference, always runs first
    record = json.loads((tmp_path / "swin_nano_64.json").read_text())
    results = record["results"]
    assert results["fixed"]["trainable_params"] == 0
    assert results["fixed"]["overhead_s"] == [0.0, 0.0, 0.0]
    for method in ("e3va", "losa"):
        r = results[method]
        assert r["trainable_params"] > 0 and len(r["times_s"]) == 3 and min(r["times_s"]) > 0
        fixed_times = results["fixed"]["times_s"]
        assert r["overhead_s"] == [t - f for t, f in zip(r["times_s"], fixed_times)]
        assert summary[method]["overhead_median_s"] == r["overhead_quartiles_s"][1]


def test_unknown_method_lists_the_valid_ones():
    proc = subprocess.run([sys.executable, TOOL, "--size", "nano", "--methods", "e3vaa"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "e3vaa" in proc.stderr and "e3va_plusplus" in proc.stderr
