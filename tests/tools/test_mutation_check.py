"""tools/mutation_check.py's own logic (the tool itself is run by hand or `make mutation-hand`, not here)."""
import re
import shutil

import pytest

from helpers import REPO, load_tool

tool = load_tool("mutation_check")


def test_every_mutant_applies_once_and_names_existing_tests():
    """A stale mutant would mutate nothing and a stale test id would collect nothing: both fail here first."""
    assert tool.stale_mutants(tool.PACKAGE, tool.MUTANTS) == []
    assert len({m.name for m in tool.MUTANTS}) == len(tool.MUTANTS)
    for mutant in tool.MUTANTS:
        assert mutant.tests, mutant.name
        for test_id in mutant.tests:
            path, func = test_id.split("::")
            name = re.sub(r"\[.*\]$", "", func)
            assert f"def {name}(" in (REPO / path).read_text(), test_id


def test_apply_mutant_changes_only_its_text_in_a_copy(tmp_path):
    mutant = next(m for m in tool.MUTANTS if m.name == "losa_token_residual_dropped")
    root = tmp_path / "E3VA"
    shutil.copytree(tool.PACKAGE / "e3va" / "methods", root / "e3va" / "methods")
    original = (root / mutant.path).read_text()
    tool.apply_mutant(root, mutant)
    mutated = (root / mutant.path).read_text()
    assert mutated == original.replace(mutant.old, mutant.new) and mutated != original
    assert (tool.PACKAGE / mutant.path).read_text() == original  # the working tree is untouched
    with pytest.raises(ValueError, match="0 matches"):  # applied twice: its text is gone
        tool.apply_mutant(root, mutant)


def test_report_counts_kills_and_keeps_the_prose_around_its_markers(tmp_path):
    a, b = tool.MUTANTS[:2]
    table = tool.report([(a, "failed", 3.0), (b, "passed", 4.0)], "python tools/mutation_check.py")
    assert "**1 of 2 mutants killed** (50%;" in table and f"survived: {b.name}" in table
    doc = tmp_path / "MUTATION.md"
    doc.write_text(f"intro\n{tool.BEGIN}\nold table\n{tool.END}\nnotes\n")
    tool.write_report(doc, table)
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("notes\n") and "old table" not in text and table in text


def test_report_tells_equivalent_survivors_apart():
    a = next(m for m in tool.MUTANTS if m.equivalent)
    b = next(m for m in tool.MUTANTS if not m.equivalent)
    table = tool.report([(a, "passed", 1.0), (b, "failed", 1.0)], "cmd")
    assert "1 of the 1 that are not equivalent" in table and f"survived: {a.name} (equivalent)." in table
    assert "**survived**: equivalent, " in table
