"""Anomaly-detection metrics: clean (label 0) versus corrupted (label 1) copies of test images."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score
from sklearn.metrics import roc_curve

from methods.engines.corruptions import SEVERITIES, corrupt


def detection_metrics(clean_scores: np.ndarray, corrupted_scores: np.ndarray) -> dict[str, float]:
    """ROC-AUC of the scores, and accuracy / precision / recall / F1 of ``score >= t*`` at the
    Youden threshold t* = argmax_t TPR(t) - FPR(t) (as the official evaluation). Non-finite
    scores (a diverged model) detect nothing: AUC 0.5 and no image flagged."""
    y = np.r_[np.zeros(len(clean_scores)), np.ones(len(corrupted_scores))]
    s = np.r_[clean_scores, corrupted_scores]
    if not np.isfinite(s).all():
        return {"auc": 0.5, "threshold": float("inf"), "accuracy": float(np.mean(y == 0)),
                "precision": 0.0, "recall": 0.0, "f1": 0.0}
    fpr, tpr, thresholds = roc_curve(y, s)
    t = float(thresholds[np.argmax(tpr - fpr)])
    pred = (s >= t).astype(int)
    return {
        "auc": float(roc_auc_score(y, s)),
        "threshold": t,
        "accuracy": float(accuracy_score(y, pred)),
        "precision": float(precision_score(y, pred, zero_division=0)),
        "recall": float(recall_score(y, pred, zero_division=0)),
        "f1": float(f1_score(y, pred, zero_division=0)),
    }


def corruption_table(
    score_fn: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    corruptions: Iterable[str],
    severities: Iterable[int] = SEVERITIES,
    seed: int = 0,
) -> list[dict]:
    """One row per (corruption, severity): ``detection_metrics`` of ``score_fn`` (per-image
    anomaly scores, e.g. reconstruction MSE) on ``images`` versus their corrupted copies."""
    clean = score_fn(images)
    rows = []
    for name in corruptions:
        for sev in severities:
            bad = corrupt(images, name, sev, np.random.default_rng([seed, sev]))
            scores = detection_metrics(clean, score_fn(bad))
            rows.append({"corruption": name, "severity": sev, **scores})
    return rows
