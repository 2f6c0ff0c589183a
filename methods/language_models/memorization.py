"""Memorization accuracy (MA) and extraction likelihood (EL_n), as in CodeEraser's official code.

Reference: CGCL-codes/naturalcc examples/code-unlearning/unlearning/model.py
(`validation_ma`, `validation_secret_ma`, `validation_secret_el`; Jang et al. 2023 for the originals).

A target s = (s_0..s_{m−1}) follows a prefix c (secret variant: c = the tokens before the secret,
s = the secret). The whole-sequence variant of x = (x_0..x_{T−1}) is c = (x_0), s = (x_1..x_{T−1}),
which reproduces `validation_ma` / `validation_el` (start positions 1..T−1, resp. 1..T−n).

    MA(s | c)   = (1/m) Σ_{i=0}^{m−1} 1[argmax_v p_θ(v | c, s_<i) = s_i]
    g_i         = greedy continuation of (c, s_<i), truncated to m − i tokens
    OVERLAP_n(g, r) = #{a : g[a:a+n] ∈ ngrams_n(r)} / |ngrams_n(r)|,
                  counting the n-grams of g with multiplicity, over positions a ≤ |r| − n
    EL_n(s | c) = (1/(m−n+1)) Σ_{i=0}^{m−n} OVERLAP_n(g_i, s_{≥i})       if m ≥ n
    EL_n(s | c) = 1[g_0 = s]                                              if m < n

The numerator counts generated n-grams found anywhere in the reference suffix (a set lookup,
not a positional match), exactly as the official matrix implementation does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from transformers import PreTrainedModel

from methods.language_models.tiny_lm import generate, pad_rows


def memorization_accuracy_from_predictions(predictions: Sequence[int], target: Sequence[int]) -> float:
    """MA = fraction of positions i where the greedy next-token prediction equals target[i]."""
    if len(predictions) != len(target) or not target:
        raise ValueError("predictions and target must be non-empty and of equal length")
    return sum(int(p == t) for p, t in zip(predictions, target)) / len(target)


def ngram_overlap(generated: Sequence[int], reference: Sequence[int], n: int) -> float:
    """OVERLAP_n: share of the reference's n-gram slots whose generated n-gram occurs in the reference."""
    reference_ngrams = _ngrams(reference, n)
    if not reference_ngrams:
        raise ValueError(f"reference of length {len(reference)} has no {n}-grams")
    present = set(reference_ngrams)
    generated_ngrams = _ngrams(generated[: len(reference)], n)
    return sum(gram in present for gram in generated_ngrams) / len(reference_ngrams)


def extraction_likelihood_from_continuations(
    continuations: Sequence[Sequence[int]], target: Sequence[int], n: int
) -> float:
    """EL_n from greedy continuations, `continuations[i]` generated after (prefix, target[:i])."""
    m = len(target)
    if m < n:
        return float(list(continuations[0][:m]) == list(target))
    if len(continuations) < m - n + 1:
        raise ValueError(f"need continuations from {m - n + 1} start positions, got {len(continuations)}")
    return sum(ngram_overlap(continuations[i], target[i:], n) for i in range(m - n + 1)) / (m - n + 1)


@torch.no_grad()
def greedy_predictions(
    model: PreTrainedModel, target: Sequence[int], prefix: Sequence[int] | None = None
) -> list[int]:
    """argmax_v p_θ(v | prefix, target[:i]) for every i, from one causal forward pass."""
    prefix, target = _split(target, prefix)
    input_ids = torch.tensor([list(prefix) + list(target)], dtype=torch.long, device=model.device)
    model.eval()
    logits = model(input_ids=input_ids).logits[0]
    return logits[len(prefix) - 1 : -1].argmax(dim=-1).tolist()


@torch.no_grad()
def greedy_continuations(
    model: PreTrainedModel, target: Sequence[int], prefix: Sequence[int] | None = None
) -> list[list[int]]:
    """g_i for i = 0..m−1: the greedy continuation of (prefix, target[:i]) of up to m − i tokens."""
    prefix, target = _split(target, prefix)
    return [
        generate(model, list(prefix) + list(target[:i]), max_new_tokens=len(target) - i)[0].tolist()
        for i in range(len(target))
    ]


def memorization_accuracy(model: PreTrainedModel, target: Sequence[int], prefix: Sequence[int] | None = None) -> float:
    """MA of `target` after `prefix` (prefix None: whole-sequence MA of `target`)."""
    prefix, target = _split(target, prefix)
    return memorization_accuracy_from_predictions(greedy_predictions(model, target, prefix), target)


def extraction_likelihoods(
    model: PreTrainedModel,
    target: Sequence[int],
    prefix: Sequence[int] | None = None,
    ns: Iterable[int] = (3, 5, 10),
) -> dict[int, float]:
    """{n: EL_n} of `target` after `prefix` (prefix None: whole-sequence EL); continuations are shared."""
    prefix, target = _split(target, prefix)
    continuations = greedy_continuations(model, target, prefix)
    return {n: extraction_likelihood_from_continuations(continuations, target, n) for n in ns}


def _ngrams(tokens: Sequence[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(tokens[a : a + n]) for a in range(len(tokens) - n + 1)]


def _split(target: Sequence[int], prefix: Sequence[int] | None) -> tuple[list[int], list[int]]:
    """Whole-sequence form: the first token is the prefix and the rest is the target."""
    target = [int(t) for t in target]
    if prefix is None:
        prefix, target = target[:1], target[1:]
    if not prefix or not target:
        raise ValueError("need a non-empty prefix and target (a whole sequence needs ≥ 2 tokens)")
    return [int(t) for t in prefix], target


@torch.no_grad()
def batched_greedy_continuations(
    model: PreTrainedModel, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int]
) -> list[list[int]]:
    """Greedy continuation of each prompt (up to its own length budget) from one left-padded `generate`.

    A row that emits EOS ends there, as a separate `generate` call per prompt would.
    """
    ids, mask = pad_rows(prompts, model.config.pad_token_id, left=True)
    out = generate(model, ids, max_new_tokens=max(max_new_tokens), attention_mask=mask).tolist()
    eos = model.config.eos_token_id
    continuations = []
    for tokens, budget in zip(out, max_new_tokens):
        tokens = tokens[:budget]
        continuations.append(tokens[: tokens.index(eos) + 1] if eos in tokens else tokens)
    return continuations


@torch.no_grad()
def memorization_scores(
    model: PreTrainedModel,
    items: Sequence[tuple[Sequence[int], Sequence[int]]],
    ns: Iterable[int] = (3, 5, 10),
    with_el: bool = True,
) -> tuple[list[float], dict[int, list[float]]]:
    """MA(s | c) and EL_n(s | c) for many (prefix c, target s) pairs at once.

    MA uses one right-padded causal forward pass (teacher forcing over c + s); EL_n uses one
    batched greedy `generate` over every start position i = 0..m − min(ns) of every item.
    """
    ns = tuple(ns)
    items = [_split(target, prefix) for prefix, target in items]
    rows = [c + s for c, s in items]
    ids, mask = pad_rows(rows, model.config.pad_token_id)
    model.eval()
    predictions = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device)).logits.argmax(-1).cpu()
    ma = [memorization_accuracy_from_predictions(predictions[i, len(c) - 1 : len(c) + len(s) - 1].tolist(), s)
          for i, (c, s) in enumerate(items)]
    if not with_el:
        return ma, {}
    starts = [(k, i) for k, (_, s) in enumerate(items) for i in range(max(1, len(s) - min(ns) + 1))]
    continuations = batched_greedy_continuations(
        model, [items[k][0] + items[k][1][:i] for k, i in starts], [len(items[k][1]) - i for k, i in starts]
    )
    per_item: list[list[list[int]]] = [[] for _ in items]
    for (k, _), continuation in zip(starts, continuations):
        per_item[k].append(continuation)
    el = {n: [extraction_likelihood_from_continuations(per_item[k], s, n) for k, (_, s) in enumerate(items)]
          for n in ns}
    return ma, el
