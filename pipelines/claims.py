"""Claim checks: the method against the baseline the paper beats, on the same data, budget and seeds.

The arms are paired by seed (same seed, split and budget). With ``d_i`` the i-th pair's difference in
the paper's direction (``method − baseline``, or ``baseline − method`` where lower is better) over
``k`` pairs::

    d̄ = mean(d_i),   SE² = s²(d) / k  [+ Σ_i (p_i(1 − p_i)/n_method + q_i(1 − q_i)/n_baseline) / k²]
    CI = d̄ ± t_{0.975, k−1} · SE

The bracketed term is the within-seed binomial variance of a rate measured on ``trials`` test items
per seed (``p_i``, ``q_i`` the arms' rates); it keeps a few seeds that happen to agree from passing
for certainty. A claim against a fixed number (chance, a threshold) is the one-sample case, with
``d_i = method_i − value``. The verdict: ``reproduced`` when the whole interval lies above the claim's
margin (the smallest difference that matters, stated with its reason), ``contradicted`` when it lies
below ``min(0, margin)`` (a negative margin is a non-inferiority bound: "within 0.02"), and
``inconclusive`` otherwise. One pair without a binomial term has no interval: inconclusive.
"""
from __future__ import annotations

import shutil
import textwrap
from collections.abc import Hashable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
from scipy import stats

from pipelines.errors import UserError

Verdict = Literal["reproduced", "contradicted", "inconclusive"]
LEVEL = 0.95


@dataclass
class Claim:
    """One claim's measurements and verdict (``reproduced`` is true only for that verdict)."""

    claim: str
    metric: str
    method: float
    baseline: float
    seeds: int
    reproduced: bool
    verdict: Verdict
    difference: float
    ci: list[float] | None
    stderr: float | None
    margin: float
    rule: str
    pairing: str
    test: str
    pairs: list = field(default_factory=list)
    method_per_seed: list[float] = field(default_factory=list)
    baseline_per_seed: list[float] = field(default_factory=list)
    deviations: list[str] = field(default_factory=list)


def _values(arm, name: str, claim: str) -> dict:
    if not isinstance(arm, Mapping):
        raise TypeError(f"claim {claim!r}: the {name} arm must map each pairing key (a seed) to its value")
    if not arm:
        raise UserError(f"claim {claim!r}: the {name} arm has no measurements")
    return {key: float(value) for key, value in arm.items()}


def _key(key: Hashable):
    return list(key) if isinstance(key, tuple) else key


def compare(claim: str, metric: str, method: Mapping, baseline: Mapping | float, *, margin: float, why: str,
            higher_is_better: bool = True, trials: int | None = None, paired_by: str = "seed") -> Claim:
    """The claim's verdict from the method's and the baseline's value per ``paired_by`` key (a seed, or a
    seed and an architecture), or from the method's against a fixed ``baseline`` value.

    ``margin`` is the smallest difference in the paper's direction that would matter and ``why`` says
    why (required, a margin of 0 included); ``trials`` is the number of test items behind each value
    when the metric is a rate on a test set (adds the binomial variance).
    """
    if not why:
        raise ValueError(f"claim {claim!r}: its margin needs a reason")
    m = _values(method, "method", claim)
    fixed = not isinstance(baseline, Mapping)
    b = dict.fromkeys(m, float(baseline)) if fixed else _values(baseline, "baseline", claim)
    if set(m) != set(b):
        raise UserError(f"claim {claim!r}: arms are not paired by {paired_by}: method has {sorted(m, key=str)}, "
                        f"baseline has {sorted(b, key=str)}")
    keys = sorted(m, key=str)
    mv, bv = np.array([m[k] for k in keys]), np.array([b[k] for k in keys])
    sign = 1.0 if higher_is_better else -1.0
    diffs, k = sign * (mv - bv), len(keys)
    mean = float(diffs.mean())
    variance = float(diffs.var(ddof=1)) / k if k > 1 else 0.0
    if trials:
        binomial = mv * (1 - mv) / trials + (0 if fixed else bv * (1 - bv) / trials)
        variance += float(binomial.sum()) / k ** 2
    if k > 1 or trials:
        stderr = variance ** 0.5
        quantile = stats.t.ppf(0.5 + LEVEL / 2, k - 1) if k > 1 else stats.norm.ppf(0.5 + LEVEL / 2)
        ci = [mean - quantile * stderr, mean + quantile * stderr]
        verdict: Verdict = ("reproduced" if ci[0] > margin else
                            "contradicted" if ci[1] < min(0.0, margin) else "inconclusive")
    else:
        stderr, ci, verdict = None, None, "inconclusive"
    what = "method − baseline" if higher_is_better else "baseline − method (lower is better)"
    against = f"the fixed value {float(baseline):g}" if fixed else f"the baseline, paired by {paired_by}"
    test = ("one-sample" if fixed else "paired") + (f" t, {k - 1} df" if k > 1 else " normal" if trials else
                                                    " (one pair: no interval)")
    return Claim(
        claim=claim, metric=metric, method=float(mv.mean()), baseline=float(bv.mean()), seeds=k,
        reproduced=verdict == "reproduced", verdict=verdict, difference=mean, ci=ci, stderr=stderr,
        margin=float(margin), pairing=f"method vs {against} (n = {k})",
        test=test + (f" + binomial over {trials} test items" if trials else ""),
        rule=(f"reproduced if the {LEVEL:.0%} CI of mean({what}) lies above {margin:g} ({why}); "
              f"contradicted if below {min(0.0, margin):g}"),
        pairs=[_key(key) for key in keys], method_per_seed=mv.tolist(), baseline_per_seed=bv.tolist(),
    )


def _plain(value):
    return value.item() if isinstance(value, np.generic) else value


def per_seed(table: Mapping, column: str, by: str | tuple[str, ...] = "seed", **where) -> dict:
    """``column``'s mean per ``by`` key over the rows of ``table`` (name → column) matching ``where``."""
    by = (by,) if isinstance(by, str) else by
    rows = np.ones(len(table[column]), dtype=bool)
    for name, value in where.items():
        col = np.asarray(table[name])
        rows &= np.isclose(col, value) if np.issubdtype(col.dtype, np.floating) else col == value
    groups: dict = {}
    for i in np.flatnonzero(rows):
        key = tuple(_plain(np.asarray(table[name])[i]) for name in by)
        groups.setdefault(key if len(by) > 1 else key[0], []).append(float(np.asarray(table[column])[i]))
    return {key: float(np.mean(values)) for key, values in groups.items()}


@dataclass
class ClaimReport:
    headline: Claim
    more: list[Claim] = field(default_factory=list)

    def to_json(self) -> dict:
        return {**asdict(self.headline), "more": [asdict(c) for c in self.more]}

    @classmethod
    def from_json(cls, data: dict) -> "ClaimReport":
        """The report a ``claim.json`` holds."""
        headline = {k: v for k, v in data.items() if k != "more"}
        return cls(Claim(**headline), [Claim(**claim) for claim in data.get("more", [])])

    def table(self, width: int | None = None) -> str:
        """The claims with their difference, interval and verdict; long cells wrap, nothing is cut."""
        claims = [self.headline, *self.more]
        rows = [("claim", "metric", "method", "baseline", "difference [95% CI]", "n", "verdict")]
        for c in claims:
            interval = f"[{c.ci[0]:+.4f}, {c.ci[1]:+.4f}]" if c.ci else "[no interval]"
            rows.append((c.claim, f"{c.metric} · margin {c.margin:g}", f"{c.method:.4f}", f"{c.baseline:.4f}",
                         f"{c.difference:+.4f} {interval}", str(c.seeds), c.verdict))
        fixed = [max(len(r[i]) for r in rows) for i in range(2, len(rows[0]))]
        room = (width or shutil.get_terminal_size((160, 24)).columns) - sum(fixed) - 2 * (len(fixed) + 1)
        widths = [max(24, room * 3 // 5), max(20, room - max(24, room * 3 // 5)), *fixed]
        lines = []
        for i, row in enumerate(rows):
            cells = [textwrap.wrap(cell, w) or [""] for cell, w in zip(row, widths)]
            for j in range(max(len(cell) for cell in cells)):
                parts = [(cell[j] if j < len(cell) else "").ljust(w) for cell, w in zip(cells, widths)]
                lines.append("  ".join(parts).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        counts = {v: sum(c.verdict == v for c in claims) for v in ("reproduced", "inconclusive", "contradicted")}
        lines.append(", ".join(f"{n} {v}" for v, n in counts.items()))
        return "\n".join(lines)
