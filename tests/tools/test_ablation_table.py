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
                                   "peak_memory_mb": 1055.8, "step_time_s": 54.0, "load_avg_1m_before": 3.84,
                                   "load_avg_1m_after": 5.06}]))
    rows = {line.split(" | ")[0].lstrip("| "): line
            for line in load_tool("ablation_table").table(tmp_path / "abl", tmp_path / "reference.json").splitlines()}
    assert "| 37.0 ± 1.0 | 37.0 ± 1.0 | 0, 1, 2 | not run |" in rows["e3va (the paper's)"]
    assert "| 35.2 | 35.2 | 0 | 1.20 | 1234 | 20.0 | parallel is better and faster |" in rows["stacked"]
    assert "| not run | not run |  | not run |" in rows["direct"]
    assert "| 3.95 | 1056 | 54.0 (load 3.8–5.1) | many more parameters" in rows["merging"]  # the host's load, named
