"""Runs chosen tests against chosen mutmut mutants, in one process (Detectron2 is imported once).

Each line of PAIRS is ``MUTANT TEST...`` (``none`` for the unmutated code, which must pass). mutmut's
trampolines read ``MUTANT_UNDER_TEST``, so setting it switches the mutant without a new process. Run it
from the mutants folder so that the mutated package and the current tests are imported:

    cd .mutmut/mutants && cp -r ../../tests . && \\
      PYTHONPATH=$PWD ../../.venv/bin/python ../../tools/mutmut_verify.py PAIRS

Used to check that a new test kills a survivor without a full mutmut rerun (which changing the test
selection forces); prints one line per pair: killed, survived or the pytest exit code.
"""
import os
import sys
from pathlib import Path
from typing import List, Tuple

import pytest


def read_pairs(path: str) -> List[Tuple[str, List[str]]]:
    """(mutant, tests) per non-empty line."""
    pairs = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            mutant, *tests = line.split()
            pairs.append((mutant, tests))
    return pairs


def verdict(mutant: str, tests: List[str]) -> str:
    """Runs ``tests`` with ``mutant`` active; a test failure (exit code 1) kills it."""
    os.environ["MUTANT_UNDER_TEST"] = mutant
    rc = pytest.main(["-q", "-x", "-p", "no:cacheprovider", *tests])
    return {0: "survived", 1: "killed"}.get(int(rc), f"exit code {int(rc)}")


if __name__ == "__main__":
    lines = [f"{m} {verdict(m, tests)}" for m, tests in read_pairs(sys.argv[1])]
    print("\n".join(lines))
