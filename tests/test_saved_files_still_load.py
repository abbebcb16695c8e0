"""What users had before the package was restructured still works: files saved then
(tests/fixtures/pre_restructure, made by its make.py) load and give the output they gave, and every public
name of ``e3va`` then is still there."""
from pathlib import Path

import torch

import e3va
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


# e3va.__all__ at commit 74c3ccc, before the restructure, one name per line.
PUBLIC_NAMES_BEFORE = (FIXTURES / "public_names.txt").read_text().split()


def test_every_public_name_of_before_the_restructure_remains():
    missing = [n for n in PUBLIC_NAMES_BEFORE if n not in e3va.__all__ or not hasattr(e3va, n)]
    assert not missing
