"""Files saved before the package was restructured (tests/fixtures/pre_restructure, made by its make.py)
load with today's code and give the output they gave then."""
from pathlib import Path

import torch

from e3va import E3VACheckpointer, E3VAViT, load_trainable

FIXTURES = Path(__file__).parent / "fixtures" / "pre_restructure"


def _model() -> E3VAViT:
    return E3VAViT("nano", tuning="e3va", img_size=64, window_size=2).eval()


def _expected_output(model: E3VAViT) -> None:
    expected = torch.load(FIXTURES / "expected.pth", weights_only=True)
    with torch.no_grad():
        out = model(expected["input"])["last_feat"]
    torch.testing.assert_close(out, expected["output"], rtol=1e-5, atol=1e-6)


def test_a_full_checkpoint_saved_before_loads_and_gives_the_same_output():
    model = _model()
    E3VACheckpointer(model).load(str(FIXTURES / "full.pth"))
    _expected_output(model)


def test_a_trainable_only_task_file_saved_before_loads_on_its_base_and_gives_the_same_output():
    model = _model()
    E3VACheckpointer(model).load(str(FIXTURES / "base.pth"))
    load_trainable(model, FIXTURES / "task.pth")
    _expected_output(model)
