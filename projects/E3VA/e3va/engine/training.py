"""Training and evaluation through Detectron2's engine, for LazyConfig files.

Detectron2's own ``tools/lazyconfig_train_net.py`` logic, plus what parameter-efficient tuning needs: the
optimizer gets the trainable parameters only (and says how many there are), peak memory is written
with the other metrics, a summary goes to ``<train.output_dir>/e3va_summary.json``, pretrained Swin
classification weights load through ``E3VACheckpointer``, and the CPU works (``train.device=cpu``).
``tools/lazyconfig_train_net.py`` is the command line; ``tools/demo.py`` calls these functions.

Multi-process runs go through Detectron2's ``launch`` (``--num-gpus``, ``--num-machines``, ...): DDP over
NCCL on CUDA, over gloo on the CPU (see ``e3va.engine.distributed``). Checkpoints, ``metrics.json`` and
``e3va_summary.json`` are written by rank 0 only; evaluation runs on every rank's shard of the test set
and Detectron2's evaluators gather the shards on rank 0.

``train.ddp.find_unused_parameters`` stays Detectron2's default, False, for every tuning method: each
step reaches every trainable parameter (tests/test_tuning_methods.py and tests/test_distributed.py check
every registered method, heads included). For
E3VA that is by construction: the frozen trunk runs without autograd and holds no trainable parameter,
every highway adapter adds into its stage's side state, which enters that stage's output (and, through
the patch merging, the later stages), every stage output feeds the FPN and trunk stages past the last
output are not run; Detectron2's heads keep idle branches in the graph (an image without foreground
gives a mask loss of ``0 * sum``). A method or head that can skip parameters in a step sets
``train.ddp.find_unused_parameters=True`` in its config; without it DDP stops at the next step and names
the parameters that got no gradient.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import (
    AMPTrainer,
    SimpleTrainer,
    TrainerBase,
    default_argument_parser,
    default_setup,
    hooks,
    launch,
)
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from omegaconf import DictConfig
from torch import nn

from ..checkpoint import E3VACheckpointer
from ..overrides import apply_overrides
from ..trainable import config_record
from .distributed import configure_cpu_threads, convert_sync_batchnorm_for_cpu, create_ddp_model
from .hooks import PeakMemoryHook, RandomStateHook, default_e3va_writers
from .params import print_trainable_parameters

logger = logging.getLogger("e3va")


@dataclass
class TrainResult:
    """What :func:`do_train` leaves behind."""

    model: nn.Module  # the trained model, unwrapped from DistributedDataParallel
    trainer: TrainerBase
    eval_results: Dict[str, Any] = field(default_factory=dict)  # the last evaluation's, if any ran
    summary: Optional[Dict[str, Any]] = None  # PeakMemoryHook's summary (e3va_summary.json)


def build_checkpointer(
    model: nn.Module, save_dir: str = "", *, trainable_only: bool = False, config: Optional[str] = None,
    **checkpointables: Any,
) -> E3VACheckpointer:
    """Detectron2's checkpointer that also reads official Swin classification weights and trainable-only
    files; with ``trainable_only`` it writes those (recording ``config``)."""
    return E3VACheckpointer(model, save_dir, trainable_only=trainable_only, config=config, **checkpointables)


def load_weights(checkpointer: E3VACheckpointer, cfg: DictConfig) -> None:
    """Loads ``train.init_checkpoint``, then ``train.trainable_checkpoint`` (a trainable-only file made
    from that base) on top, when the config names one."""
    if not cfg.train.init_checkpoint:
        logger.warning("No train.init_checkpoint: the model keeps its initial (untrained) weights.")
    checkpointer.load(cfg.train.init_checkpoint)
    task = cfg.train.get("trainable_checkpoint", None)
    if task:
        checkpointer.load(task)


def resolve_device(cfg: DictConfig) -> torch.device:
    """``train.device``, checked: a CUDA config on a machine without CUDA is an error, not a silent
    switch to the CPU (add ``train.device=cpu`` to run it there)."""
    device = torch.device(cfg.train.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"train.device={cfg.train.device!r}, but CUDA is not available. To run this config on the "
            "CPU (slowly), add the override train.device=cpu."
        )
    return device


def use_amp(cfg: DictConfig, device: torch.device) -> bool:
    """``train.amp.enabled``, except on the CPU: Detectron2's AMPTrainer requires CUDA, so a CUDA
    config moved to the CPU with ``train.device=cpu`` trains in fp32, with a warning."""
    if not cfg.train.amp.enabled:
        return False
    if device.type != "cuda":
        logger.warning(
            f"train.amp.enabled=True needs CUDA; training on {device} in full precision (fp32) instead."
        )
        return False
    return True


def build_optimizer(cfg: DictConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Instantiates ``cfg.optimizer`` over the model's trainable parameters only.

    Detectron2's ``get_default_optimizer_params`` already skips ``requires_grad=False`` parameters;
    any frozen parameter that another ``params`` builder lets through is dropped here with a warning,
    because optimizers with weight decay or momentum would still change it.
    """
    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)

    dropped = 0
    groups = []
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.requires_grad]
        dropped += len(group["params"]) - len(params)
        if params:
            groups.append({**group, "params": params})
    if dropped:
        logger.warning(f"Dropped {dropped} frozen parameter tensors from the optimizer.")
        # Optimizer state is created lazily at the first step, so replacing the groups now is safe.
        optimizer.param_groups = groups
    assert all(p.requires_grad for g in optimizer.param_groups for p in g["params"])

    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_optimizer]
    if missing:
        logger.warning(f"{len(missing)} trainable parameters are not in the optimizer, e.g. {missing[:5]}")
    num = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    logger.info(
        f"Optimizer {type(optimizer).__name__}: {num:,d} parameters in {len(in_optimizer)} tensors, "
        f"{len(optimizer.param_groups)} groups"
    )
    return optimizer


def do_test(cfg: DictConfig, model: nn.Module) -> Dict[str, Any]:
    """Evaluates ``model`` on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator``; ``{}``
    when the config has no evaluator."""
    if "evaluator" not in cfg.dataloader:
        logger.info("No cfg.dataloader.evaluator: skipping evaluation.")
        return {}
    ret = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    print_csv_format(ret)
    return ret


class OutputDirError(RuntimeError):
    """Training into ``train.output_dir`` would lose or silently ignore the checkpoints there."""


def checkpoints_in(output_dir: str) -> List[str]:
    """Names of the checkpoint files (``*.pth``) directly in ``output_dir``; [] when it does not exist."""
    folder = Path(output_dir)
    return sorted(p.name for p in folder.glob("*.pth") if p.is_file()) if folder.is_dir() else []


def _last_checkpoint_problem(output_dir: str) -> Optional[str]:
    """Why ``last_checkpoint`` cannot be resumed from, or None when it names an existing file."""
    tag = Path(output_dir) / "last_checkpoint"
    try:
        name = tag.read_text().strip()
    except FileNotFoundError:
        return f"{tag} is missing"
    except (OSError, UnicodeDecodeError) as e:
        return f"{tag} cannot be read ({e})"
    if not name:
        return f"{tag} is empty"
    if not (Path(output_dir) / name).is_file():
        return f"{tag} names {name!r}, which does not exist"
    return None


def check_output_dir(output_dir: str, *, resume: bool, allow_overwrite: bool = False) -> None:
    """Refuses (:class:`OutputDirError`, before anything is written) a run that would lose work or
    silently start over: a fresh run into a directory that holds checkpoints (unless
    ``allow_overwrite``), and a ``--resume`` that has nothing to resume or no readable ``last_checkpoint``."""
    if not output_dir:  # nothing is saved (Detectron2's checkpointer skips an empty save_dir)
        return
    found = checkpoints_in(output_dir)
    tagged = (Path(output_dir) / "last_checkpoint").exists()
    listing = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    if not resume:
        if (found or tagged) and not allow_overwrite:
            raise OutputDirError(
                f"train.output_dir={output_dir} already holds checkpoints ({listing or 'last_checkpoint'}); a new "
                "run would overwrite them. Continue that run with --resume, pick another train.output_dir, or "
                "overwrite them on purpose with the override train.allow_overwrite=True."
            )
        return
    if not found and not tagged:
        state = "does not exist" if not Path(output_dir).exists() else "holds no checkpoint"
        raise OutputDirError(
            f"--resume, but train.output_dir={output_dir} {state}: there is nothing to resume, and starting over "
            "is not what --resume asks for. Check the directory (a typo?); to start a new run there, leave out "
            "--resume."
        )
    problem = _last_checkpoint_problem(output_dir)
    if problem:
        raise OutputDirError(
            f"--resume, but {problem}, while train.output_dir={output_dir} holds checkpoints ({listing or 'none'}): "
            "resuming would start over at iteration 0 and overwrite them. Write the name of the checkpoint to "
            f"resume from into {Path(output_dir) / 'last_checkpoint'} (e.g. {found[-1] if found else 'model_final.pth'}), "
            "or start a new run in another train.output_dir."
        )


def allow_overwrite(cfg: DictConfig) -> bool:
    """``train.allow_overwrite`` (optional, False): may a fresh run write over the checkpoints there?"""
    return bool(cfg.train.get("allow_overwrite", False))


def _untag_previous_run(output_dir: str) -> None:
    """A fresh run allowed to overwrite: drops the old run's ``last_checkpoint``, so that a ``--resume``
    after this run is killed cannot continue the old run's weights under this run's config."""
    tag = Path(output_dir) / "last_checkpoint"
    if tag.exists():
        logger.warning(f"train.allow_overwrite=True: removing {tag}; the checkpoints there will be overwritten.")
        tag.unlink()


def do_train(args: argparse.Namespace, cfg: DictConfig) -> TrainResult:
    """Trains ``cfg.model`` as Detectron2's LazyConfig tool does.

    Args:
        args: needs ``resume`` (bool): continue from the last checkpoint in ``train.output_dir``. A fresh
            run into a directory with checkpoints, or a ``--resume`` with nothing (readable) to resume, is
            refused by :func:`check_output_dir` before anything is written.
        cfg: ``model``, ``dataloader.train`` (and optionally ``dataloader.test`` / ``.evaluator``),
            ``optimizer`` (whose ``params`` gets ``model``), ``lr_multiplier`` and ``train`` as in
            Detectron2's ``common/train.py``: output_dir, init_checkpoint, max_iter, amp.enabled,
            ddp, checkpointer, eval_period, log_period, device.
    """
    resume = bool(getattr(args, "resume", False))
    check_output_dir(cfg.train.output_dir, resume=resume, allow_overwrite=allow_overwrite(cfg))
    if not resume and comm.is_main_process():
        _untag_previous_run(cfg.train.output_dir)
    device = resolve_device(cfg)
    model = instantiate(cfg.model)
    logging.getLogger("detectron2").info(f"Model:\n{model}")
    model.to(device)
    convert_sync_batchnorm_for_cpu(model, device)  # before the optimizer: it makes new modules
    print_trainable_parameters(model, logger)
    trainable_only = bool(cfg.train.get("trainable_only_checkpoints", False))
    record = config_record(cfg)  # before the optimizer (a live object) enters cfg

    optimizer = build_optimizer(cfg, model)
    train_loader = instantiate(cfg.dataloader.train)

    model = create_ddp_model(model, device, **cfg.train.ddp)
    trainer = (AMPTrainer if use_amp(cfg, device) else SimpleTrainer)(model, train_loader, optimizer)
    checkpointer = build_checkpointer(
        model, cfg.train.output_dir, trainable_only=trainable_only, config=record if trainable_only else None,
        trainer=trainer,
    )

    result = TrainResult(model=getattr(model, "module", model), trainer=trainer)

    def evaluate() -> Dict[str, Any]:
        result.eval_results = do_test(cfg, model)
        return result.eval_results

    main_process = comm.is_main_process()
    memory_hook = PeakMemoryHook(
        period=cfg.train.log_period, output_dir=cfg.train.output_dir if main_process else None
    )
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            # Saved with the trainer's state; makes --resume repeat the random draws. Registered in every
            # process, before the checkpointer: in multi-process runs it gathers all ranks' generators.
            RandomStateHook(checkpoint_period=cfg.train.checkpointer.period),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            # Before the checkpointer and EvalHook, so its step times leave out saving and evaluating;
            # before the PeriodicWriter, so its scalars are written in the same record (see hooks.py).
            memory_hook,  # in every process: it gathers their readings
            hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main_process else None,
            hooks.EvalHook(cfg.train.eval_period, evaluate),
            hooks.PeriodicWriter(
                default_e3va_writers(cfg.train.output_dir, cfg.train.max_iter),
                period=cfg.train.log_period,
            )
            if main_process
            else None,
        ]
    )

    # Without --resume, this loads train.init_checkpoint, e.g.
    # pretrained Swin weights; with it, the last checkpoint of train.output_dir, optimizer, scheduler and
    # iteration included (after train.init_checkpoint when that checkpoint is trainable-only).
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=resume)
    if resume and checkpointer.has_checkpoint():
        # The checkpoint stores the iteration that just finished, so we start at the next one.
        start_iter = trainer.iter + 1
    else:
        start_iter = 0
    trainer.train(start_iter, cfg.train.max_iter)
    result.summary = memory_hook.last_summary
    if main_process and hasattr(result.model, "save_task_files"):  # e3va.multitask.MultiTaskModel
        for name, path in result.model.save_task_files(cfg.train.output_dir, config=record).items():
            logger.info(f"Task {name!r}: trainable-only task file {path}")
    return result


def setup(args: argparse.Namespace) -> DictConfig:
    """Loads ``args.config_file`` with ``args.opts`` applied; sets up logging and the output dir."""
    cfg = apply_overrides(LazyConfig.load(args.config_file), args.opts)  # a mistyped key is an error
    if not getattr(args, "eval_only", False):  # before default_setup writes config.yaml and the log there
        check_output_dir(cfg.train.output_dir, resume=bool(args.resume), allow_overwrite=allow_overwrite(cfg))
    default_setup(cfg, args)
    # default_setup configures the "detectron2" and "fvcore" loggers only.
    setup_logger(cfg.train.output_dir, distributed_rank=comm.get_rank(), name="e3va", abbrev_name="e3va")
    return cfg


def main(args: argparse.Namespace) -> Dict[str, Any]:
    """Trains (or with ``--eval-only`` evaluates) and returns the last evaluation's results."""
    cfg = setup(args)
    configure_cpu_threads(torch.device(cfg.train.device))
    if args.eval_only:
        device = resolve_device(cfg)
        model = instantiate(cfg.model)
        model.to(device)
        model = create_ddp_model(model, device)
        load_weights(build_checkpointer(model), cfg)
        return do_test(cfg, model)
    return do_train(args, cfg).eval_results
