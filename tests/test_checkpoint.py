"""Official Swin classification checkpoints load into the trunk of an E3VA detector, for any method."""
import pytest
import torch

from e3va import E3VACheckpointer, build_swin_trunk
from e3va.checkpoint import is_swin_classification_state_dict
from helpers import tiny_detector


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
    torch.save({"model": model.state_dict()}, path)
    other = tiny_detector("common/models/mask_rcnn_swin_e3va.py")
    E3VACheckpointer(other).load(str(path))
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k
