"""Official Swin classification checkpoints load into the trunk of an E3VA detector, for any method."""
import pytest
import torch
from detectron2.config import instantiate

from e3va import E3VACheckpointer, build_swin_trunk
from e3va.swin_weights import is_swin_classification_state_dict
from e3va.trainable import TrainableCheckpointError, full_checkpoint
from helpers import load_config, make_tiny, tiny_detector


def _official_release_file(path):
    """A file laid out as Microsoft's Swin release: {"model": trunk + classification head + final norm}."""
    torch.manual_seed(1)
    trunk = build_swin_trunk("nano")
    state = {k: v for k, v in trunk.state_dict().items() if not k.startswith(("norm0", "norm1", "norm2", "norm3"))}
    state["norm.weight"] = torch.ones(256)
    state["norm.bias"] = torch.zeros(256)
    state["head.weight"] = torch.randn(1000, 256)
    state["head.bias"] = torch.zeros(1000)
    torch.save({"model": state}, path)
    return state


@pytest.mark.parametrize("tuning", ["e3va", "lora", "full"])
def test_official_swin_weights_load_into_the_trunk(tmp_path, tuning):
    path = tmp_path / "swin_nano_patch4_window7_224.pth"
    official = _official_release_file(path)
    assert is_swin_classification_state_dict(official)
    model = tiny_detector("common/models/mask_rcnn_swin_e3va.py", tuning=tuning)
    E3VACheckpointer(model).load(str(path))
    trunk_state = {k.replace(".base_layer", ""): v for k, v in model.backbone.bottom_up.trunk.state_dict().items()}
    for key, value in official.items():
        if key.startswith(("head.", "norm.")) or key.endswith("relative_position_index"):
            continue
        assert torch.equal(trunk_state[key], value), key


def test_detectron2_checkpoints_are_left_alone(tmp_path):
    model = tiny_detector("common/models/mask_rcnn_swin_e3va.py")
    path = tmp_path / "model_final.pth"
    torch.save(full_checkpoint(model), path)
    other = tiny_detector("common/models/mask_rcnn_swin_e3va.py")
    E3VACheckpointer(other).load(str(path))
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k


def test_a_full_checkpoint_without_side_network_record_is_taken_as_the_legacy_taps(tmp_path):
    model = tiny_detector("common/models/mask_rcnn_swin_e3va.py")
    path = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict()}, path)  # written before the record existed
    with pytest.raises(TrainableCheckpointError, match="adapter_input=sublayer_input"):
        E3VACheckpointer(tiny_detector("common/models/mask_rcnn_swin_e3va.py")).load(str(path))
    cfg = load_config("common/models/mask_rcnn_swin_e3va.py")
    make_tiny(cfg).adapter_input = "sublayer_input"
    cfg.model.roi_heads.num_classes = 3
    E3VACheckpointer(instantiate(cfg.model)).load(str(path))  # the override the error names makes it load


def test_timm_layout_files_and_model_names_load_into_the_trunk(tmp_path, monkeypatch):
    """train.init_checkpoint may be a timm file or a timm model name; both end in the official layout."""
    import timm
    from test_swin_weights import random_timm_swin

    from e3va.swin_weights import timm_to_official

    source = random_timm_swin()
    expected = {k: v for k, v in timm_to_official(source.state_dict()).items() if not k.startswith(("head.", "norm."))}
    path = tmp_path / "timm_swin_nano.pth"
    torch.save(source.state_dict(), path)
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **kw: source)  # no network here

    for init_checkpoint in (str(path), "swin_base_patch4_window7_224.ms_in22k"):
        model = tiny_detector("common/models/mask_rcnn_swin_e3va.py", tuning="lora")
        E3VACheckpointer(model).load(init_checkpoint)
        trunk_state = {k.replace(".base_layer", ""): v for k, v in model.backbone.bottom_up.trunk.state_dict().items()}
        for key, value in expected.items():
            assert torch.equal(trunk_state[key], value), (init_checkpoint, key)


def test_window_7_weights_load_into_a_window_12_detector_and_wrong_sizes_are_refused(tmp_path):
    path = tmp_path / "swin_nano_patch4_window7_224.pth"
    _official_release_file(path)
    cfg_model = lambda **kw: tiny_detector("common/models/mask_rcnn_swin_e3va.py")  # noqa: E731
    model = cfg_model()
    model.backbone.bottom_up.trunk = build_swin_trunk("nano", window_size=12)
    E3VACheckpointer(model).load(str(path))
    assert model.backbone.bottom_up.trunk.layers[0].blocks[0].attn.relative_position_bias_table.shape == (23 * 23, 1)

    wrong = tmp_path / "swin_t.pth"
    trunk_t = build_swin_trunk("T")
    torch.save({"model": {k: v for k, v in trunk_t.state_dict().items() if not k.startswith("norm")}}, wrong)
    with pytest.raises(ValueError, match=r"embed_dim=96.*Swin-T.*embed_dim=32.*Swin-nano"):
        E3VACheckpointer(cfg_model()).load(str(wrong))
