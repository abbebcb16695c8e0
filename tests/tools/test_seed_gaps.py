"""tools/seed_gaps.py: Student's t against closed forms and printed tables, Welch's test by hand, and the
pairwise table from a study's transfer.json."""
import json
import math

import pytest

from helpers import load_tool

gaps = load_tool("seed_gaps")


@pytest.mark.parametrize("t", [0.3, 1.0, 2.5, 12.0])
def test_two_sided_p_matches_the_closed_forms_for_one_and_two_degrees_of_freedom(t):
    # df = 1 is the Cauchy distribution; df = 2 has the CDF 1/2 + t / (2 sqrt(t^2 + 2)).
    assert gaps.student_t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), abs=1e-10)
    assert gaps.student_t_two_sided_p(-t, 2) == pytest.approx(1 - t / math.sqrt(t * t + 2), abs=1e-10)


@pytest.mark.parametrize("t, df", [(12.7062, 1), (2.776445, 4), (2.570582, 5), (2.228139, 10), (2.042272, 30)])
def test_two_sided_p_is_five_percent_at_the_printed_critical_values(t, df):
    assert gaps.student_t_two_sided_p(t, df) == pytest.approx(0.05, abs=1e-6)


def test_two_sided_p_at_fractional_degrees_of_freedom_and_the_ends():
    # Welch's df is fractional. Reference: twice the t density's tail integrated numerically (mpmath.quad).
    assert gaps.student_t_two_sided_p(1.6, 3.5) == pytest.approx(0.194864306977292, abs=1e-10)
    assert gaps.student_t_two_sided_p(0.0, 3.5) == 1.0
    assert gaps.student_t_two_sided_p(1e200, 3.5) == 0.0
    with pytest.raises(ValueError, match="df=0"):
        gaps.student_t_two_sided_p(1.0, 0)


def test_welch_by_hand():
    # a: mean 2, variance 1; b: mean 6, variance 4; n = 3 each.
    result = gaps.welch([1.0, 2.0, 3.0], [4.0, 6.0, 8.0])
    assert result["diff"] == pytest.approx(-4.0)
    assert result["t"] == pytest.approx(-4.0 / math.sqrt(5 / 3))
    assert result["df"] == pytest.approx((5 / 3) ** 2 / ((1 / 3) ** 2 / 2 + (4 / 3) ** 2 / 2))
    assert result["p"] == pytest.approx(0.0547867660410765, abs=1e-10)  # the tail integral, as above
    # Equal variances and sizes: Welch's df is the pooled test's 2 (n - 1).
    assert gaps.welch([1.0, 2.0, 3.0], [5.0, 6.0, 7.0])["df"] == pytest.approx(4.0)
    with pytest.raises(ValueError, match="at least two values"):
        gaps.welch([1.0], [2.0, 3.0])


def _study(tmp_path, per_method):
    methods = [{"method": m, "seeds": list(v), "bbox_AP_per_seed": list(v.values()),
                "segm_AP_per_seed": [2 * x for x in v.values()]} for m, v in per_method.items()]
    (tmp_path / "transfer.json").write_text(json.dumps({"methods": methods, "runs": []}))
    return tmp_path


def test_table_pairs_same_seeds_and_applies_the_spread_rule(tmp_path, capsys):
    study = _study(tmp_path, {"fixed": {0: 50.0, 1: 52.0, 2: 51.0},
                              "e3va": {0: 51.0, 1: 53.5, 2: 51.5, 3: 60.0},
                              "full": {0: 55.0, 1: 57.0, 2: 56.0}})
    summaries = gaps.load_summaries(study)
    near = gaps.gap(summaries["fixed"], summaries["e3va"], "bbox_AP")
    assert near["same_seed"] == {0: 1.0, 1: 1.5, 2: 0.5}  # seed 3 has no partner
    assert gaps.gap(summaries["e3va"], summaries["fixed"], "bbox_AP")["same_seed"] == {0: -1.0, 1: -1.5, 2: -0.5}
    assert not near["beyond_both_spreads"]  # e3va's seed 3 widens its spread (4.1) past the 3.0 difference
    far = gaps.gap(summaries["fixed"], summaries["full"], "bbox_AP")
    assert far["diff"] == pytest.approx(5.0) and far["beyond_both_spreads"] and far["p"] < 0.01
    gaps.main([str(study), "fixed", "full"])
    out = capsys.readouterr().out
    # Mask AP is twice box AP in this study: its row must come from the mask values.
    assert "| box | full − fixed | +5.0 | 1.0, 1.0 | yes | 0: +5.0, 1: +5.0, 2: +5.0 | 6.12 (4.0) | 0.00 |" in out
    assert "| mask | full − fixed | +10.0 | 2.0, 2.0 | yes | 0: +10.0, 1: +10.0, 2: +10.0 | 6.12 (4.0) | 0.00 |" in out


def test_cli_names_what_is_wrong(tmp_path, capsys):
    study = _study(tmp_path, {"fixed": {0: 50.0, 1: 52.0}, "lora": {0: 51.0}})
    with pytest.raises(SystemExit):
        gaps.main([str(study), "fixed", "e3va"])
    assert "got ['fixed', 'e3va'], unknown: ['e3va']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gaps.main([str(study), "fixed", "lora"])
    assert "['lora'] have fewer than two seeds" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="transfer_study.py"):
        gaps.main([str(tmp_path / "nowhere"), "fixed", "lora"])
