"""The engine pieces: memory readings, parameter counts, PeakMemoryHook and the training tool, on the CPU
with a toy model and toy data (no dataset, no detector)."""
from __future__ import annotations

import json
import logging
import mmap
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
import torch
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig
from detectron2.engine import SimpleTrainer, default_argument_parser
from detectron2.engine.hooks import PeriodicWriter
from detectron2.evaluation import DatasetEvaluator
from fvcore.common.param_scheduler import LinearParamScheduler
from omegaconf import DictConfig
from torch import nn

from e3va.engine.hooks import SUMMARY_FILENAME, PeakMemoryHook
from e3va.engine.memory import current_rss_mb, peak_memory_mb, peak_rss_mb, reset_peak_memory
from e3va.engine import training as tool
from e3va.engine.params import count_parameters, print_trainable_parameters, trainable_parameter_names
from e3va.overrides import ConfigOverrideError
from e3va.trainable import save_trainable


# ---- toys
class ToyDetector(nn.Module):
    """A frozen "trunk" and a trainable "head"; a loss dict in training, one output per input otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)
        self.trunk.requires_grad_(False)

    def forward(self, batch: List[Dict[str, torch.Tensor]]):
        out = self.head(self.trunk(torch.stack([d["x"] for d in batch])))
        if self.training:
            return {"loss_toy": out.pow(2).mean()}
        return [{"score": o} for o in out]


def toy_train_loader(batch_size: int = 2) -> Iterator[List[Dict[str, torch.Tensor]]]:
    """Endless batches, like Detectron2's training loaders."""
    g = torch.Generator().manual_seed(0)
    while True:
        yield [{"x": torch.randn(8, generator=g)} for _ in range(batch_size)]


def toy_test_loader(num_images: int = 3) -> List[List[Dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(1)
    return [[{"x": torch.randn(8, generator=g)}] for _ in range(num_images)]


class ToyEvaluator(DatasetEvaluator):
    """Counts images and sums the scores: the second depends on the weights, so an evaluation of the wrong
    (e.g. unloaded) weights shows."""

    def reset(self) -> None:
        self._count = 0
        self._score = 0.0

    def process(self, inputs, outputs) -> None:
        self._count += len(outputs)
        self._score += sum(float(o["score"]) for o in outputs)

    def evaluate(self):
        return {"toy": {"images": float(self._count), "score": self._score}}


def all_parameters(model: nn.Module) -> List[nn.Parameter]:
    """An optimizer ``params`` builder that, unlike Detectron2's, keeps frozen parameters."""
    return list(model.parameters())


def toy_config(output_dir: str, max_iter: int = 3, log_period: int = 2) -> DictConfig:
    """A LazyConfig with the sections the tool reads, on the CPU."""
    train = model_zoo.get_config("common/train.py").train
    train.update(
        output_dir=output_dir, max_iter=max_iter, log_period=log_period, eval_period=0, device="cpu"
    )
    train.checkpointer.update(period=1000, max_to_keep=1)
    optimizer = model_zoo.get_config("common/optim.py").SGD
    optimizer.lr = 0.1
    content = {
        "model": L(ToyDetector)(),
        "dataloader": {
            "train": L(toy_train_loader)(batch_size=2),
            "test": L(toy_test_loader)(num_images=3),
            "evaluator": L(ToyEvaluator)(),
        },
        "optimizer": optimizer,
        "lr_multiplier": L(LinearParamScheduler)(start_value=1.0, end_value=1.0),  # constant, valid at where=1
        "train": train,
    }
    return DictConfig(content, flags={"allow_objects": True})


@contextmanager
def captured(name: str) -> Iterator[List[str]]:
    """Messages of logger ``name``, whether or not Detectron2's setup_logger stopped its propagation."""
    messages: List[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: messages.append(record.getMessage())
    log = logging.getLogger(name)
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield messages
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


def _metrics(output_dir: Path) -> List[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.json").read_text().splitlines()]


# ---- memory and parameters
def test_cpu_memory_readings_are_positive():
    reset_peak_memory("cpu")  # must not fail, whether or not this system can reset the peak
    readings = peak_memory_mb(torch.device("cpu"))
    assert set(readings) == {"peak_rss_mb", "rss_mb"}
    assert readings["peak_rss_mb"] > 0 and readings["rss_mb"] > 0
    # The high-water mark is never below what is resident now (KB rounding aside).
    assert peak_rss_mb() >= 0.99 * current_rss_mb()


def test_cpu_peak_counts_from_the_last_reset():
    if not reset_peak_memory("cpu"):
        pytest.skip("this system cannot reset the CPU peak (no writable /proc/self/clear_refs)")
    # 64 MB of fresh pages, touched, then unmapped: an anonymous mapping of its own, because after other
    # tests a tensor of that size may be served from memory the allocator already holds resident.
    size = 64 * 2**20
    buffer = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        buffer[offset] = 1
    buffer.close()
    assert peak_rss_mb() >= current_rss_mb() + 60  # the peak saw the buffer
    assert reset_peak_memory("cpu")
    assert peak_rss_mb() < current_rss_mb() + 30  # a new peak, from what is resident now


def test_current_rss_without_psutil(monkeypatch):
    with_psutil = current_rss_mb()
    monkeypatch.setitem(sys.modules, "psutil", None)  # makes `import psutil` fail
    assert current_rss_mb() == pytest.approx(with_psutil, rel=0.2)


def test_count_parameters_skips_frozen_and_counts_shared_once(capsys):
    model = ToyDetector()  # trunk 8*8+8 = 72 frozen, head 8+1 = 9 trainable
    assert count_parameters(model) == (9, 81)
    assert trainable_parameter_names(model) == ["head.weight", "head.bias"]

    model.tied = model.head  # the same parameters under a second name
    assert count_parameters(model) == (9, 81)

    line = print_trainable_parameters(model)
    assert line == "trainable params: 9 || all params: 81 || trainable%: 11.1111"
    assert capsys.readouterr().out.strip() == line


# ---- PeakMemoryHook
def _toy_trainer() -> SimpleTrainer:
    model = ToyDetector()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    return SimpleTrainer(model, toy_train_loader(), optimizer)


def test_peak_memory_hook_puts_rss_at_its_period_and_writes_summary(tmp_path):
    trainer = _toy_trainer()
    hook = PeakMemoryHook(period=2, output_dir=str(tmp_path), warmup_iters=3)
    trainer.register_hooks([hook])
    with captured("e3va") as messages:
        trainer.train(0, 5)

    history = trainer.storage.history("peak_rss_mb").values()
    # Every 2nd iteration (0-based 1, 3) and the last one (4), as PeriodicWriter writes.
    assert [it for _, it in history] == [1, 3, 4]
    assert all(value > 0 for value, _ in history)
    assert "peak_mem_alloc_mb" not in trainer.storage.histories()

    summary = json.loads((tmp_path / SUMMARY_FILENAME).read_text())
    assert summary == hook.last_summary
    assert summary["trainable_params"] == 9 and summary["total_params"] == 81
    assert summary["trainable_percent"] == pytest.approx(100 * 9 / 81)
    assert summary["device"] == "cpu" and summary["peak_rss_mb"] > 0
    assert summary["iterations"] == 5 and summary["timed_iters"] == 2  # 3 warm-up iterations skipped
    assert summary["mean_iter_time_s"] > 0
    assert any(m.startswith("Training summary: trainable params: 9 || all params: 81") for m in messages)


def test_peak_memory_hook_takes_writer_period_and_warns_when_after_writer(tmp_path):
    trainer = _toy_trainer()
    hook = PeakMemoryHook()  # no period, no output dir
    trainer.register_hooks([PeriodicWriter([], period=3), hook])
    with captured("e3va") as messages:
        trainer.train(0, 4)
    assert hook.period == 3
    assert any("registered after a PeriodicWriter" in m for m in messages)
    assert [it for _, it in trainer.storage.history("peak_rss_mb").values()] == [2, 3]
    assert not list(tmp_path.iterdir())


# ---- the training tool
def test_do_train_on_cpu_writes_memory_and_optimizes_trainable_only(tmp_path):
    cfg = toy_config(str(tmp_path), max_iter=3, log_period=2)
    args = default_argument_parser().parse_args([])
    with captured("e3va") as messages, captured("detectron2.utils.events") as console:
        result = tool.do_train(args, cfg)

    # Only the head is optimized.
    optimized = {id(p) for g in result.trainer.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in result.model.head.parameters()}
    assert "trainable params: 9 || all params: 81 || trainable%: 11.1111" in messages

    # Written at iterations 1 (the log period) and 2 (the last), in the same records as the loss.
    records = [r for r in _metrics(tmp_path) if "peak_rss_mb" in r]
    assert [r["iteration"] for r in records] == [1, 2]
    assert all(r["peak_rss_mb"] > 0 and "total_loss" in r for r in records)
    assert any("peak_rss_mb:" in line and "iter: 1" in line for line in console)  # console line too

    assert result.summary["iterations"] == 3
    assert json.loads((tmp_path / SUMMARY_FILENAME).read_text())["total_params"] == 81
    assert result.eval_results["toy"]["images"] == 3.0  # the evaluation after training
    assert (tmp_path / "model_final.pth").is_file()


def test_build_optimizer_drops_frozen_parameters_it_is_given():
    cfg = toy_config("")
    cfg.optimizer.params = L(all_parameters)()
    model = ToyDetector()
    with captured("e3va") as messages:
        optimizer = tool.build_optimizer(cfg, model)
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in model.head.parameters()}
    assert any("Dropped 2 frozen parameter tensors" in m for m in messages)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_config_without_cuda_asks_for_train_device_cpu():
    cfg = toy_config("")
    cfg.train.device = "cuda"
    with pytest.raises(RuntimeError, match="train.device=cpu"):
        tool.resolve_device(cfg)
    cfg.train.amp.enabled = True
    assert tool.use_amp(cfg, torch.device("cpu")) is False


def toy_config_file(tmp_path: Path, out: Path) -> Path:
    """A LazyConfig file of :func:`toy_config` writing to ``out``, for the tool's ``--config-file``."""
    config = tmp_path / "toy_config.py"
    config.write_text(
        "from test_training import toy_config\n"  # this module: pytest puts tests/engine on sys.path
        f"_cfg = toy_config({str(out)!r}, max_iter=2, log_period=1)\n"
        "model, dataloader, optimizer = _cfg.model, _cfg.dataloader, _cfg.optimizer\n"
        "lr_multiplier, train = _cfg.lr_multiplier, _cfg.train\n"
    )
    return config


def test_main_trains_then_evaluates_from_a_config_file(tmp_path, restore_loggers):
    out = tmp_path / "out"
    config = toy_config_file(tmp_path, out)
    parser = default_argument_parser()
    assert LazyConfig.load(str(config)).train.max_iter == 2

    results = tool.main(parser.parse_args(["--config-file", str(config), "train.eval_period=1"]))
    assert results["toy"]["images"] == 3.0
    trained_score = results["toy"]["score"]
    assert [r["iteration"] for r in _metrics(out) if "peak_rss_mb" in r] == [0, 1]  # log_period=1
    assert (out / SUMMARY_FILENAME).is_file() and (out / "config.yaml").is_file()

    weights = f"train.init_checkpoint={out / 'model_final.pth'}"
    results = tool.main(parser.parse_args(["--config-file", str(config), "--eval-only", weights]))
    # The trained weights were loaded: the score is the trained model's, not a fresh initialisation's.
    assert results["toy"] == {"images": 3.0, "score": pytest.approx(trained_score, rel=1e-6)}


def test_eval_only_evaluates_the_trainable_checkpoint_on_its_base(tmp_path, restore_loggers):
    """``--eval-only train.init_checkpoint=BASE train.trainable_checkpoint=TASK`` evaluates the task's
    weights (the evaluator's score depends on them); a missing file or a mistyped key is an error, never
    an evaluation of the base alone."""
    config = toy_config_file(tmp_path, tmp_path / "out")
    base, task = tmp_path / "base.pth", tmp_path / "task.pth"
    torch.manual_seed(0)
    model = ToyDetector()
    torch.save({"model": model.state_dict()}, base)
    with torch.no_grad():
        model.head.weight.mul_(-3.0)  # "trains" the head only: the trunk stays the base's
        model.head.bias.add_(1.0)
    save_trainable(model, task)
    model.eval()
    with torch.no_grad():
        task_score = sum(float(o["score"]) for batch in toy_test_loader() for o in model(batch))

    def evaluate(*overrides: str) -> Dict:
        args = ["--config-file", str(config), "--eval-only", f"train.init_checkpoint={base}", *overrides]
        return tool.main(default_argument_parser().parse_args(args))["toy"]

    base_score = evaluate()["score"]
    got = evaluate(f"train.trainable_checkpoint={task}")
    assert got == {"images": 3.0, "score": pytest.approx(task_score, rel=1e-6)}
    assert abs(task_score - base_score) > 0.1
    with pytest.raises(AssertionError, match="not found"):  # fvcore's Checkpointer.load
        evaluate(f"train.trainable_checkpoint={tmp_path / 'tsak.pth'}")
    with pytest.raises(ConfigOverrideError, match="train.trainable_checkpoint"):
        evaluate(f"train.trainable_checkpont={task}")
