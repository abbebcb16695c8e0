"""Multi-process training on the CPU over gloo, through Detectron2's launch and PyTorch DDP.

The runs are short trainings of the Shapes Mask R-CNN config through tools/lazyconfig_train_net.py, on a
tiny registration of the shapes data (2 training images, one per process and step, no shuffling,
``num_workers=0``, so every run sees the same stream) and a constant learning rate, so that a run stopped
at iteration K and resumed to N follows the schedule of a run that went to N at once. The FPN uses
``norm="SyncBN"``, which the CPU runs swap for Detectron2's NaiveSyncBatchNorm.

One uninterrupted 2-process run (``--num-gpus 2``) serves several tests: it trains, evaluates on both
processes' shards, and is the reference for the resumed run and for the 1-process evaluation.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from detectron2.engine import default_argument_parser, launch
from detectron2.layers import ShapeSpec
from detectron2.utils import comm
from detectron2.utils.events import EventStorage

from e3va import TUNING_METHODS
from e3va.engine import distributed
from e3va.engine import training as tool
from e3va.engine.hooks import SUMMARY_FILENAME, combine_rank_summaries
from e3va.modeling import UperNetHead
from helpers import PAPER_METHODS, REPO, load_tool, synthetic_batch, tiny_detector

pytestmark = pytest.mark.slow  # every test here starts processes

MAX_ITER, STOP_AT, PERIOD = 6, 3, 2  # the interrupted run stops after iteration STOP_AT - 1
TIMEOUT = 300  # seconds for one launched run; a hung rendezvous fails the test instead of hanging CI


# ---- helpers
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp: Path, name: str, data: Path, *, max_iter: int, evaluate: bool = False,
            trainable_only: bool = False) -> Path:
    path = tmp / f"{name}.py"
    out = tmp / name
    evaluator = (f"_cfg.dataloader.evaluator.update(dataset_name='dist_val', output_dir={str(out / 'eval')!r})"
                 if evaluate else "del _cfg.dataloader.evaluator")
    path.write_text(f"""
from detectron2.config import LazyCall as L, LazyConfig
from detectron2.data.samplers import TrainingSampler
from fvcore.common.param_scheduler import LinearParamScheduler
from e3va.data.shapes import register_shapes_datasets

register_shapes_datasets(root={str(data)!r}, num_train=2, num_val=6, names=("dist_train", "dist_val"),
                         sem_seg_names=())
_cfg = LazyConfig.load({str(REPO / "configs" / "Shapes" / "mask_rcnn_e3va.py")!r})
_cfg.model.backbone.norm = "SyncBN"  # FPN; nn.SyncBatchNorm refuses CPU tensors, the engine swaps it
_cfg.dataloader.train.dataset.names = "dist_train"
_cfg.dataloader.test.dataset.names = "dist_val"
_cfg.dataloader.train.update(sampler=L(TrainingSampler)(size=2, shuffle=False), total_batch_size=2, num_workers=0)
_cfg.dataloader.test.num_workers = 0
{evaluator}
_cfg.lr_multiplier = L(LinearParamScheduler)(start_value=1.0, end_value=1.0)  # constant: independent of max_iter
_cfg.train.update(max_iter={max_iter}, seed=0, log_period=1, eval_period=0, output_dir={str(out)!r},
                  trainable_only_checkpoints={trainable_only})
_cfg.train.checkpointer.update(period={PERIOD}, max_to_keep=100)
model, dataloader, optimizer, lr_multiplier, train = (
    _cfg.model, _cfg.dataloader, _cfg.optimizer, _cfg.lr_multiplier, _cfg.train)
""")
    return path


def _command(config: Path, *extra: str) -> List[str]:
    return [sys.executable, str(REPO / "tools" / "lazyconfig_train_net.py"), "--config-file", str(config), *extra]


def _env() -> Dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # the same reduction order in every run


def _start(command: List[str], log: Path) -> subprocess.Popen:
    # Own session: on failure the launcher and the workers it spawned are killed together.
    with open(log, "w") as f:
        return subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)


def _wait(procs: List[subprocess.Popen], logs: List[Path]) -> None:
    try:
        for proc in procs:
            proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, f"{log.name} (exit {proc.returncode}):\n" + log.read_text()[-4000:]


def _run(config: Path, *extra: str) -> None:
    log = config.with_suffix(".log")
    _wait([_start(_command(config, *extra), log)], [log])


def _summary(out: Path) -> dict:
    return json.loads((out / SUMMARY_FILENAME).read_text())


def _flat(results: dict) -> Dict[str, float]:
    return {f"{task}/{k}": v for task, metrics in results.items() for k, v in metrics.items()}


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


# ---- the runs
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shapes")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, data) -> Path:
    """``--num-gpus 2`` on the CPU: MAX_ITER iterations, then evaluation on both shards."""
    tmp = tmp_path_factory.mktemp("two_process")
    _run(_config(tmp, "run", data, max_iter=MAX_ITER, evaluate=True), "--num-gpus", "2", "--dist-url", "auto")
    return tmp / "run"


@pytest.fixture(scope="module")
def two_machine_run(tmp_path_factory, data) -> Path:
    """Two "machines" on the loopback address, one process each, stopped after STOP_AT iterations, with
    trainable-only checkpoints."""
    tmp = tmp_path_factory.mktemp("two_machines")
    config = _config(tmp, "run", data, max_iter=STOP_AT, trainable_only=True)
    url = f"tcp://127.0.0.1:{_free_port()}"
    logs = [tmp / f"machine{rank}.log" for rank in (0, 1)]
    procs = [
        _start(_command(config, "--num-gpus", "1", "--num-machines", "2", "--machine-rank", str(rank),
                        "--dist-url", url), log)
        for rank, log in zip((0, 1), logs)
    ]
    _wait(procs, logs)
    return tmp / "run"


# ---- tests of the runs
def test_two_processes_train_on_cpu_with_one_writer(two_process_run):
    out = two_process_run
    summary = _summary(out)
    assert summary["world_size"] == 2 and [r["rank"] for r in summary["per_rank"]] == [0, 1]
    # Peak memory: each rank's own, the summary and the console the maximum.
    peaks = [r["peak_rss_mb"] for r in summary["per_rank"]]
    assert all(p > 0 for p in peaks) and summary["peak_rss_mb"] == max(peaks)
    console = (out / "log.txt").read_text()
    assert "(max over 2 processes)" in console
    # What DDP says it all-reduces is the trainable parameters' bytes.
    assert summary["ddp_gradient_bytes"] == summary["allreduce_bytes_per_step"] == 4 * summary["trainable_params"]
    # The FPN's SyncBN ran on the CPU, swapped, with a note.
    assert "Replaced 8 nn.SyncBatchNorm layers by Detectron2's NaiveSyncBatchNorm" in console

    # Checkpoints are written by rank 0 only, once each, under the unwrapped model's names.
    rank1 = (out / "log.txt.rank1").read_text()
    assert "Starting training from iteration 0" in rank1 and "Saving checkpoint" not in rank1
    saved = [Path(line.split("Saving checkpoint to ")[1]).name for line in console.splitlines()
             if "Saving checkpoint to" in line]
    assert saved == [f"model_{i:07d}.pth" for i in range(PERIOD - 1, MAX_ITER, PERIOD)] + ["model_final.pth"]
    state = torch.load(out / "model_final.pth", weights_only=True)["model"]
    assert state and not any(k.startswith("module.") for k in state)


def test_ranks_hold_identical_trainable_weights(two_process_run):
    per_rank = _summary(two_process_run)["per_rank"]
    fingerprints = {r["trainable_sha256"] for r in per_rank}
    assert len(fingerprints) == 1, per_rank


def test_two_machines_on_loopback_train_with_trainable_only_checkpoints(two_machine_run):
    summary = _summary(two_machine_run)
    assert summary["world_size"] == 2 and summary["iterations"] == STOP_AT
    assert len({r["trainable_sha256"] for r in summary["per_rank"]}) == 1
    checkpoint = torch.load(two_machine_run / "model_final.pth", weights_only=True)
    assert "e3va_trainable" in checkpoint and not any(k.startswith("module.") for k in checkpoint["model"])
    generators = checkpoint["trainer"]["hooks"]["RandomStateHook"]
    assert generators["world_size"] == 2 and all(s is not None for s in generators["ranks"])
    assert not (two_machine_run / "log.txt.rank1").read_text().count("Saving")


def test_resumed_two_process_run_ends_with_the_uninterrupted_weights(tmp_path, data, two_process_run,
                                                                      two_machine_run):
    # Resume, with 2 processes on one machine, the run the two "machines" stopped at STOP_AT.
    out = tmp_path / "run"
    shutil.copytree(two_machine_run, out)
    _run(_config(tmp_path, "run", data, max_iter=MAX_ITER, trainable_only=True),
         "--num-gpus", "2", "--dist-url", "auto", "--resume")
    assert f"Starting training from iteration {STOP_AT}" in (out / "log.txt").read_text()

    resumed = torch.load(out / "model_final.pth", weights_only=True)["model"]  # trainable part only
    reference = torch.load(two_process_run / "model_final.pth", weights_only=True)["model"]
    assert resumed and set(resumed) <= set(reference)
    for name, value in resumed.items():
        assert torch.equal(value, reference[name]), name


def test_two_process_evaluation_equals_one_process(tmp_path, data, two_process_run, restore_loggers):
    # The 2-process run's final evaluation, as EvalHook wrote it.
    records = [json.loads(line) for line in (two_process_run / "metrics.json").read_text().splitlines()]
    distributed_results = {k: v for k, v in records[-1].items() if k.startswith(("bbox/", "segm/"))}
    assert "bbox/AP" in distributed_results and "segm/AP" in distributed_results

    # The same weights evaluated here, in one process.
    config = _config(tmp_path, "single", data, max_iter=MAX_ITER, evaluate=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 in the launched runs: the same arithmetic
    try:
        args = default_argument_parser().parse_args(
            ["--config-file", str(config), "--eval-only", f"train.init_checkpoint={two_process_run / 'model_final.pth'}"]
        )
        single = _flat(tool.main(args))
    finally:
        torch.set_num_threads(threads)

    assert set(single) == set(distributed_results)
    assert all(_same(single[k], distributed_results[k]) for k in single), (single, distributed_results)
    # Six iterations leave the AP near 0, so the detections themselves are compared too: those gathered
    # from both shards are, for every image, the 1-process run's (boxes, masks and scores, bit for bit).
    gathered = json.loads((two_process_run / "eval" / "coco_instances_results.json").read_text())
    alone = json.loads((tmp_path / "single" / "eval" / "coco_instances_results.json").read_text())
    key = lambda d: (d["image_id"], d["category_id"], d["score"])  # noqa: E731
    assert len({d["image_id"] for d in gathered}) > 3  # detections from both shards (3 images each)
    assert sorted(gathered, key=key) == sorted(alone, key=key)


# ---- SyncBatchNorm in UperNet, over gloo
_SHAPES = {"p0": ShapeSpec(channels=8, stride=4), "p1": ShapeSpec(channels=16, stride=8)}


def _upernet_features(seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"p0": torch.randn(2, 8, 16, 16, generator=g), "p1": torch.randn(2, 16, 8, 8, generator=g)}


def _upernet(norm: str) -> UperNetHead:
    torch.manual_seed(0)
    return UperNetHead(input_shape=_SHAPES, num_classes=3, conv_dims=8, norm=norm, dropout=0.0).train()


def _upernet_syncbn_worker(out_dir: str) -> None:
    """Launched in every process: one image of the batch of two, through UperNet with SyncBN."""
    rank = comm.get_rank()
    head = _upernet("SyncBN")
    replaced = distributed.convert_sync_batchnorm_for_cpu(head, torch.device("cpu"))
    features = {k: v[rank: rank + 1] for k, v in _upernet_features().items()}
    logits = head.layers(features)
    logits.sum().backward()
    torch.save({"replaced": replaced, "logits": logits.detach(),
                "running_mean": {n: b.clone() for n, b in head.named_buffers() if n.endswith("running_mean")},
                "grads": {n: p.grad.clone() for n, p in head.named_parameters()}},
               os.path.join(out_dir, f"rank{rank}.pt"))


def test_upernet_syncbn_trains_over_gloo_as_batchnorm_on_the_whole_batch(tmp_path):
    # One image per process: plain batch norm would fail on the PPM's 1x1 branch; synced, it sees two.
    launch(_upernet_syncbn_worker, 2, dist_url=f"tcp://127.0.0.1:{_free_port()}", args=(str(tmp_path),),
           timeout=timedelta(seconds=TIMEOUT))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["replaced"] == ranks[1]["replaced"] == 8  # every conv of the head but the classifier

    reference = _upernet("BN")  # one process, the whole batch of two
    logits = reference.layers(_upernet_features())
    logits.sum().backward()
    torch.testing.assert_close(torch.cat([r["logits"] for r in ranks]), logits.detach(), rtol=1e-4, atol=1e-4)
    for name, value in ranks[0]["running_mean"].items():
        torch.testing.assert_close(value, dict(reference.named_buffers())[name], rtol=1e-4, atol=1e-5)
    for name, p in reference.named_parameters():  # DDP would sum (then average) these
        torch.testing.assert_close(ranks[0]["grads"][name] + ranks[1]["grads"][name], p.grad, rtol=1e-3, atol=1e-4)


# ---- in-process pieces
def test_summaries_combine_to_the_maximum_over_ranks():
    base = {"trainable_params": 9, "device": "cpu", "rss_mb": 1.0, "world_size": 2, "timed_iters": 2}
    summaries = [
        {**base, "rank": 0, "peak_rss_mb": 100.0, "mean_iter_time_s": 0.5, "trainable_sha256": "a"},
        {**base, "rank": 1, "peak_rss_mb": 300.0, "mean_iter_time_s": 0.25, "trainable_sha256": "a"},
    ]
    combined = combine_rank_summaries(summaries)
    assert combined["peak_rss_mb"] == 300.0 and combined["mean_iter_time_s"] == 0.5
    assert combined["trainable_params"] == 9 and "rank" not in combined
    assert [r["peak_rss_mb"] for r in combined["per_rank"]] == [100.0, 300.0]
    assert [r["trainable_sha256"] for r in combined["per_rank"]] == ["a", "a"]
    with pytest.raises(ValueError, match="at least one"):
        combine_rank_summaries([])


def test_cpu_model_in_an_nccl_group_is_refused_with_the_fix(monkeypatch):
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "nccl")
    with pytest.raises(RuntimeError, match="CUDA_VISIBLE_DEVICES="):
        distributed.check_backend_for_device(torch.device("cpu"))
    distributed.check_backend_for_device(torch.device("cuda"))  # NCCL carries CUDA tensors


def test_train_net_help_says_what_num_gpus_does_on_the_cpu():
    module = load_tool("lazyconfig_train_net")
    text = " ".join(module.argument_parser().format_help().split())
    assert "this many CPU processes over gloo" in text


# test_tuning_methods.py already checks, for the paper's methods but partial1, that one step reaches every
# trainable backbone parameter; here the rest of the registered methods, and the heads (with "fixed").
_UNCHECKED_METHODS = sorted({"fixed", "partial1"} | (set(TUNING_METHODS) - set(PAPER_METHODS)))


@pytest.mark.parametrize("method", _UNCHECKED_METHODS)
def test_every_trainable_parameter_gets_a_gradient_in_one_step(method):
    """What makes DDP's find_unused_parameters=False (Detectron2's default, kept) right for every method."""
    torch.manual_seed(0)
    model = tiny_detector("Shapes/mask_rcnn_e3va.py", tuning=method, num_classes=4).train()
    with EventStorage():
        losses = model(synthetic_batch(batch_size=1, size=48, num_classes=4))
    sum(losses.values()).backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert distributed.allreduce_bytes_per_step(model) == 4 * sum(
        p.numel() for p in model.parameters() if p.requires_grad)
