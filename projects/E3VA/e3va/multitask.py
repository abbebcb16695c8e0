"""One trunk pass, many tasks: :class:`MultiTaskModel` serves (and trains) several tasks' side networks on
one frozen Swin trunk.

Side networks never change the trunk (E3VA's highway, LoSA's mixers; ``fixed`` has none), so one forward of
the trunk can feed every task's side network at once. Each task is a whole Detectron2 model (a detector or a
semantic segmentor built from its LazyConfig, with its weights); the multi-task model keeps one trunk, moves
every task's side network onto it (``E3VASwin.share_trunk``), runs the trunk once per batch and gives each
task's backbone its share of that pass (``E3VASwin.give_features``). Each task's model then runs as it would
alone (FPN, heads, post-processing), so its outputs equal that model's; its parameter names are unchanged, so
``e3va.save_trainable(model.tasks[name], path)`` writes the task file a single-task config loads.

Tasks must agree on what the trunk sees: the trunk's architecture and frozen weights, the input format,
normalisation, padding, trunk precision and test-time resizing. A task that differs, or whose method changes
the trunk itself (full, lora, adapter, ...), is refused with its name and the difference.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from detectron2.config import instantiate
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import ImageList
from omegaconf import DictConfig
from torch import nn

from .backbone import find_tuned_backbone
from .checkpoint import E3VACheckpointer
from .predictor import input_format_of, test_augmentations
from .swin import E3VASwin
from .trainable import save_trainable

__all__ = ["MultiTaskError", "MultiTaskModel", "TaskEvaluator", "TaskSpec", "task_models"]

class MultiTaskError(ValueError):
    """Tasks that cannot share one trunk pass; the message names the task and what differs."""


@dataclass
class TaskSpec:
    """One task: its LazyConfig (overrides applied) and the weights loaded, in order, on top of the shared
    base weights: a trainable-only task file, or a full checkpoint (its trunk must equal the base's)."""

    name: str
    cfg: DictConfig
    weights: Sequence[str] = ()


def task_models(**models: nn.Module) -> Dict[str, nn.Module]:
    """``{name: model}`` in the order given, for a LazyConfig: ``L(MultiTaskModel)(models=L(task_models)(
    detect=..., segment=...))`` (``instantiate`` builds the models of a call's arguments, not of a dict's)."""
    return dict(models)


def _describe_trunk(backbone: E3VASwin) -> str:
    return (f"Swin-{backbone.size}, window {backbone.trunk.layers[0].window_size}, "
            f"trunk_dtype={str(backbone.trunk_dtype).replace('torch.', '')}")


def _frozen_trunk_state(backbone: E3VASwin) -> Dict[str, torch.Tensor]:
    """The trunk's parameters and buffers, output norms aside (each task trains its own)."""
    return {name: t for name, t in backbone.trunk.state_dict().items()
            if not backbone._is_out_norm(name)}


def _input_record(model: nn.Module) -> Dict[str, Any]:
    """What the trunk sees of an image, as the task's model prepares it."""
    return {
        "pixel_mean": [round(v, 6) for v in model.pixel_mean.flatten().tolist()],
        "pixel_std": [round(v, 6) for v in model.pixel_std.flatten().tolist()],
        "size_divisibility": model.backbone.size_divisibility,
        # ImageList.from_tensors ignores a zero square_size, which FPN gives and other backbones leave out
        "padding_constraints": {k: v for k, v in (getattr(model.backbone, "padding_constraints", {}) or {}).items()
                                if v},
    }


class MultiTaskModel(nn.Module):
    """Several tasks' models on one trunk: ``model(batched_inputs)`` runs the trunk once per batch and returns
    ``{task name: that task's model output}`` (a list of per-image dicts in eval mode, as Detectron2's
    models return; in training mode, the task's loss dict).

    Args:
        models: task name -> a Detectron2 model with an ``E3VASwin`` backbone, weights already loaded. Their
            trunks must hold the same architecture and frozen weights; the first one is kept and shared.
        loss_weights: task name -> the factor of its losses in training (default 1 for every task).
        check_weights: refuse tasks whose frozen trunk weights differ. False for a model built to train
            (``configs/Shapes/multitask_e3va.py``): the tasks' trunks are random until the base weights load
            into the shared one (``train.init_checkpoint``); the architecture is checked either way.
    """

    def __init__(self, models: Mapping[str, nn.Module], loss_weights: Optional[Mapping[str, float]] = None,
                 check_weights: bool = True) -> None:
        super().__init__()
        if not models:
            raise MultiTaskError("A multi-task model needs at least one task.")
        self.check_weights = check_weights
        # What a caller feeding raw images needs (tools/multitask_infer.py); known when built from configs.
        self.input_format: Optional[str] = None
        self.augmentations: List[Any] = []
        self.tasks = nn.ModuleDict()
        self._backbones: Dict[str, E3VASwin] = {}
        self.loss_weights: Dict[str, float] = {}
        for name, model in models.items():
            self.add_task(name, model)
        self.set_loss_weights(loss_weights or {})

    def set_loss_weights(self, loss_weights: Mapping[str, float]) -> None:
        """Each task's factor on its losses in training (1 for the tasks not named)."""
        unknown = sorted(set(loss_weights) - set(self.tasks))
        if unknown:
            raise MultiTaskError(f"loss_weights name tasks {unknown} that are not among {list(self.tasks)}.")
        self.loss_weights = {name: float(loss_weights.get(name, 1.0)) for name in self.tasks}

    def add_task(self, name: str, model: nn.Module) -> None:
        """Adds ``model`` (weights loaded) as task ``name``: checks that it can share the trunk, moves its
        side network onto the shared trunk and drops its own trunk."""
        if name in self.tasks:
            raise MultiTaskError(f"Task names must be unique; {name!r} given twice.")
        backbone = self._backbone(name, model)
        if self.tasks:
            first_name = next(iter(self.tasks))
            self._check_same_trunk(name, backbone, first_name)
            inputs, reference_inputs = _input_record(model), _input_record(self._first)
            for key, value in inputs.items():
                if value != reference_inputs[key]:
                    raise MultiTaskError(f"Task {name!r} prepares images with {key}={value}, task {first_name!r} "
                                         f"with {reference_inputs[key]}; the trunk runs once for both, on one tensor.")
        try:
            backbone.share_trunk(self.trunk if self.tasks else backbone.trunk)
        except ValueError as error:
            raise MultiTaskError(f"Task {name!r}: {error}") from None
        self._backbones[name] = backbone
        self.tasks[name] = model
        self.loss_weights[name] = 1.0

    @property
    def _first(self) -> nn.Module:
        """The first task's model: every task prepares its images as it does (checked in add_task)."""
        return next(iter(self.tasks.values()))

    @property
    def _reference(self) -> E3VASwin:
        """The first task's backbone, which runs the shared trunk pass."""
        return next(iter(self._backbones.values()))

    @property
    def trunk(self) -> nn.Module:
        """The shared trunk (as the first task's backbone holds it: its stages are every task's)."""
        return self._reference.trunk

    @staticmethod
    def _backbone(name: str, model: nn.Module) -> E3VASwin:
        try:
            _, backbone = find_tuned_backbone(model)
        except ValueError as error:
            raise MultiTaskError(f"Task {name!r}: {error}") from None
        if not isinstance(backbone, E3VASwin):
            raise MultiTaskError(f"Task {name!r} has a {type(backbone).__name__} backbone; one trunk pass for "
                                 "several tasks is implemented for Swin trunks (e3va.E3VASwin).")
        return backbone

    def _check_same_trunk(self, name: str, backbone: E3VASwin, first_name: str) -> None:
        reference = self._reference
        if _describe_trunk(backbone) != _describe_trunk(reference):
            raise MultiTaskError(f"Task {name!r} has a {_describe_trunk(backbone)} trunk, task {first_name!r} "
                                 f"a {_describe_trunk(reference)} one; tasks sharing a trunk need the same one.")
        state, reference_state = _frozen_trunk_state(backbone), _frozen_trunk_state(reference)
        if state.keys() != reference_state.keys():
            extra = sorted(set(state) ^ set(reference_state))[:3]
            raise MultiTaskError(f"Task {name!r}: tuning={backbone.method.name!r} changes the trunk itself "
                                 f"(trunk entries {extra} differ from task {first_name!r}'s); only methods that "
                                 "leave it unchanged (e3va*, losa, fixed) can share it.")
        if not self.check_weights:
            return
        for key, value in state.items():
            if not torch.equal(value, reference_state[key]):
                raise MultiTaskError(
                    f"Task {name!r} holds other frozen trunk weights than task {first_name!r} (first difference: "
                    f"trunk.{key}); tasks sharing a trunk must be trained on the same base weights.")

    @classmethod
    def from_configs(cls, base: str, tasks: Sequence[TaskSpec],
                     loss_weights: Optional[Mapping[str, float]] = None,
                     device: Optional[torch.device] = None) -> "MultiTaskModel":
        """Builds every task's model from its config, loads ``base`` then the task's weights, and shares one
        trunk. Also refuses tasks whose test-time resizing or input format differ (both change the tensor
        the trunk sees). Models are built one at a time, so at most two trunks are in memory at once."""
        if not tasks:
            raise MultiTaskError("A multi-task model needs at least one task.")
        reference = tasks[0]
        resizing = {task.name: repr(test_augmentations(task.cfg)) for task in tasks}
        for task in tasks[1:]:
            if input_format_of(task.cfg) != input_format_of(reference.cfg):
                raise MultiTaskError(f"Task {task.name!r} reads {input_format_of(task.cfg)} images, task "
                                     f"{reference.name!r} {input_format_of(reference.cfg)}.")
            if resizing[task.name] != resizing[reference.name]:
                raise MultiTaskError(f"Task {task.name!r} resizes test images with {resizing[task.name]}, task "
                                     f"{reference.name!r} with {resizing[reference.name]}; the trunk sees one image.")
        model: Optional[MultiTaskModel] = None
        for task in tasks:
            single = instantiate(task.cfg.model)
            if device is not None:
                single.to(device)
            checkpointer = E3VACheckpointer(single)
            for path in [base, *task.weights]:
                try:
                    checkpointer.load(str(path))
                except ValueError as error:
                    raise MultiTaskError(f"Task {task.name!r}: {error}") from None
            # One task at a time, so each task's own trunk is dropped before the next one is built.
            if model is None:
                model = cls({task.name: single.eval()})
            else:
                model.add_task(task.name, single.eval())
        assert model is not None
        model.set_loss_weights(loss_weights or {})
        model.input_format = input_format_of(reference.cfg)
        model.augmentations = test_augmentations(reference.cfg)
        return model.eval()

    def preprocess(self, batched_inputs: List[Dict[str, Any]]) -> ImageList:
        """Normalises, pads and batches the images as every task's model does (checked at construction)."""
        model = self._first
        images = [(x["image"].to(model.pixel_mean.device) - model.pixel_mean) / model.pixel_std
                  for x in batched_inputs]
        return ImageList.from_tensors(images, model.backbone.size_divisibility,
                                      padding_constraints=model.backbone.padding_constraints)

    def save_task_files(self, directory: Union[str, os.PathLike], config: Optional[str] = None) -> Dict[str, Path]:
        """One trainable-only task file per task, ``<directory>/<task>_trainable.pth``, each loadable into
        that task's single-task config (``train.trainable_checkpoint``) or served again by this model."""
        return {name: save_trainable(model, Path(directory) / f"{name}_trainable.pth", config=config)
                for name, model in self.tasks.items()}

    def forward(self, batched_inputs: List[Dict[str, Any]]) -> Dict[str, Any]:
        images = self.preprocess(batched_inputs).tensor
        backbones = list(self._backbones.values())
        features = self._reference.forward_tasks(images, backbones)
        try:
            for backbone, task_features in zip(backbones, features):
                backbone.give_features(images, task_features)
            if not self.training:
                return {name: model(batched_inputs) for name, model in self.tasks.items()}
            return {f"{name}/{key}": value * self.loss_weights[name]
                    for name, model in self.tasks.items() for key, value in model(batched_inputs).items()}
        finally:
            for backbone in backbones:
                backbone.give_features(images, None)  # nothing left behind if a task failed


class TaskEvaluator(DatasetEvaluator):
    """Detectron2's ``evaluator`` for one task of a :class:`MultiTaskModel`: feeds it that task's outputs
    and names its results ``<task>/<metric group>`` (e.g. ``detect/bbox``, ``segment/sem_seg``), so that a
    list of them evaluates every task in one pass over the test set."""

    def __init__(self, task: str, evaluator: DatasetEvaluator) -> None:
        self.task = task
        self.evaluator = evaluator

    def reset(self) -> None:
        self.evaluator.reset()

    def process(self, inputs: List[Dict[str, Any]], outputs: Mapping[str, Any]) -> None:
        if self.task not in outputs:
            raise KeyError(f"TaskEvaluator: no task {self.task!r} among the model's outputs {sorted(outputs)}.")
        self.evaluator.process(inputs, outputs[self.task])

    def evaluate(self) -> Optional[Dict[str, Any]]:
        results = self.evaluator.evaluate()
        return None if results is None else {f"{self.task}/{key}": value for key, value in results.items()}
