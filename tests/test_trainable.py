"""Trainable-only checkpoints, safe reading of checkpoint files, the export/merge tool."""
import subprocess
import sys

import pytest
import torch
import yaml
from detectron2.config import LazyConfig, instantiate
from omegaconf import OmegaConf

from e3va import (
    NANO_SWIN_WEIGHTS,
    CheckpointReadError,
    E3VACheckpointer,
    TrainableCheckpointError,
    load_trainable,
    read_checkpoint_file,
    save_trainable,
)
from e3va.trainable import (base_fingerprint, config_record, full_checkpoint, holds_side_network, missing_trainable,
                            trainable_metadata, trainable_state_dict)
from helpers import REPO, load_config

CONFIG = "common/models/mask_rcnn_swin_e3va.py"


def _detector(tuning="e3va", seed=0, **bottom_up):
    """The nano detector; the same ``seed`` gives the same base (and head) weights."""
    cfg = load_config(CONFIG)
    cfg.model.backbone.bottom_up.update(size="nano", tuning=tuning, **bottom_up)
    cfg.model.roi_heads.num_classes = 3
    torch.manual_seed(seed)
    return instantiate(cfg.model)


def _train_a_little(model):
    """Changes every trainable tensor, as training would."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_trainable_only_file_completes_the_same_base(tmp_path):
    trained = _detector()
    _train_a_little(trained)
    path = save_trainable(trained, tmp_path / "task.pth", config="# the config")
    full = tmp_path / "full.pth"
    torch.save({"model": trained.state_dict()}, full)
    frozen_bytes = sum(p.numel() * 4 for p in trained.parameters() if not p.requires_grad)
    assert path.stat().st_size < full.stat().st_size - 0.9 * frozen_bytes  # heads dominate a nano detector

    fresh = _detector()
    meta = load_trainable(fresh, path)
    assert meta["e3va_trainable"]["tuning"] == "e3va" and meta["e3va_trainable"]["config"] == "# the config"
    for (k, a), b in zip(trained.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k
    saved = torch.load(path, weights_only=True)["model"]
    assert set(saved) == set(trainable_state_dict(trained))
    assert not any(".trunk." in k and "highway" not in k and "norm" not in k for k in saved)  # no frozen trunk


def test_frozen_random_factors_travel_with_the_trainable_file(tmp_path):
    """e3va_fa's frozen down-projection factors are random, not pretrained: the file must carry them."""
    trained = _detector("e3va_fa")
    _train_a_little(trained)
    path = save_trainable(trained, tmp_path / "task.pth")
    fresh = _detector("e3va_fa")
    factors = {n: b for n, b in fresh.named_buffers() if ".down.v" in n}
    assert factors
    with torch.no_grad():
        for b in factors.values():
            b.normal_()  # another draw, as a process with another random state would make
    load_trainable(fresh, path)
    expected = dict(trained.named_buffers())
    for name, b in factors.items():
        assert torch.equal(b, expected[name]), name


def test_trainable_only_file_is_refused_by_another_method_base_or_shape(tmp_path):
    trained = _detector()
    _train_a_little(trained)
    path = save_trainable(trained, tmp_path / "task.pth")

    other_method = _detector(tuning="e3va_plus")
    with pytest.raises(TrainableCheckpointError, match=r"tuning='e3va'.*tuning='e3va_plus'"):
        load_trainable(other_method, path)

    other_base = _detector(seed=1)
    before = _state(other_base)
    with pytest.raises(TrainableCheckpointError, match="other frozen base weights"):
        load_trainable(other_base, path)
    for k, v in other_base.state_dict().items():  # refused before anything was copied
        assert torch.equal(v, before[k]), k

    other_rank = _detector(rank=2)
    with pytest.raises(TrainableCheckpointError, match="shape mismatches"):
        load_trainable(other_rank, path)


def test_a_trainable_only_checkpointer_writes_the_trainable_part_and_names_it_last(tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    model = _detector()
    _train_a_little(model)
    checkpointer = E3VACheckpointer(model, str(tmp_path), trainable_only=True, config="# the config")
    checkpointer.save("model_0000009", iteration=9)
    saved = torch.load(tmp_path / "model_0000009.pth", weights_only=True)
    assert saved["e3va_trainable"] == trainable_metadata(model, "# the config") and saved["iteration"] == 9
    expected = trainable_state_dict(model)
    assert set(saved["model"]) == set(expected) and all(torch.equal(saved["model"][k], v) for k, v in expected.items())
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert checkpointer._holds_trainable_only(str(tmp_path / "model_0000009.pth"))  # resume reads it so
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    assert not checkpointer._holds_trainable_only(str(tmp_path / "garbage.pth"))  # load() will say why
    (tmp_path / "garbage.pth").unlink()
    with pytest.raises(ValueError, match="plain file name"):
        checkpointer.save("../model_outside")
    checkpointer.save_to_disk = False  # as on every rank but the first: writes nothing
    checkpointer.save("model_0000019")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "last_checkpoint", "model_0000009.pth"]
    monkeypatch.chdir(tmp_path / "elsewhere")  # without a save_dir, nothing is written either
    E3VACheckpointer(model, trainable_only=True).save("model_0000029")
    assert list((tmp_path / "elsewhere").iterdir()) == []


class _Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(2))  # trained
        self.register_buffer("scale", torch.ones(1))  # belongs to the trained module: saved
        self.bn = torch.nn.BatchNorm1d(2).requires_grad_(False)  # frozen, with buffers: base


class _Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.zeros(3))  # no trained parameter of its own: base
        self.inner = _Inner()


class _DDPLike(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.module = _Outer()  # as DistributedDataParallel holds the model


def test_trainable_state_dict_keeps_the_trained_modules_own_tensors_only():
    assert set(trainable_state_dict(_Outer())) == {"inner.w", "inner.scale"}
    assert set(trainable_state_dict(_DDPLike())) == {"inner.w", "inner.scale"}  # unwrapped
    assert set(full_checkpoint(_Outer())) == {"model"}  # no E3VA backbone: no tuning or side-network record
    assert set(trainable_state_dict(torch.nn.Linear(2, 2))) == {"weight", "bias"}  # the root's: no prefix
    ddp_names = {f"module.{k}": v for k, v in _Outer().state_dict().items()}  # as DDP saves them
    assert missing_trainable(_Outer(), ddp_names) == []
    assert holds_side_network({"backbone.bottom_up.losa.0.w": 0}) and holds_side_network({"a.highway.b": 0})
    assert not holds_side_network({"backbone.bottom_up.blocks.0.w": 0})


def test_config_record_is_the_yaml_detectron2_writes_or_none(monkeypatch):
    cfg = OmegaConf.create({"train": {"max_iter": 3}})
    assert yaml.safe_load(config_record(cfg)) == {"train": {"max_iter": 3}}

    def cannot_dump(*args, **kwargs):
        raise yaml.representer.RepresenterError("not representable")

    # LazyConfig.save then writes a pickle only, no YAML: nothing to record.
    with monkeypatch.context() as m:
        m.setattr(yaml, "dump", cannot_dump)
        assert config_record(cfg) is None

    def cannot_write(cfg, filename):
        raise TypeError("not representable")

    # The record is informative: a config that cannot be written must not stop the save.
    monkeypatch.setattr(LazyConfig, "save", staticmethod(cannot_write))
    assert config_record(cfg) is None


def test_base_fingerprint_sees_frozen_weights_only():
    a, b = _detector(), _detector()
    assert base_fingerprint(a) == base_fingerprint(b)
    _train_a_little(b)
    assert base_fingerprint(a) == base_fingerprint(b)  # trainable changes do not count
    with torch.no_grad():
        b.backbone.bottom_up.trunk.patch_embed.proj.weight[0, 0, 0, 0] += 1e-3
    assert base_fingerprint(a) != base_fingerprint(b)


class _NotATensor:
    pass


def test_files_needing_arbitrary_unpickling_are_refused_unless_opted_in(tmp_path, monkeypatch):
    path = tmp_path / "unsafe.pth"
    torch.save({"model": {}, "extra": _NotATensor()}, path)
    monkeypatch.delenv("E3VA_ALLOW_UNSAFE_PICKLE", raising=False)
    with pytest.raises(CheckpointReadError, match="E3VA_ALLOW_UNSAFE_PICKLE=1"):
        read_checkpoint_file(str(path))
    with pytest.raises(CheckpointReadError, match="E3VA_ALLOW_UNSAFE_PICKLE=1"):
        E3VACheckpointer(_detector()).load(str(path))
    assert isinstance(read_checkpoint_file(str(path), allow_unsafe_pickle=True)["extra"], _NotATensor)
    opted_in = E3VACheckpointer(_detector(), allow_unsafe_pickle=True)  # the checkpointer passes it on
    assert isinstance(opted_in.load(str(path))["extra"], _NotATensor)
    monkeypatch.setenv("E3VA_ALLOW_UNSAFE_PICKLE", "1")
    assert isinstance(read_checkpoint_file(str(path))["extra"], _NotATensor)

    pkl = tmp_path / "model.pkl"
    pkl.write_bytes(b"not read")
    monkeypatch.delenv("E3VA_ALLOW_UNSAFE_PICKLE")
    with pytest.raises(CheckpointReadError, match=r"\.pkl checkpoints"):
        E3VACheckpointer(_detector()).load(str(pkl))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_file_gives_a_clear_error_and_leaves_the_model_untouched(tmp_path, damage):
    source = _detector(seed=3)
    path = tmp_path / "model.pth"
    torch.save({"model": source.state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x80\x02garbage" * 100)

    model = _detector()
    before = _state(model)
    with pytest.raises(CheckpointReadError, match=r"truncated or corrupted.*Nothing was loaded"):
        E3VACheckpointer(model).load(str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.slow
def test_export_then_merge_gives_back_the_full_checkpoint(tmp_path):
    config = str(REPO / "configs" / "Shapes" / "mask_rcnn_e3va.py")
    model = instantiate(LazyConfig.load(config).model)
    E3VACheckpointer(model).load(str(NANO_SWIN_WEIGHTS))  # the base the run started from
    _train_a_little(model)
    full = tmp_path / "model_final.pth"
    E3VACheckpointer(model, str(tmp_path)).save("model_final")  # as training writes it, with its side-network record

    task, merged = tmp_path / "task.pth", tmp_path / "merged.pth"
    tool = [sys.executable, str(REPO / "tools" / "export_trainable.py"), "--config-file", config]
    run = lambda *a: subprocess.run([*tool, *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    proc = run("--weights", str(full), "--output", str(task))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trainable params:" in proc.stdout and task.stat().st_size < full.stat().st_size
    proc = run("--weights", str(NANO_SWIN_WEIGHTS), "--merge", str(task), "--output", str(merged))
    assert proc.returncode == 0, proc.stderr[-3000:]

    restored = torch.load(merged, weights_only=True)["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(restored[k], v), k

    # Onto another base the merge is refused, naming the reason.
    other_base = tmp_path / "other_base.pth"
    torch.save({"model": {k: v + 1 for k, v in torch.load(NANO_SWIN_WEIGHTS, weights_only=True)["model"].items()
                          if v.is_floating_point()}}, other_base)
    proc = run("--weights", str(other_base), "--merge", str(task), "--output", str(tmp_path / "bad.pth"))
    assert proc.returncode != 0 and "other frozen base weights" in proc.stderr
