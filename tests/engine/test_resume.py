"""--resume: a run killed midway and resumed ends with the weights of the run that was never interrupted.

The runs are short trainings of the Shapes config through tools/lazyconfig_train_net.py, each in its own
process. The data stream repeats exactly (two images, no shuffling, ``num_workers=0``) while random
flips and proposal sampling still draw from the generators that the checkpoint has to restore.
"""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO

pytestmark = pytest.mark.slow  # every test here starts processes

MAX_ITER, PERIOD = 20, 4


def _config(tmp_path: Path, name: str, trainable_only: bool) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(f"""
from detectron2.config import LazyCall as L, LazyConfig
from detectron2.data.samplers import TrainingSampler

_cfg = LazyConfig.load({str(REPO / "configs" / "Shapes" / "mask_rcnn_e3va.py")!r})
_cfg.dataloader.train.update(sampler=L(TrainingSampler)(size=2, shuffle=False), total_batch_size=2, num_workers=0)
del _cfg.dataloader.evaluator
_cfg.train.update(max_iter={MAX_ITER}, seed=0, log_period=1, eval_period=0, output_dir={str(tmp_path / name)!r},
                  trainable_only_checkpoints={trainable_only})
_cfg.train.checkpointer.update(period={PERIOD}, max_to_keep=100)
_cfg.lr_multiplier.scheduler.milestones = [12, {MAX_ITER}]  # the decay falls after the interruption
_cfg.lr_multiplier.warmup_length = 3 / {MAX_ITER}
model, dataloader, optimizer, lr_multiplier, train = (
    _cfg.model, _cfg.dataloader, _cfg.optimizer, _cfg.lr_multiplier, _cfg.train)
""")
    return path


def _command(config: Path, *extra: str):
    return [sys.executable, str(REPO / "tools" / "lazyconfig_train_net.py"), "--config-file", str(config), *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # the same reduction order in every run


def _run(config: Path, *extra: str) -> None:
    proc = subprocess.run(_command(config, *extra), capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-4000:]


def _run_and_kill_after_first_checkpoint(config: Path, out: Path) -> None:
    log = open(out.parent / f"{out.name}.log", "w")
    proc = subprocess.Popen(_command(config), stdout=log, stderr=subprocess.STDOUT, env=_env())
    deadline = time.time() + 600
    while not (out / "last_checkpoint").is_file():
        assert proc.poll() is None, (out.parent / f"{out.name}.log").read_text()[-4000:]
        assert time.time() < deadline, "no checkpoint within 10 minutes"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    assert not (out / "model_final.pth").exists(), "the run finished before it could be interrupted"


def _trainable_weights(path: Path, names):
    state = torch.load(path, weights_only=True)["model"]
    return {k: state[k] for k in names}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("uninterrupted")
    _run(_config(tmp, "run", trainable_only=True))
    return tmp / "run" / "model_final.pth"


@pytest.mark.parametrize("trainable_only", [False, True], ids=["full_checkpoints", "trainable_only_checkpoints"])
def test_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, uninterrupted, trainable_only):
    config = _config(tmp_path, "run", trainable_only)
    out = tmp_path / "run"
    _run_and_kill_after_first_checkpoint(config, out)
    resumed_from = (out / "last_checkpoint").read_text().strip()
    assert resumed_from != "model_final.pth"
    checkpoint = torch.load(out / resumed_from, weights_only=True)
    assert ("e3va_trainable" in checkpoint) == trainable_only
    assert {"model", "trainer", "iteration"} <= set(checkpoint)
    assert "optimizer" in checkpoint["trainer"]
    assert {"LRScheduler", "RandomStateHook"} <= set(checkpoint["trainer"]["hooks"])

    _run(config, "--resume")
    reference = torch.load(uninterrupted, weights_only=True)["model"]  # trainable-only: the names to compare
    resumed = _trainable_weights(out / "model_final.pth", reference)
    for name, value in reference.items():
        assert torch.equal(resumed[name], value), name
    log = (out / "log.txt").read_text()
    assert f"Starting training from iteration {int(resumed_from[len('model_'):-len('.pth')]) + 1}" in log
