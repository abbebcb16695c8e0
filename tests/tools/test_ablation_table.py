"""tools/ablation_table.py: one row per variant from the study's files; missing runs say so."""
import json

from helpers import load_tool


def _study(path, per_seed, std):
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {"mean": sum(per_seed) / len(per_seed), "std": std, "n": len(per_seed)}
    path.write_text(json.dumps({"methods": [{"method": "e3va", "seeds": [0, 1, 2][: len(per_seed)], "missing_seeds": [],
                                             "bbox_AP": summary, "segm_AP": summary, "bbox_AP_per_seed": per_seed,
                                             "segm_AP_per_seed": per_seed}]}))


def test_rows_come_from_the_files_and_missing_runs_are_named(tmp_path):
    _study(tmp_path / "reference.json", [38.0, 36.0, 37.0], 1.0)
    _study(tmp_path / "abl" / "stacked" / "transfer.json", [35.25], None)
    bench = tmp_path / "abl" / "swin_b_memory" / "stacked" / "results.json"
    bench.parent.mkdir(parents=True)
    bench.write_text(json.dumps([{"method": "e3va", "status": "ok", "backbone_trainable_params": 1_204_000,
                                  "peak_memory_mb": 1234.4, "step_time_s": 20.04}]))
    loaded = tmp_path / "abl" / "swin_b_memory" / "merging" / "results.json"
    loaded.parent.mkdir(parents=True)
    loaded.write_text(json.dumps([{"method": "e3va", "status": "ok", "backbone_trainable_params": 3_950_000,
                                   "peak_memory_mb": 1055.8, "step_time_s": 54.0}]))
    for round_name, readings in {"round1": {"paper": 30.0, "stacked": 36.0}, "round2": {"paper": 40.0, "stacked": 44.0},
                                 "round3": {"stacked": 100.0, "direct": 50.0}}.items():  # round 3: no e3va
        for name, step in readings.items():
            path = tmp_path / "abl" / "swin_b_time" / round_name / name / "results.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps([{"method": "e3va", "status": "ok", "step_time_s": 2 * step,
                                         "step_cpu_time_s": step}]))  # a busy host: wall time is not read
    rows = {line.split(" | ")[0].lstrip("| "): line
            for line in load_tool("ablation_table").table(tmp_path / "abl", tmp_path / "reference.json").splitlines()}
    paper = rows["e3va (the paper's)"]
    assert "| 37.0 ± 1.0 | 37.0 ± 1.0 | 0, 1, 2 | not run | not run | 35.0 (2 rounds) | 1.00 |" in paper
    # step: median over rounds (36, 44, 100); ratio: median of the same-round ratios (1.2, 1.1), not 44 / 35
    assert "| 35.2 | 35.2 | 0 | 1.20 | 1234 | 44.0 (3 rounds) | 1.15 | parallel is better" in rows["stacked"]
    # only in a round without e3va's reading: a time, but no ratio (never a NaN)
    assert "| not run |  | not run | not run | 50.0 (1 round) | no e3va reading in its rounds |" in rows["direct"]
    # the memory run's own step time is not shown
    assert "| 3.95 | 1056 | not run | not run | many more parameters" in rows["merging"]
