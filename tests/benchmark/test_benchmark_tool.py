"""tools/benchmark_tuning.py: per-method processes, results.json / .md / .png, and its errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import e3va.benchmark.runner as runner_module
from e3va import TUNING_METHODS
from e3va.benchmark import (
    RECORD_FIELDS,
    BenchmarkSettings,
    build_with_shared_weights,
    failed_record,
    format_markdown_table,
    load_benchmark_config,
    load_note,
    merge_rounds,
    paired_time_ratios,
    plot_results,
    run_benchmark,
    write_markdown,
)
from e3va.benchmark.measure import reference_overrides
from e3va.synthetic import synthetic_batch
from helpers import REPO

TOOL = REPO / "tools" / "benchmark_tuning.py"
CONFIG = "configs/COCO/mask_rcnn_swin_t_e3va.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_tool(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_two_methods_end_to_end(tmp_path):
    out = tmp_path / "bench"
    proc = run_tool("--config-file", CONFIG, "--methods", "fixed,e3va", "--iters", "2", "--warmup", "1",
                    "--input-size", "64", "--batch-size", "1", "--output", str(out),
                    "model.backbone.bottom_up.size=nano")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    records = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in records] == ["fixed", "e3va"]
    for r in records:
        assert set(RECORD_FIELDS) <= set(r), set(RECORD_FIELDS) - set(r)
        assert r["status"] == "ok", r["status"]
        assert r["peak_memory_mb"] > 0 and r["peak_rss_abs_mb"] >= r["peak_memory_mb"]
        assert r["step_time_s"] > 0 and len(r["step_times_s"]) == 2
        assert r["step_cpu_time_s"] > 0 and len(r["step_cpu_times_s"]) == 2
        assert r["trainable_params"] == r["backbone_trainable_params"]
        assert r["head_trainable_params"] > 0
        assert r["backbone_trainable_params"] + r["head_trainable_params"] < r["total_params"]
        assert r["input_size"] == 64 and r["batch_size"] == 1 and r["config"] == CONFIG
        assert r["device"].startswith("cpu: ") and r["torch_version"]
        assert r["malloc_mmap_threshold"] == "131072"  # the worker got the allocator setting
    fixed, e3va = records
    # Shared weights and seeds: the zero-initialised highway starts exactly where `fixed` does.
    assert e3va["losses"][0] == pytest.approx(fixed["losses"][0], rel=1e-6)
    assert fixed["backbone_trainable_params"] == 0 < e3va["backbone_trainable_params"]
    assert fixed["head_trainable_params"] == e3va["head_trainable_params"]  # same heads for every method
    assert fixed["total_params"] < e3va["total_params"]  # the highway's adapters exist only with e3va

    md = (out / "results.md").read_text()
    assert "| fixed |" in md and "| e3va |" in md and "Memory vs fixed" in md
    assert "--methods fixed,e3va" in md and "64×64, batch 1" in md
    png = (out / "results.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000
    assert "fixed" in proc.stdout and "e3va" in proc.stdout  # one line per method as it finishes


@pytest.mark.slow
def test_vit_config_and_losa(tmp_path):
    """The tool finds a ViT config's backbone (``model.backbone.net``) and measures losa beside fixed."""
    out = tmp_path / "bench_vit"
    proc = run_tool("--config-file", "configs/COCO/mask_rcnn_vit_b_losa.py", "--methods", "fixed,losa",
                    "--iters", "1", "--warmup", "0", "--input-size", "64", "--batch-size", "1",
                    "--output", str(out), "model.backbone.net.size=nano", "model.backbone.net.img_size=64",
                    "model.backbone.net.window_size=2", "model.backbone.square_pad=64")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fixed, losa = json.loads((out / "results.json").read_text())
    assert (fixed["method"], losa["method"]) == ("fixed", "losa")
    assert fixed["status"] == losa["status"] == "ok"
    assert fixed["backbone_trainable_params"] == 0 < losa["backbone_trainable_params"]
    assert fixed["head_trainable_params"] == losa["head_trainable_params"]


@pytest.mark.parametrize("method, option", [
    ("e3va", None), ("lora", None),
    # an ablation's option that the `fixed` reference has no module for (it refuses it) still benchmarks
    ("e3va", "model.backbone.bottom_up.adapter_arrangement=stacked"),
    ("e3va", "model.backbone.bottom_up.highway_merging=trainable"),
])
def test_every_method_gets_the_weights_it_shares_with_fixed(method, option):
    nano = ["model.backbone.bottom_up.size=nano"]

    def build(m, overrides):
        settings = BenchmarkSettings(config_file=CONFIG, overrides=overrides)
        return build_with_shared_weights(load_benchmark_config(CONFIG, overrides, m), settings, m).state_dict()

    fixed, tuned = build("fixed", nano), build(method, nano + ([option] if option else []))
    tuned = {k.replace(".base_layer", ""): v for k, v in tuned.items()}
    assert set(fixed) < set(tuned)
    assert all(torch.equal(fixed[k], tuned[k]) for k in fixed)


def test_unknown_method_is_named_and_valid_ones_listed(tmp_path):
    proc = run_tool("--config-file", CONFIG, "--methods", "fixed,e3vaa", "--output", str(tmp_path / "x"),
                    timeout=120)
    assert proc.returncode != 0
    assert "e3vaa" in proc.stderr
    assert all(name in proc.stderr for name in TUNING_METHODS)
    assert not (tmp_path / "x").exists()  # rejected before any work


def test_writers_handle_a_failed_method(tmp_path):
    settings = BenchmarkSettings(CONFIG, input_size=64, batch_size=1, iters=2, warmup=1)
    ok = {k: None for k in RECORD_FIELDS}
    ok.update(method="fixed", status="ok", backbone_trainable_params=0, head_trainable_params=20_000_000,
              trainable_params=0, total_params=48_000_000, peak_memory_mb=995.0, step_time_s=2.0,
              step_times_s=[2.0, 2.0], device="cpu: test")
    full = dict(ok, method="full", backbone_trainable_params=28_000_000, trainable_params=28_000_000,
                peak_memory_mb=2247.0, step_time_s=4.0)
    failed = failed_record("e3va", settings, "killed by signal SIGKILL (likely out of memory)",
                           backbone_trainable_params=500_000)
    assert set(RECORD_FIELDS) <= set(failed) and failed["status"].startswith("failed: ")
    records = [full, ok, failed]
    assert load_note(records) is None  # no load readings, no line
    busy = [dict(ok, load_avg_1m_before=1.0, load_avg_1m_after=3.9, num_threads=2)]
    assert "1.0–3.9" in load_note(busy) and "competed" in load_note(busy)

    table = format_markdown_table(records, {"Command": "python tools/benchmark_tuning.py ..."})
    assert "| e3va (failed) |" in table and "SIGKILL" in table
    assert "| fixed | 0 | -100.0% |" in table  # Δ% vs full
    assert "2.26×" in table  # full's memory vs fixed's
    assert write_markdown(records, tmp_path / "r.md").read_text() == format_markdown_table(records)
    png = plot_results(records, tmp_path / "r.png", title="with a failure").read_bytes()
    assert png.startswith(PNG_MAGIC)
    # Only failures, and no reference method: still a table, dashes for the missing numbers.
    assert "| e3va (failed) | 0.50 | — |" in format_markdown_table([failed])
    assert plot_results([failed], tmp_path / "only_failed.png").read_bytes().startswith(PNG_MAGIC)


def test_synthetic_batch_is_seeded_and_scales_with_the_image():
    a, b = synthetic_batch(2, 128, seed=3, num_instances=4), synthetic_batch(2, 128, seed=3, num_instances=4)
    for x, y in zip(a, b):
        assert (x["image"] == y["image"]).all()
        assert (x["instances"].gt_boxes.tensor == y["instances"].gt_boxes.tensor).all()
    inst = a[0]["instances"]
    assert len(inst) == 4 and inst.gt_masks.tensor.shape == (4, 128, 128)
    assert inst.gt_boxes.tensor.max() <= 128 and inst.gt_masks.tensor.flatten(1).any(dim=1).all()
    with pytest.raises(ValueError, match="num_instances"):
        synthetic_batch(num_instances=0)


def _round_record(method, round_, step, memory, status="ok"):
    r = {k: None for k in RECORD_FIELDS}
    r.update(method=method, status=status, round=round_, backbone_trainable_params=0, head_trainable_params=10,
             trainable_params=0, total_params=100, peak_memory_mb=memory, step_time_s=step,
             step_times_s=[step, step], load_avg_1m_before=1.0 + round_, load_avg_1m_after=1.5)
    return r


def test_rounds_are_interleaved_rotated_and_merged_to_medians(tmp_path, monkeypatch):
    calls = []
    # Host speed drifts: every method is 1.5x slower in round 2. Paired ratios must not see it.
    speed = {1: 1.0, 2: 1.5, 3: 1.1}
    cost = {"fixed": 10.0, "e3va": 11.0, "lora": 14.0}

    def fake_run(method, settings, work_dir, *, timeout=None):
        calls.append((method, Path(work_dir).name))
        k = int(Path(work_dir).name.removeprefix("round"))
        return _round_record(method, k, cost[method] * speed[k], 800.0 + 10 * k + (method != "fixed") * 100)

    monkeypatch.setattr(runner_module, "run_method_isolated", fake_run)
    settings = BenchmarkSettings(CONFIG, input_size=64, batch_size=1, iters=2, warmup=0)
    seen = []
    records = run_benchmark(["fixed", "e3va", "lora"], settings, tmp_path, rounds=3, on_record=seen.append)
    assert [m for m, _ in calls] == ["fixed", "e3va", "lora", "e3va", "lora", "fixed", "lora", "fixed", "e3va"]
    assert [d for _, d in calls] == ["round1"] * 3 + ["round2"] * 3 + ["round3"] * 3
    assert [r["round"] for r in seen] == [1, 1, 1, 2, 2, 2, 3, 3, 3]

    fixed, e3va, lora = records
    assert [r["method"] for r in records] == ["fixed", "e3va", "lora"] and e3va["rounds"] == 3
    assert e3va["round_step_time_s"] == pytest.approx([11.0, 16.5, 12.1])
    assert e3va["step_time_s"] == pytest.approx(12.1) and len(e3va["step_times_s"]) == 6
    assert e3va["peak_memory_mb"] == pytest.approx(920.0)  # median of 910, 920, 930
    assert (e3va["load_avg_1m_before"], e3va["load_avg_1m_after"]) == (1.5, 4.0)
    assert paired_time_ratios(e3va, fixed) == pytest.approx([1.1, 1.1, 1.1])
    table = format_markdown_table(records)
    assert "| 1.10× (1.10–1.10) |" in table and "1.40× (1.40–1.40)" in table  # the drift cancels
    assert plot_results(records, tmp_path / "rounds.png").read_bytes().startswith(PNG_MAGIC)

    with pytest.raises(ValueError, match="rounds must be an integer >= 1, got 0"):
        run_benchmark(["fixed"], settings, tmp_path, rounds=0)


def test_a_failure_in_any_round_fails_the_method():
    runs = [_round_record("e3va", 1, 2.0, 900.0),
            _round_record("e3va", 2, None, None, status="failed: killed by signal SIGKILL"),
            _round_record("fixed", 1, 2.0, 800.0)]
    e3va, fixed = merge_rounds(runs)
    assert e3va["status"] == "failed: in round 2 of 2: killed by signal SIGKILL"
    assert fixed["status"] == "ok" and "rounds" not in fixed  # one record: returned as it was
    assert paired_time_ratios(fixed, fixed) == []  # one round: no per-round ratios
    assert "| e3va (failed) |" in format_markdown_table([fixed, e3va])


def test_the_reference_is_built_without_the_methods_own_options():
    given = ["model.backbone.bottom_up.highway_merging=trainable", "model.backbone.bottom_up.adapter_input=sublayer_input",
             "model.backbone.bottom_up.drop_path_rate=0.3", "model.backbone.bottom_up.fused_adapters=False"]
    assert reference_overrides(given) == ["model.backbone.bottom_up.drop_path_rate=0.3"]
