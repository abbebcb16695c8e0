"""Counts mutmut's results per module, as a Markdown table, for docs/MUTATION.md.

    tools/mutmut_run.sh results --all true | python tools/mutmut_summary.py 'e3va.atomic.*' ...

Only the mutants matching one of the patterns (fnmatch, as ``mutmut run`` takes them) are counted: the
ones the run was asked to test. The kill rate is killed / (all but "not checked"): a mutant no test
reaches ("no tests") counts as not killed.
"""
import fnmatch
import sys
from collections import Counter, defaultdict
from typing import Dict, Iterable, List, Tuple

STATUSES = ("killed", "survived", "no tests", "timeout", "suspicious", "not checked")


def parse(lines: Iterable[str], patterns: List[str]) -> List[Tuple[str, str]]:
    """(mutant name, status) of the result lines whose name matches a pattern."""
    rows = []
    for line in lines:
        name, sep, status = line.strip().rpartition(": ")
        if sep and any(fnmatch.fnmatch(name, p) for p in patterns):
            rows.append((name, status))
    return rows


def table(rows: List[Tuple[str, str]]) -> str:
    """One line per module (the name up to its mangled function), then the total."""
    by_module: Dict[str, Counter] = defaultdict(Counter)
    for name, status in rows:
        module = name.split(".x")[0]  # mangled functions start with "x_" or "xǁ"
        by_module[module][status] += 1
        by_module["**all**"][status] += 1
    head = "| module | mutants | " + " | ".join(STATUSES) + " | kill rate |\n|---|" + "---|" * (len(STATUSES) + 2)
    lines = [head]
    for module, c in sorted(by_module.items(), key=lambda kv: kv[0] == "**all**"):
        tested = sum(c.values()) - c["not checked"]
        rate = f"{100 * c['killed'] / tested:.1f}%" if tested else "-"
        lines.append(f"| {module} | {sum(c.values())} | " + " | ".join(str(c[s]) for s in STATUSES) + f" | {rate} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(parse(sys.stdin, sys.argv[1:])))
