"""tools/transfer_study.py: methods x seeds in their own processes, a learning rate chosen on the validation
split, mean ± std tables and a plot; and the seeded determinism the study relies on."""
import json
import os
import subprocess
import sys

import pytest
import torch

from e3va import NANO_SWIN_WEIGHTS
from helpers import REPO, load_tool

INIT = str(NANO_SWIN_WEIGHTS) if NANO_SWIN_WEIGHTS.is_file() else ""


def _tool():
    return load_tool("transfer_study")


def _record(method, lr, seed, split, status="ok", **fields):
    """A run record as train_and_evaluate returns it, for the fakes that stand in for training."""
    return {"params": {"method": method, "backbone_lr": lr, "seed": seed, "split": split}, "status": status, **fields}


FINISHED = {"segm_AP": 1.0, "peak_rss_mb": 100.0, "mean_iter_time_s": 1.0, "backbone_trainable_params": 5}


@pytest.mark.slow
def test_two_methods_two_seeds_give_json_markdown_and_plot(tmp_path):
    env = {**os.environ, "E3VA_DATASETS": str(tmp_path / "shapes")}
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "tools" / "transfer_study.py"), "--methods", "fixed,e3va", "--seeds", "0,1",
           "--max-iter", "2", "--output", str(out), f"train.init_checkpoint={INIT}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((out / "transfer.json").read_text())
    methods = {m["method"]: m for m in data["methods"]}
    assert list(methods) == ["fixed", "e3va"]
    for m in methods.values():
        assert m["seeds"] == [0, 1] and not m["failed"]
        assert m["bbox_AP"]["n"] == 2 and m["bbox_AP"]["std"] is not None
        assert m["chosen_backbone_lr"] == pytest.approx(1e-3)
    assert methods["fixed"]["backbone_trainable_params"] == 0 < methods["e3va"]["backbone_trainable_params"]
    assert sorted((r["params"]["method"], r["params"]["seed"]) for r in data["runs"]) == [
        ("e3va", 0), ("e3va", 1), ("fixed", 0), ("fixed", 1)]
    table = (out / "transfer.md").read_text()
    assert "| fixed |" in table and "| e3va |" in table and "±" in table and "--seeds 0,1" in table
    assert (out / "transfer.png").stat().st_size > 1000
    # Resumable: a second call keeps every finished run (no training happens, so it is quick).
    mtimes = {p: p.stat().st_mtime for p in out.rglob("demo_summary.json")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and {p: p.stat().st_mtime for p in mtimes} == mtimes

    # Deterministic: one run again, elsewhere (same seed, same machine), gives the same AP and the same trained
    # weights (seeded initialisation, data order and flips).
    again = tmp_path / "again"
    cmd = [sys.executable, str(REPO / "tools" / "transfer_study.py"), "--methods", "e3va", "--seeds", "1",
           "--max-iter", "2", "--output", str(again), f"train.init_checkpoint={INIT}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (first,), (second,) = (list(root.glob("runs/e3va/*/seed1")) for root in (out, again))
    aps = [{k: json.loads((d / "run.json").read_text())[k] for k in ("bbox_AP", "segm_AP")} for d in (first, second)]
    assert aps[0] == aps[1]
    w_a, w_b = (torch.load(d / "model_final.pth", weights_only=True)["model"] for d in (first, second))
    trained = [k for k in w_a if "highway" in k or "roi_heads" in k]
    assert trained and all(torch.equal(w_a[k], w_b[k]) for k in trained)


def test_the_sweep_chooses_on_the_validation_split_never_the_test_split(tmp_path, monkeypatch):
    tool = _tool()
    calls = []
    # Validation prefers 3e-3, the test split would prefer 3e-4: the study must pick 3e-3.
    ap = {("shapes_minival", 3e-4): 10.0, ("shapes_minival", 1e-3): 20.0, ("shapes_minival", 3e-3): 30.0,
          ("shapes_val", 3e-4): 90.0, ("shapes_val", 1e-3): 5.0, ("shapes_val", 3e-3): 6.0}

    def fake_run(out, method, lr, seed, split, max_iter, opts, only_finished=False):
        calls.append((split, lr, seed))
        return _record(method, lr, seed, split, bbox_AP=ap[(split, lr)] + seed, **FINISHED)

    monkeypatch.setattr(tool, "train_and_evaluate", fake_run)
    (summary,) = tool.study(["e3va"], [0, 1], [3e-4, 1e-3, 3e-3], 2, tmp_path, [], "cmd")
    assert summary["chosen_backbone_lr"] == 3e-3
    assert [c for c in calls if c[0] == "shapes_minival"] == [("shapes_minival", lr, 0) for lr in (3e-4, 1e-3, 3e-3)]
    assert [c for c in calls if c[0] == "shapes_val"] == [("shapes_val", 3e-3, 0), ("shapes_val", 3e-3, 1)]
    assert summary["bbox_AP"]["mean"] == pytest.approx(6.5) and summary["bbox_AP_per_seed"] == [6.0, 7.0]
    assert "lr 0.003: 30.0" in (tmp_path / "transfer.md").read_text()


def test_the_first_seed_reuses_the_chosen_sweep_run_and_the_choice_ignores_its_test_ap(tmp_path, monkeypatch):
    tool = _tool()
    calls = []

    def fake_run(out, method, lr, seed, split, max_iter, opts, only_finished=False):
        calls.append((split, lr, seed))
        # The sweep runs' test-split AP prefers 1e-3, their validation AP prefers 3e-3.
        also = {"shapes_val": {"bbox_AP": 50.0 if lr == 1e-3 else 40.0, "segm_AP": 2.0}}
        return _record(method, lr, seed, split, bbox_AP={1e-3: 20.0, 3e-3: 30.0}[lr] + seed, **FINISHED,
                       **({"also_evaluated": also} if split == "shapes_minival" else {}))

    monkeypatch.setattr(tool, "train_and_evaluate", fake_run)
    (summary,) = tool.study(["e3va"], [0, 1], [1e-3, 3e-3], 2, tmp_path, [], "cmd")
    assert summary["chosen_backbone_lr"] == 3e-3
    # Seed 0 at 3e-3 is the sweep's run (its test AP, 40), only seed 1 trains again.
    assert [c for c in calls if c[0] == "shapes_val"] == [("shapes_val", 3e-3, 1)]
    assert summary["bbox_AP_per_seed"] == [40.0, 31.0]


def test_given_rates_skip_the_sweep_and_only_finished_trains_nothing(tmp_path, monkeypatch):
    tool = _tool()
    monkeypatch.setattr(tool.subprocess, "run", lambda *a, **k: pytest.fail("--only-finished must not train"))
    (summary,) = tool.study(["full"], [0, 1], [3e-4, 1e-3], 2, tmp_path, [], "cmd", {"full": 1e-4}, True)
    assert summary["chosen_backbone_lr"] == 1e-4 and summary["lr_source"] == "given" and not summary["sweep"]
    assert summary["missing_seeds"] == [0, 1] and summary["bbox_AP"]["n"] == 0
    assert "full seed 0, full seed 1" in (tmp_path / "transfer.md").read_text()


def test_a_partly_finished_sweep_chooses_nothing_and_names_what_is_missing(tmp_path, monkeypatch):
    tool = _tool()

    def fake_run(out, method, lr, seed, split, max_iter, opts, only_finished=False):
        done = split == "shapes_minival" and lr == 3e-4  # the 1e-3 sweep run has not run yet
        return _record(method, lr, seed, split, "ok" if done else "missing", bbox_AP=30.0 if done else None)

    monkeypatch.setattr(tool, "train_and_evaluate", fake_run)
    (summary,) = tool.study(["lora"], [0, 1], [3e-4, 1e-3], 2, tmp_path, [], "cmd", None, True)
    assert summary["chosen_backbone_lr"] is None and summary["lr_source"] == "sweep unfinished"
    assert summary["missing_sweep"] == [1e-3]
    assert "lora sweep at 0.001" in (tmp_path / "transfer.md").read_text()


def test_a_failed_sweep_run_chooses_nothing_and_trains_no_seed(tmp_path, monkeypatch):
    tool = _tool()
    calls = []

    def fake_run(out, method, lr, seed, split, max_iter, opts, only_finished=False):
        calls.append(split)
        ok = lr == 3e-4  # the 1e-3 sweep run crashed
        return _record(method, lr, seed, split, "ok" if ok else "failed (exit 1)", bbox_AP=30.0 if ok else None)

    monkeypatch.setattr(tool, "train_and_evaluate", fake_run)
    (summary,) = tool.study(["lora"], [0, 1], [3e-4, 1e-3], 2, tmp_path, [], "cmd")
    assert summary["chosen_backbone_lr"] is None and calls == ["shapes_minival", "shapes_minival"]
    assert "lora: failed (exit 1)" in (tmp_path / "transfer.md").read_text()


def test_a_method_can_sweep_its_own_rates(tmp_path, monkeypatch):
    """--backbone-lr full=1e-4:3e-4: full sweeps those two on the validation split, the others --lr-sweep's."""
    tool = _tool()
    calls = []

    def fake_run(out, method, lr, seed, split, max_iter, opts, only_finished=False):
        calls.append((method, split, lr))
        return _record(method, lr, seed, split, bbox_AP=10.0 + 1e4 * lr, **FINISHED)

    monkeypatch.setattr(tool, "train_and_evaluate", fake_run)
    monkeypatch.setattr(tool, "plot", lambda *a: None)
    study, seen = tool.study, {}
    monkeypatch.setattr(tool, "study", lambda *a: seen.setdefault("method_lrs", a[7]))
    tool.main(["--methods", "full,e3va", "--lr-sweep", "3e-4,1e-3", "--backbone-lr", "full=1e-4:3e-4"])
    assert seen["method_lrs"] == {"full": [1e-4, 3e-4]}
    full, e3va = study(["full", "e3va"], [0], [3e-4, 1e-3], 2, tmp_path, [], "cmd", seen["method_lrs"])
    assert [c[2] for c in calls if c[:2] == ("full", "shapes_minival")] == [1e-4, 3e-4]
    assert [c[2] for c in calls if c[:2] == ("e3va", "shapes_minival")] == [3e-4, 1e-3]
    assert (full["chosen_backbone_lr"], full["lr_source"]) == (3e-4, "chosen on shapes_minival")
    assert e3va["chosen_backbone_lr"] == 1e-3


def test_the_run_overrides_select_the_split_the_seed_and_the_backbone_rate(tmp_path, monkeypatch):
    tool = _tool()
    seen = {}

    def fake_subprocess_run(cmd, stdout, stderr):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(tool.subprocess, "run", fake_subprocess_run)
    record = tool.train_and_evaluate(tmp_path, "lora", 3e-4, 2, "shapes_minival", 5, ["x.y=1"])
    assert record["status"].startswith("failed")
    cmd = seen["cmd"]
    assert "train.seed=2" in cmd and "x.y=1" in cmd and "--max-iter" in cmd
    assert any(c.startswith("optimizer.params.lr_factor_func.factor=0.3") for c in cmd)
    assert "dataloader.test.dataset.names=shapes_minival" in cmd
    assert "dataloader.evaluator.dataset_name=shapes_minival" in cmd
    assert cmd[cmd.index("--also-evaluate") + 1] == "shapes_val"


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--methods", "e3va,bogus"], "e3va_plus"),
        (["--seeds", "0,x"], "--seeds"),
        (["--seeds", "0,0"], "without repeats"),
        (["--seeds", "-1"], "non-negative"),
        (["--lr-sweep", "1e-3,-2"], "positive"),
        (["--methods", "e3va", "--backbone-lr", "full=1e-4"], "'full' is not one of --methods"),
        (["--methods", "full", "--backbone-lr", "full=fast"], "METHOD=LR"),
        (["--methods", "full", "--backbone-lr", "full=1e-4:-1"], "rates must be positive"),
        (["--methods", "full", "--backbone-lr", "full=1e-4:1e-4"], "without repeats"),
        (["--methods", "full", "--backbone-lr", "full=1e-4,full=3e-4"], "names 'full' twice"),
    ],
)
def test_bad_arguments_are_named(args, needle, capsys):
    with pytest.raises(SystemExit):
        _tool().main(args)
    assert needle in capsys.readouterr().err
