"""Aggregation rules on state dicts (name -> numpy array), free of Flower.

FedAgain follows the official ``robust_divergence_experiments/train.py``:

- e_i: reconstruction MSE of the received global model on client i's data, measured by the
  client before local training (see ``federated.autoencoder.benchmark_error``);
- d_i = 1 - cos(vec theta_global, vec theta_i), the vectors concatenating the floating-point
  entries of the whole state dict: parameters and BN running means/variances, as in the
  official code. Deviation: the integer BN counters ``num_batches_tracked`` are left out.
  The official vector includes them, but there the global counter keeps pace with the
  clients' (its benchmark passes run the global model in training mode); with the global
  counter frozen (see below) it would make d_i measure local step counts, which dominate
  the norm of a small model;
- tau_i = 1 / ((e_i + 1e-6)(d_i + 1e-6));
- theta_global <- sum_i tau_i theta_i / sum_i tau_i over floating-point entries. Non-float
  entries (``num_batches_tracked``) keep the previous global value, as the official code
  does by starting from ``global_model.state_dict()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

State = Mapping[str, np.ndarray]
EPS = 1e-6


def _is_float(value: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(value).dtype, np.floating)


def flatten(state: State) -> np.ndarray:
    """vec(theta): the floating-point entries of the state dict, in key order, as float64."""
    return np.concatenate(
        [np.asarray(v, dtype=np.float64).ravel() for v in state.values() if _is_float(v)]
    )


def divergence(global_state: State, client_state: State) -> float:
    """d = 1 - <g, c> / (max(|g|, 1e-8) max(|c|, 1e-8)) (torch.cosine_similarity's eps)."""
    g, c = flatten(global_state), flatten(client_state)
    norm = max(np.linalg.norm(g), 1e-8) * max(np.linalg.norm(c), 1e-8)
    return float(1.0 - g @ c / norm)


def trust_scores(errors: Sequence[float], divergences: Sequence[float]) -> np.ndarray:
    """tau_i = 1 / ((e_i + 1e-6)(d_i + 1e-6)); a reported error below 0 is clamped to 0."""
    e = np.maximum(np.asarray(errors, dtype=np.float64), 0.0)
    d = np.asarray(divergences, dtype=np.float64)
    return 1.0 / ((e + EPS) * (d + EPS))


def weighted_average(states: Sequence[State], weights: Sequence[float], reference: State) -> dict:
    """sum_i w_i theta_i / sum_i w_i per floating-point entry; other entries from ``reference``."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    out = {}
    for key, ref in reference.items():
        ref = np.asarray(ref)
        if _is_float(ref):
            mean = sum(wi * np.asarray(s[key], dtype=np.float64) for wi, s in zip(w, states))
            out[key] = mean.astype(ref.dtype)
        else:
            out[key] = ref.copy()
    return out


def fedagain(
    global_state: State, states: Sequence[State], errors: Sequence[float]
) -> tuple[dict, np.ndarray, np.ndarray]:
    """FedAgain round: returns (new global state, tau, d) for the clients in order."""
    d = np.array([divergence(global_state, s) for s in states])
    tau = trust_scores(errors, d)
    return weighted_average(states, tau, global_state), tau, d


def fedavg(states: Sequence[State], num_examples: Sequence[int], reference: State) -> dict:
    """FedAvg: theta = sum_i n_i theta_i / sum_i n_i; non-float entries from ``reference``."""
    return weighted_average(states, num_examples, reference)
