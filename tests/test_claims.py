import numpy as np
import pytest
from scipy import stats

from pipelines.claims import ClaimReport, compare, per_seed
from pipelines.errors import UserError


def seeds(*values):
    return dict(enumerate(values))


def test_interval_matches_scipys_t_interval():
    method, baseline = seeds(0.91, 0.86, 0.88, 0.93, 0.85), seeds(0.84, 0.85, 0.83, 0.86, 0.87)
    claim = compare("a beats b", "acc", method, baseline, margin=0.0, why="any gain")
    diffs = np.array(list(method.values())) - np.array(list(baseline.values()))
    low, high = stats.t.interval(0.95, len(diffs) - 1, loc=diffs.mean(), scale=stats.sem(diffs))
    assert claim.ci == pytest.approx([low, high], abs=1e-12) and claim.difference == pytest.approx(diffs.mean())
    assert claim.stderr == pytest.approx(stats.sem(diffs)) and claim.seeds == 5
    assert claim.method == pytest.approx(0.886) and claim.baseline == pytest.approx(0.85)
    assert claim.pairs == [0, 1, 2, 3, 4] and "paired t, 4 df" in claim.test


def test_one_sample_interval_against_a_fixed_value():
    aurocs = seeds(0.71, 0.64, 0.69)
    claim = compare("above chance", "auroc", aurocs, 0.5, margin=0.1, why="a tenth of the AUROC range")
    values = np.array(list(aurocs.values()))
    low, high = stats.t.interval(0.95, 2, loc=values.mean() - 0.5, scale=stats.sem(values))
    assert claim.ci == pytest.approx([low, high]) and "one-sample" in claim.test and claim.baseline == 0.5


def test_binomial_variance_is_combined_with_the_spread_over_seeds():
    method, baseline = seeds(0.9, 0.8, 0.85), seeds(0.7, 0.7, 0.8)
    claim = compare("a beats b", "acc", method, baseline, margin=0.0, why="any gain", trials=200)
    m, b = np.array(list(method.values())), np.array(list(baseline.values()))
    binomial = (m * (1 - m) / 200 + b * (1 - b) / 200).sum() / 9
    assert claim.stderr == pytest.approx(np.sqrt(np.var(m - b, ddof=1) / 3 + binomial))
    single = compare("one seed", "acc", seeds(0.9), seeds(0.7), margin=0.0, why="any gain", trials=100)
    assert single.stderr == pytest.approx(np.sqrt(0.09 / 100 + 0.21 / 100)) and single.verdict == "reproduced"


def test_three_way_verdict():
    up = compare("up", "acc", seeds(0.9, 0.8, 0.7), seeds(0.8, 0.7, 0.6), margin=0.0, why="any gain")
    down = compare("down", "acc", seeds(0.7, 0.6, 0.5), seeds(0.8, 0.7, 0.6), margin=0.0, why="any gain")
    noisy = compare("noise", "acc", seeds(0.81, 0.79, 0.82, 0.78), seeds(0.8, 0.8, 0.8, 0.8), margin=0.0, why="x")
    assert (up.verdict, up.reproduced) == ("reproduced", True) and up.ci == pytest.approx([0.1, 0.1])
    assert (down.verdict, down.reproduced) == ("contradicted", False)
    assert (noisy.verdict, noisy.reproduced) == ("inconclusive", False)
    small = compare("too small", "acc", seeds(0.805, 0.806), seeds(0.8, 0.8), margin=0.01, why="one point")
    assert small.verdict == "inconclusive"  # surely positive, but below the margin that matters
    assert compare("one pair", "acc", seeds(0.9), seeds(0.1), margin=0.0, why="x").verdict == "inconclusive"


def test_direction_and_non_inferiority_margin():
    assert compare("lower", "ppl", seeds(10.0, 11.0), seeds(12.0, 13.0), higher_is_better=False,
                   margin=0.0, why="x").verdict == "reproduced"
    within = compare("keeps", "acc", seeds(0.795, 0.79, 0.797), seeds(0.8, 0.8, 0.8), margin=-0.02, why="2 points")
    worse = compare("keeps", "acc", seeds(0.70, 0.71, 0.72), seeds(0.8, 0.8, 0.8), margin=-0.02, why="2 points")
    assert within.verdict == "reproduced" and worse.verdict == "contradicted"


def test_unpaired_arms_and_missing_reasons_are_refused():
    with pytest.raises(UserError, match="not paired by seed") as error:
        compare("a beats b", "acc", {0: 0.9, 1: 0.8}, {0: 0.7, 2: 0.7}, margin=0.0, why="x")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="needs a reason"):
        compare("a beats b", "acc", seeds(0.9), seeds(0.7), margin=0.0, why="")


def test_per_seed_groups_the_matching_rows():
    table = {"seed": np.array([0, 0, 1, 1]), "arm": np.array(["a", "b", "a", "a"]),
             "eps": np.array([0.1, 0.1, 0.1, 0.2]), "acc": np.array([0.5, 0.9, 0.6, 0.8])}
    assert per_seed(table, "acc", arm="a") == {0: 0.5, 1: pytest.approx(0.7)}
    assert per_seed(table, "acc", arm="a", eps=0.1) == {0: 0.5, 1: 0.6}
    assert per_seed(table, "acc", by=("seed", "arm")) == {(0, "a"): 0.5, (0, "b"): 0.9, (1, "a"): pytest.approx(0.7)}
    read_back = {**table, "arm": table["arm"].astype(object)}  # strings as parquet gives them back
    assert per_seed(read_back, "acc", by="arm") == {"a": pytest.approx(0.6333333), "b": 0.9}


def test_report_json_and_table():
    long = "a claim whose text is long enough that a narrow table has to wrap it rather than cut it off " * 2
    report = ClaimReport(compare(long, "m", seeds(1.0, 1.0), seeds(0.0, 0.0), margin=0.5, why="half"),
                         [compare("x", "y", seeds(0.0, 0.1), seeds(1.0, 1.0), margin=0.0, why="x")])
    data = report.to_json()
    assert {"claim", "metric", "method", "baseline", "seeds", "reproduced", "verdict", "difference", "ci",
            "stderr", "pairing", "test", "deviations", "more"} <= set(data)
    assert data["reproduced"] is True and data["more"][0]["verdict"] == "contradicted"
    table = report.table(width=120)
    assert table.splitlines()[0].split()[:2] == ["claim", "metric"]
    assert all(len(line) <= 120 for line in table.splitlines())
    assert set(long.split()) <= set(table.split()) and "contradicted" in table and "+1.0000 [+1.0000, +1.0000]" in table
    assert table.splitlines()[-1] == "1 reproduced, 0 inconclusive, 1 contradicted"
