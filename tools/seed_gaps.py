#!/usr/bin/env python
"""How far apart two methods of a transfer study are, over their seeds.

Reads a study's ``transfer.json`` (``tools/transfer_study.py``) and, for each pair of the methods named, in
box and mask AP: the difference of the means, whether it exceeds both methods' seed spreads (the study's
rule for claiming a difference), the same-seed differences (a seed fixes the data order for every method),
and Welch's t-test over the seeds (two-sided p; no equal-variance assumption). Standard library only.

    python tools/seed_gaps.py docs/transfer_study_1500 fixed e3va full
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

METRICS = {"box": "bbox_AP", "mask": "segm_AP"}


def _beta_continued_fraction(a: float, b: float, x: float, eps: float = 1e-14, max_terms: int = 500) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz), which converges
    fast for x < (a + 1) / (a + b + 2)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, max_terms + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < eps:
            return result
    raise ArithmeticError(f"incomplete beta did not converge for a={a}, b={b}, x={x}")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0 and 0.0 <= x <= 1.0):
        raise ValueError(f"need a > 0, b > 0 and 0 <= x <= 1, got a={a}, b={b}, x={x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b  # symmetry: I_x(a,b) = 1 - I_{1-x}(b,a)


def student_t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` (> 0, not necessarily whole) degrees of freedom."""
    if not (df > 0 and math.isfinite(df)) or math.isnan(t):
        raise ValueError(f"need a number t and finite degrees of freedom > 0, got t={t}, df={df}")
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def welch(a: Sequence[float], b: Sequence[float]) -> Dict[str, float]:
    """Welch's t-test of mean(a) - mean(b): the difference, t, the Welch-Satterthwaite degrees of freedom and
    the two-sided p. Needs two values or more on each side, not all equal on both."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's test needs at least two values per side, got {len(a)} and {len(b)}")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        raise ValueError("Welch's test is undefined when both sides have no spread")
    diff = statistics.fmean(a) - statistics.fmean(b)
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return {"diff": diff, "t": t, "df": df, "p": student_t_two_sided_p(t, df)}


def per_seed(summary: Dict[str, Any], key: str) -> Dict[int, float]:
    """{seed: AP} of one method's summary in ``transfer.json``."""
    return dict(zip(summary["seeds"], summary[f"{key}_per_seed"], strict=True))


def gap(first: Dict[str, Any], second: Dict[str, Any], key: str) -> Dict[str, Any]:
    """``second`` minus ``first`` in metric ``key``: the difference of the means, both spreads (first's,
    second's) and Welch's test, over all seeds of each; the same-seed differences over the seeds both have."""
    before, after = per_seed(first, key), per_seed(second, key)
    test = welch(list(after.values()), list(before.values()))
    spreads = (statistics.stdev(before.values()), statistics.stdev(after.values()))
    return {**test, "spreads": spreads, "beyond_both_spreads": abs(test["diff"]) > max(spreads),
            "same_seed": {s: after[s] - before[s] for s in sorted(set(before) & set(after))}}


def table(summaries: Dict[str, Dict[str, Any]], methods: Sequence[str]) -> str:
    """A Markdown table of every pair of ``methods`` (later minus earlier), box then mask AP."""
    lines = ["| metric | pair | difference | spreads (earlier, later) | beyond both spreads | same-seed differences | Welch t (df) | p |",
             "|---|---|---:|---|---|---|---:|---:|"]
    for name, key in METRICS.items():
        for first, second in itertools.combinations(methods, 2):
            g = gap(summaries[first], summaries[second], key)
            same = ", ".join(f"{s}: {d:+.1f}" for s, d in g["same_seed"].items())
            lines.append(f"| {name} | {second} − {first} | {g['diff']:+.1f} | {g['spreads'][0]:.1f}, "
                         f"{g['spreads'][1]:.1f} | {'yes' if g['beyond_both_spreads'] else 'no'} | {same} | "
                         f"{g['t']:.2f} ({g['df']:.1f}) | {g['p']:.2f} |")
    return "\n".join(lines)


def load_summaries(study_dir: Path) -> Dict[str, Dict[str, Any]]:
    """The per-method summaries of ``study_dir/transfer.json``, by method."""
    path = study_dir / "transfer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: give a folder written by tools/transfer_study.py")
    return {s["method"]: s for s in json.loads(path.read_text())["methods"]}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path, help="a folder written by tools/transfer_study.py")
    parser.add_argument("methods", nargs="+", help="two or more of the study's methods, e.g. fixed e3va full")
    args = parser.parse_args(argv)
    summaries = load_summaries(args.study)
    unknown = [m for m in args.methods if m not in summaries]
    if unknown or len(args.methods) < 2:
        parser.error(f"give two or more of the study's methods ({', '.join(summaries)}); got {args.methods}"
                     + (f", unknown: {unknown}" if unknown else ""))
    short = [m for m in args.methods if len(summaries[m]["seeds"]) < 2]
    if short:
        parser.error(f"{short} have fewer than two seeds in {args.study}: no spread to compare")
    print(table(summaries, args.methods))


if __name__ == "__main__":
    main()
