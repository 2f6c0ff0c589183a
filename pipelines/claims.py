"""Claim checks: the method against the baseline the paper beats, on the same data, budget and seeds.

A verdict is computed from the measurements: a claim holds when the mean over seeds moves in the
paper's direction by at least ``margin``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class Claim:
    claim: str
    metric: str
    method: float
    baseline: float
    seeds: int
    reproduced: bool
    deviations: list[str] = field(default_factory=list)
    method_per_seed: list[float] = field(default_factory=list)
    baseline_per_seed: list[float] = field(default_factory=list)
    rule: str = ""


def compare(claim: str, metric: str, method_values, baseline_values, *, higher_is_better: bool = True,
            margin: float = 0.0, deviations: list[str] | None = None) -> Claim:
    """Mean over seeds of each arm; reproduced iff sign·(mean method − mean baseline) ≥ margin."""
    m = np.asarray(method_values, dtype=float)
    b = np.asarray(baseline_values, dtype=float)
    if b.size == 1 and m.size > 1:
        b = np.full_like(m, b.item())
    diff = (m.mean() - b.mean()) * (1 if higher_is_better else -1)
    op = "≥" if higher_is_better else "≤"
    sign = "+" if higher_is_better else "−"
    return Claim(
        claim=claim, metric=metric, method=float(m.mean()), baseline=float(b.mean()),
        seeds=int(m.size), reproduced=bool(diff >= margin), deviations=list(deviations or []),
        method_per_seed=m.tolist(), baseline_per_seed=b.tolist(),
        rule=f"mean method {op} mean baseline {sign} {margin:g}",
    )


@dataclass
class ClaimReport:
    headline: Claim
    more: list[Claim] = field(default_factory=list)

    def to_json(self) -> dict:
        return {**asdict(self.headline), "more": [asdict(c) for c in self.more]}

    def table(self) -> str:
        rows = [("claim", "metric", "method", "baseline", "seeds", "reproduced")]
        for c in [self.headline, *self.more]:
            rows.append((c.claim, c.metric, f"{c.method:.4f}", f"{c.baseline:.4f}", str(c.seeds),
                         "yes" if c.reproduced else "no"))
        widths = [min(60, max(len(r[i]) for r in rows)) for i in range(len(rows[0]))]
        lines = []
        for i, row in enumerate(rows):
            cells = [(cell if len(cell) <= w else cell[: w - 1] + "…").ljust(w) for cell, w in zip(row, widths)]
            lines.append("  ".join(cells).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)
