"""The RL watermark's learned green/red split, its multiplicative bias and its detection score.

Policy (development code of An et al., `util.py`): an encoder maps the context to e ∈ R^D;
    g = (sign_ste(e) + 1) / 2,   sign_ste(x) = x + sign(x) − sg(x)   (forward sign, backward identity)
and a fixed random map m: V → {0..D−1} (``random.seed(66)``, one ``randint`` per token) makes token
v green iff g[m(v)] = 1. Here the encoder is a causal GRU over the text, so the split at position t
depends on the whole prefix x_<t (a semantics-dependent split that a meaning-changing edit moves).
Embedding:  logits ← logits · (1 + δ·g)  for the first ``measure_threshold`` + 1 generated tokens,
afterwards only where the next-token entropy H > α (strict in generation).
Detection:  s(x) = mean_{t∈S} g_t[x_t], S = the first ``measure_threshold`` + 1 continuation tokens and
later ones whose entropy under the LM is ≥ α (non-strict in detection, as in the code).
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LogitsProcessor

from methods.language_models.gated_bias import gated_bias


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """sign(x) forward, identity backward (the dev code's x + sign(x) − sg(x), grouped to be exact);
    plain sign(x) where no gradient is tracked."""
    sign = x.sign()
    return sign + (x - x.detach()) if x.requires_grad else sign


def vocabulary_mapping(vocab_size: int, dim: int, seed: int = 66) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(0, dim - 1) for _ in range(vocab_size)]


class SplitEncoder(nn.Module):
    """Token embedding → 1-layer GRU → linear head to D dims, for every prefix of the input."""

    def __init__(self, vocab_size: int, dim: int = 384, hidden: int = 64, map_seed: int = 66):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.head = nn.Linear(hidden, dim)
        self.register_buffer("mapping", torch.tensor(vocabulary_mapping(vocab_size, dim, map_seed)))

    def embedding(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) → e of shape (B, T, D); e[:, t] encodes input_ids[:, :t + 1]."""
        return self.head(self.gru(self.embed(input_ids))[0])

    def last(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) → (e[:, T − 1] of ``embedding``, of shape (B, D); GRU state (B, H)), with the head
        applied to the last position only."""
        _, hidden = self.gru(self.embed(input_ids))
        return self.head(hidden[0]), hidden[0]

    def step(self, tokens: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One GRU update with the newest tokens (B,) from state (B, H): (e (B, D), new state), as
        ``embedding`` computes it for a one-token input (the GRU's own cell, without the sequence loop)."""
        gru = self.gru
        hidden = torch.gru_cell(self.embed(tokens), hidden, gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0,
                                gru.bias_hh_l0)
        return self.head(hidden), hidden

    @staticmethod
    def bits(e: torch.Tensor) -> torch.Tensor:
        """Straight-through green bit per embedding dimension, g = (sign_ste(e) + 1) / 2, (..., D)."""
        return (sign_ste(e) + 1) / 2

    def to_vocabulary(self, per_dim: torch.Tensor) -> torch.Tensor:
        """(..., D) → (..., V): token v takes the value of its dimension m(v)."""
        return per_dim.index_select(-1, self.mapping)

    def green_of(self, e: torch.Tensor) -> torch.Tensor:
        """Straight-through green indicators over the vocabulary from embeddings e (..., D) → (..., V)."""
        return self.to_vocabulary(self.bits(e))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T, V) green indicators g_t[v] of the token after each prefix."""
        return self.green_of(self.embedding(input_ids))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H = −Σ_v p_v log p_v with p = softmax(logits); masked logits (−inf) have p = 0 and add 0."""
    return torch.special.entr(torch.softmax(logits.float(), dim=-1)).sum(-1)


def bias_factor(green: torch.Tensor, delta: float, gate: torch.Tensor) -> torch.Tensor:
    """1 + δ·g where ``gate`` (broadcast over the last axis) is true, else 1."""
    return (green * (delta * gate[..., None])).add_(1)


def bias_logits(logits: torch.Tensor, green: torch.Tensor, delta: float, gate: torch.Tensor) -> torch.Tensor:
    """logits·(1 + δ·g) where ``gate`` (broadcast over the vocabulary) is true, else logits."""
    return logits * bias_factor(green, delta, gate)


def generation_gate(logits: torch.Tensor, generated: int, alpha: float, measure_threshold: int) -> torch.Tensor:
    """Bias on while ≤ measure_threshold tokens were generated, then only where H > α."""
    if generated <= measure_threshold:
        return torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    return entropy(logits) > alpha


class LearnedSplitWatermark(LogitsProcessor):
    """Logits processor of the learned split; ``prompt_len`` = width of the prompt batch.

    The GRU state is carried from one decoding step to the next (one token per step), so a step
    costs one GRU update instead of a pass over the whole prefix. On CPU the gate and the bias run as
    one compiled kernel (``gated_bias``); elsewhere the bias factor is formed per embedding
    dimension and only then spread over the vocabulary.
    """

    def __init__(self, encoder: SplitEncoder, prompt_len: int, delta: float = 0.13, alpha: float = 1.0,
                 measure_threshold: int = 20):
        self.encoder, self.prompt_len = encoder, prompt_len
        self.delta, self.alpha, self.measure_threshold = delta, alpha, measure_threshold
        self._seen: torch.Tensor | None = None
        self._hidden: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        seen = self._seen
        if seen is not None and seen.shape[0] == input_ids.shape[0] and seen.shape[1] == input_ids.shape[1] - 1 \
                and torch.equal(seen, input_ids[:, :-1]):
            e, self._hidden = self.encoder.step(input_ids[:, -1], self._hidden)
        else:
            e, self._hidden = self.encoder.last(input_ids)
        self._seen = input_ids
        generated = input_ids.shape[1] - self.prompt_len
        if scores.device.type == "cpu" and scores.dtype == e.dtype == torch.float32:
            return gated_bias(scores, e, self.encoder.mapping, self.delta, self.alpha,
                              always=generated <= self.measure_threshold)
        gate = generation_gate(scores, generated, self.alpha, self.measure_threshold)
        return scores * self.encoder.to_vocabulary(bias_factor(self.encoder.bits(e), self.delta, gate))


def detection_mask(lm_logits: torch.Tensor, continuation: torch.Tensor, alpha: float, measure_threshold: int
                   ) -> torch.Tensor:
    """Scored tokens S (B, T): continuation token t is scored if it is among the first
    ``measure_threshold`` + 1 or if the LM entropy before it, H(lm_logits[:, t − 1]), is ≥ α."""
    rank = continuation.long().cumsum(dim=1)
    before = F.pad(entropy(lm_logits[:, :-1]), (1, 0))
    return continuation & ((rank <= measure_threshold + 1) | (before >= alpha))


def detection_score(green: torch.Tensor, input_ids: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """s = mean_{t∈S} g_{t−1}[x_t]; ``green`` (B, T, V) from the encoder on ``input_ids``."""
    hits = green[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    mask = scored[:, 1:].float()
    return (hits * mask).sum(1) / mask.sum(1).clamp_min(1)


def green_fraction(green: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """ĝ = mean_{t∈S} of the share of the vocabulary that is green before token t."""
    mask = scored[:, 1:].float()
    return (green[:, :-1].mean(-1) * mask).sum(1) / mask.sum(1).clamp_min(1)


def policy_logprobs(lm_logits: torch.Tensor, green: torch.Tensor, input_ids: torch.Tensor,
                    continuation: torch.Tensor, delta: float, alpha: float, measure_threshold: int) -> torch.Tensor:
    """log π(x_t | x_<t) under the biased logits for t ≥ 1, shape (B, T − 1), with the generation gate."""
    generated_before = continuation.long().cumsum(dim=1)[:, 1:] - 1
    logits = lm_logits[:, :-1]
    gate = (generated_before <= measure_threshold) | (entropy(logits) > alpha)
    biased = bias_logits(logits, green[:, :-1], delta, gate)
    return torch.log_softmax(biased, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
