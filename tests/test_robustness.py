"""Nothing lost, nothing silently wrong (docs/ROBUSTNESS.md): atomic checkpoint writes, output directories
that a run refuses to overwrite or to "resume" from nothing, overrides that catch typos, and tools that
refuse to write over their input."""
import hashlib
import os
import pickle
import signal
import subprocess
import sys
from argparse import Namespace
from pathlib import Path
from typing import Dict

import pytest
import torch
from detectron2.engine import default_argument_parser

from e3va.atomic import atomic_torch_save
from e3va.checkpoint import read_checkpoint_file
from e3va.engine import training
from e3va.engine.training import OutputDirError, check_output_dir
from e3va.overrides import ConfigOverrideError, load_config
from helpers import REPO, load_tool

SHAPES = str(REPO / "configs" / "Shapes" / "mask_rcnn_e3va.py")

# ---------------------------------------------------------------------------------- atomic checkpoint writes
_KILLED_SAVE = """
import os, signal, sys
import torch
sys.path.insert(0, {tests!r})
from helpers import perturb, tiny_detector
from e3va import E3VACheckpointer

out = {out!r}
torch.manual_seed(0)
model = tiny_detector("common/models/mask_rcnn_swin_e3va.py")
checkpointer = E3VACheckpointer(model, out, trainable_only={trainable_only})
checkpointer.save("model_0000001")
checkpointer.save("model_final")  # the good file that a re-run is about to replace
torch.save(torch.load(os.path.join(out, "model_final.pth"), weights_only=True), os.path.join(out, "ref.pt"))
perturb(model.backbone.bottom_up, seed=1)

def dying_save(obj, f, *args, **kwargs):  # half a file on disk, then the process dies
    f.write(b"PK\\x03\\x04" + b"\\0" * 4096)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = dying_save
checkpointer.save({name!r})
"""


def _hashes(folder: Path) -> Dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "trainable_only, name",  # two of the four combinations: each case starts a process (about a minute)
    [(False, "model_final"), (True, "model_0000003")],
    ids=["full_rewrite_of_model_final", "trainable_only_periodic"],
)
def test_a_save_killed_midway_keeps_the_previous_checkpoint(tmp_path, trainable_only, name):
    out = tmp_path / "run"
    script = _KILLED_SAVE.format(tests=str(REPO / "tests"), out=str(out), trainable_only=trainable_only, name=name)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert list(out.glob(f".{name}.pth.*.tmp")), "the kill did not happen while writing"

    expected_last = "model_final.pth"  # saved before the kill; a periodic save killed midway is not tagged
    assert (out / "last_checkpoint").read_text().strip() == expected_last
    loaded = read_checkpoint_file(str(out / expected_last))
    reference = torch.load(out / "ref.pt", weights_only=True)
    assert ("e3va_trainable" in loaded) == trainable_only
    assert loaded["model"].keys() == reference["model"].keys()
    assert all(torch.equal(loaded["model"][k], v) for k, v in reference["model"].items())
    assert not (out / f"{name}.pth").exists() or name == "model_final"
    read_checkpoint_file(str(out / "model_0000001.pth"))


def test_a_failed_atomic_save_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "w.pth"
    atomic_torch_save({"a": torch.ones(2)}, path)
    with pytest.raises((AttributeError, TypeError, pickle.PicklingError)):
        atomic_torch_save({"a": torch.zeros(2), "bad": lambda: 0}, path)  # a lambda cannot be pickled
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth"]
    with pytest.raises(IsADirectoryError, match="is a directory"):
        atomic_torch_save({}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth"]


# ------------------------------------------------------------------------------------------- output dirs
def _finished_run(folder: Path, tag: str = "model_final.pth") -> Path:
    folder.mkdir(parents=True)
    for name in ("model_0000001.pth", "model_final.pth", "metrics.json", "config.yaml", "log.txt"):
        (folder / name).write_bytes(name.encode() * 7)
    if tag is not None:
        (folder / "last_checkpoint").write_text(tag)
    return folder


class _BuiltSomething(AssertionError):
    pass


def _main(out: Path, *extra: str):
    """The training tool's main, stopped before it builds the model: a refusal must come earlier (and
    if the guard is broken the test fails at once, instead of training)."""
    args = default_argument_parser().parse_args(["--config-file", SHAPES, *extra, f"train.output_dir={out}"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "instantiate", lambda *a, **k: (_ for _ in ()).throw(_BuiltSomething()))
        return training.main(args)


@pytest.mark.parametrize(
    "tag, flags, needles",
    [
        ("model_final.pth", [], ["--resume", "train.allow_overwrite=True", "model_final.pth"]),
        (None, ["--resume"], ["last_checkpoint is missing", "iteration 0"]),
        ("model_0000009.pth", ["--resume"], ["names 'model_0000009.pth', which does not exist"]),
        ("", ["--resume"], ["last_checkpoint is empty"]),
    ],
    ids=["fresh_run_over_checkpoints", "resume_without_last_checkpoint", "last_checkpoint_names_a_missing_file",
         "empty_last_checkpoint"],
)
def test_a_run_that_would_lose_checkpoints_is_refused_and_changes_nothing(tmp_path, tag, flags, needles):
    out = _finished_run(tmp_path / "run", tag)
    before = _hashes(out)
    with pytest.raises(OutputDirError) as err:
        _main(out, *flags)
    for needle in needles:
        assert needle in str(err.value)
    assert str(out) in str(err.value)
    assert _hashes(out) == before


def test_resume_with_nothing_to_resume_is_refused_and_creates_nothing(tmp_path):
    typo = tmp_path / "rnu"
    with pytest.raises(OutputDirError, match=r"rnu does not exist.*leave out --resume"):
        _main(typo, "--resume")
    assert not typo.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OutputDirError, match="holds no checkpoint"):
        _main(empty, "--resume")
    assert list(empty.iterdir()) == []


def test_do_train_itself_refuses_before_building_anything(tmp_path, monkeypatch):
    """tools/demo.py and the tests call do_train directly, without setup()."""
    out = _finished_run(tmp_path / "run")
    before = _hashes(out)
    cfg = load_config(SHAPES, [f"train.output_dir={out}"])
    monkeypatch.setattr(training, "instantiate", lambda *a, **k: pytest.fail("built something"))
    with pytest.raises(OutputDirError, match="train.allow_overwrite=True"):
        training.do_train(Namespace(resume=False), cfg)
    assert _hashes(out) == before


def test_what_may_proceed(tmp_path):
    run = _finished_run(tmp_path / "run")
    check_output_dir(str(run), resume=True)  # a real resume
    check_output_dir(str(run), resume=False, allow_overwrite=True)  # overwriting on purpose
    check_output_dir(str(tmp_path / "new"), resume=False)  # a new run into a new directory
    logs_only = tmp_path / "logs_only"  # e.g. a run that failed before its first checkpoint
    logs_only.mkdir()
    (logs_only / "log.txt").write_text("x")
    check_output_dir(str(logs_only), resume=False)
    check_output_dir("", resume=True)  # no output dir: nothing is saved, nothing to lose


def test_allow_overwrite_drops_the_old_last_checkpoint(tmp_path):
    """So that a --resume after the new run is killed cannot continue the old run's weights."""
    out = _finished_run(tmp_path / "run")
    training._untag_previous_run(str(out))
    assert not (out / "last_checkpoint").exists() and (out / "model_final.pth").exists()


# --------------------------------------------------------------------------------------------- overrides
@pytest.mark.parametrize(
    "override, needles",
    [
        ("train.max_iters=3", ["'train.max_iters'", "train.max_iter", "+train.max_iters=3"]),
        ("optimiser.lr=0.1", ["'optimiser.lr'", "optimizer.lr"]),
        ("train.trainable_checkpont=task.pth", ["train.trainable_checkpoint"]),
        ("model.backbone.bottom_up.tunning=e3va", ["E3VASwin", "'tunning'", "did you mean tuning", "window_size"]),
    ],
)
def test_a_mistyped_override_names_the_closest_keys(override, needles):
    with pytest.raises(ConfigOverrideError) as err:
        load_config(SHAPES, [override])
    for needle in needles:
        assert needle in str(err.value)


def test_a_mistyped_override_stops_training_before_anything_is_written(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigOverrideError, match="train.max_iter"):
        _main(out, "train.max_iters=3")
    assert not out.exists()


def test_the_overrides_the_tools_and_tests_use_still_apply():
    cfg = load_config(SHAPES, [
        "train.seed=3", "optimizer.params.lr_factor_func.factor=0.5",  # tools/transfer_study.py
        "dataloader.test.dataset.names=shapes_minival", "dataloader.evaluator.dataset_name=shapes_minival",
        "train.trainable_checkpoint=task.pth", "train.trainable_only_checkpoints=True",  # read with .get
        "train.allow_overwrite=True", "train.max_iter=3", "train.init_checkpoint=",
        "model.backbone.bottom_up.rank=4",  # a constructor argument the config leaves at its default
        "+my.new_key=7",  # Hydra's explicit addition
    ])
    assert cfg.train.seed == 3 and cfg.train.trainable_checkpoint == "task.pth" and cfg.my.new_key == 7
    assert cfg.model.backbone.bottom_up.rank == 4


def test_coco_configs_accept_the_optional_train_keys():
    cfg = load_config(str(REPO / "configs" / "COCO" / "mask_rcnn_swin_t_e3va.py"),
                      ["train.seed=1", "train.device=cpu", "train.trainable_checkpoint=t.pth"])
    assert cfg.train.seed == 1


# ------------------------------------------------------------------------------- tools and their inputs
def test_convert_pretrained_refuses_to_overwrite_its_source(tmp_path):
    src = tmp_path / "swin.pth"
    src.write_bytes(b"weights")
    with pytest.raises(SystemExit, match="would replace that file"):
        load_tool("convert_pretrained").main([str(src), str(tmp_path / "." / "swin.pth")])
    assert src.read_bytes() == b"weights"


def test_export_trainable_refuses_an_output_equal_to_an_input(tmp_path):
    weights = tmp_path / "model_final.pth"
    weights.write_bytes(b"full checkpoint")
    for flags in (["--weights", str(weights)], ["--weights", "base.pth", "--merge", str(weights)]):
        with pytest.raises(SystemExit, match="would replace that file"):
            load_tool("export_trainable").main(["--config-file", SHAPES, *flags, "--output", str(weights)])
    assert weights.read_bytes() == b"full checkpoint"


# ------------------------------------------------------------------------------ resume onto another model
def _checkpointer(out: Path, tuning: str = "e3va", **bottom_up):
    """A nano detector's checkpointer with an optimizer, as training builds it (seeded: same base)."""
    from detectron2.config import instantiate

    from e3va import E3VACheckpointer
    from helpers import load_config as load_model_config, make_tiny

    cfg = load_model_config("common/models/mask_rcnn_swin_e3va.py")
    make_tiny(cfg, tuning).update(**bottom_up)
    cfg.model.roi_heads.num_classes = 3
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    return E3VACheckpointer(model, str(out), optimizer=optimizer)


@pytest.mark.parametrize(
    "bottom_up, recorded, needles",
    [
        ({"tuning": "lora"}, True, ["tuning='e3va'", "model.backbone.bottom_up.tuning=e3va"]),
        ({"rank": 2}, True, ["shape mismatches", "rank"]),
        ({"tuning": "lora"}, False, ["tensors missing from the file", "model.backbone.bottom_up.tuning="]),
    ],
    ids=["other_method", "other_rank", "other_method_file_without_record"],
)
def test_resume_onto_a_full_checkpoint_of_another_model_is_refused_before_loading(
        tmp_path, bottom_up, recorded, needles):
    from e3va.trainable import TUNING_KEY, TrainableCheckpointError

    out = tmp_path / "run"
    out.mkdir()
    _checkpointer(out).save("model_final")  # a full checkpoint of an e3va run, with its optimizer state
    if not recorded:  # as written before full checkpoints recorded their method
        data = torch.load(out / "model_final.pth", weights_only=True)
        del data[TUNING_KEY]
        torch.save(data, out / "model_final.pth")
    before = _hashes(out)
    resumed = _checkpointer(out, **{"tuning": "e3va", **bottom_up})
    state = {k: v.clone() for k, v in resumed.model.state_dict().items()}
    with pytest.raises(TrainableCheckpointError) as err:
        resumed.resume_or_load("", resume=True)
    for needle in needles + ["Nothing was loaded"]:
        assert needle in str(err.value)
    assert all(torch.equal(v, state[k]) for k, v in resumed.model.state_dict().items())
    assert not resumed.checkpointables["optimizer"].state_dict()["state"]
    assert _hashes(out) == before
    _checkpointer(out).resume_or_load("", resume=True)  # the model it was trained as resumes


def test_export_trainable_refuses_weights_with_nothing_trained_and_swapped_arguments(tmp_path):
    from e3va import NANO_SWIN_WEIGHTS
    from e3va.trainable import TRAINABLE_META_KEY

    export = load_tool("export_trainable").main
    task = tmp_path / "task.pth"
    with pytest.raises(SystemExit) as err:  # the pretrained trunk: no heads, no side network
        export(["--config-file", SHAPES, "--weights", str(NANO_SWIN_WEIGHTS), "--output", str(task)])
    for needle in ["lacks", "roi_heads.box_head", "backbone.bottom_up (", "random heads"]:
        assert needle in str(err.value)
    assert not task.exists()

    torch.save({"model": {}, TRAINABLE_META_KEY: {"format": "e3va-trainable/1"}}, task)
    with pytest.raises(SystemExit, match="look swapped"):
        export(["--config-file", SHAPES, "--weights", str(task), "--merge", str(NANO_SWIN_WEIGHTS),
                "--output", str(tmp_path / "merged.pth")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task.pth"]


# ------------------------------------------------------------------------------------------- data roots
@pytest.mark.parametrize("relpath, root", [
    ("COCO/mask_rcnn_swin_t_e3va.py", "coco"),
    ("COCO/mask_rcnn_vit_b_e3va.py", "coco"),
    ("ADE20K/upernet_swin_b_e3va.py", "ADEChallengeData2016"),
])
def test_coco_and_ade20k_configs_check_their_dataset_roots(relpath, root):
    from detectron2.config import instantiate

    from e3va.data.roots import DatasetRootError

    cfg = load_config(str(REPO / "configs" / relpath))
    for split in ("train", "test"):
        try:
            instantiate(cfg.dataloader[split].dataset)
        except DatasetRootError as error:  # not Detectron2's bare FileNotFoundError on one file
            assert "Expected layout: $DETECTRON2_DATASETS/" + root in str(error)
            assert "export DETECTRON2_DATASETS=" in str(error)
        else:
            pytest.skip(f"{root} is installed here: nothing is missing.")


def test_empty_and_out_of_image_boxes_are_dropped_with_a_count(tmp_path, caplog):
    import json
    import logging

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances

    from e3va.data.roots import dataset_dicts

    boxes = {1: [[10, 10, 20, 20], [5, 5, 0, 12]], 2: [[100, 70, 10, 10]], 3: [[30, 30, 8, 0.5]]}  # XYWH
    coco = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 64} for i in boxes],
        "categories": [{"id": 1, "name": "thing"}],
        "annotations": [{"id": 10 * i + k, "image_id": i, "bbox": b, "category_id": 1, "iscrowd": 0,
                         "area": b[2] * b[3]} for i, bs in boxes.items() for k, b in enumerate(bs)],
    }
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    name = "coco_e3va_degenerate_boxes"  # coco_: its root is checked like a builtin's
    register_coco_instances(name, {}, str(tmp_path / "instances.json"), str(tmp_path))
    log = logging.getLogger("e3va.data.annotations")
    log.addHandler(caplog.handler)  # whatever an earlier test did to the "e3va" logger's propagation
    try:
        dicts = dataset_dicts(name)
    finally:
        log.removeHandler(caplog.handler)
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert [(d["image_id"], [a["bbox"] for a in d["annotations"]]) for d in dicts] == [
        (1, [[10, 10, 20, 20]]), (3, [[30, 30, 8, 0.5]])]  # image 2 had only a box outside: dropped
    assert "Dropped 2 annotation(s) in 2 image(s) of coco_e3va_degenerate_boxes" in caplog.text


# ----------------------------------------------------------------------------------- the smaller ones
@pytest.mark.parametrize("kwargs, needle", [
    (dict(tuning="lora", rank=True), "rank must be a positive integer"),  # bool is an int: was rank 1
    (dict(tuning="bitfit", saved_input_dtype="float32"), "tuning='bitfit' has no side network"),
    (dict(tuning="lora", fused_adapters=False), "tuning='lora' has no side network"),
    (dict(tuning="e3va", fused_adapters="no"), "fused_adapters must be True or False"),
])
def test_bool_ranks_and_options_a_method_does_not_use_are_refused(kwargs, needle):
    from e3va import E3VASwin

    with pytest.raises(ValueError, match=needle):
        E3VASwin("nano", **kwargs)
    E3VASwin("nano", tuning="bitfit", saved_input_dtype="bfloat16", fused_adapters=True)  # the defaults: fine


def test_load_trainable_of_a_missing_file_and_save_trainable_to_a_directory_say_so(tmp_path):
    from e3va import E3VASwin, load_trainable, save_trainable

    model = E3VASwin("nano")
    with pytest.raises(FileNotFoundError, match=r"missing\.pth does not exist"):  # not "0 bytes ... truncated"
        load_trainable(model, tmp_path / "missing.pth")
    (tmp_path / "out").mkdir()
    with pytest.raises(IsADirectoryError, match="is a directory"):
        save_trainable(model, tmp_path / "out")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["out"]  # no stray .tmp


@pytest.mark.parametrize("source, needles", [
    ("https://example.invalid/weights/swin_tiny_patch4_window7_224.pth",
     ["URLError", "train.init_checkpoint=/path/to/swin_tiny_patch4_window7_224.pth"]),
    ("swin_base_patch4_window7_224.ms_in22k",
     ["timm model swin_base_patch4_window7_224.ms_in22k", "LocalEntryNotFoundError",
      "https://github.com/SwinTransformer/storage/", "train.init_checkpoint=/path/to/swin_base_patch4_window7_224_22k.pth"]),
], ids=["url", "timm_name"])
def test_an_offline_run_says_which_file_to_download_and_where_to_point_it(source, needles, monkeypatch):
    import urllib.error
    import urllib.request

    import timm
    from huggingface_hub.errors import LocalEntryNotFoundError

    from e3va import E3VACheckpointer
    from e3va.checkpoint_io import WeightsDownloadError
    from helpers import tiny_detector

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    def offline_hub(*args, **kwargs):
        raise LocalEntryNotFoundError("Cannot find the requested files in the disk cache and outgoing traffic "
                                      "has been disabled.")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    monkeypatch.setattr(timm, "create_model", offline_hub)
    with pytest.raises(WeightsDownloadError) as err:
        E3VACheckpointer(tiny_detector("common/models/mask_rcnn_swin_e3va.py")).load(source)
    for needle in needles + ["Offline?"]:
        assert needle in str(err.value)
