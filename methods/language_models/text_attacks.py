"""Offline attack simulators for rl_watermark (stand-ins for the LLM attackers of the dev code).

- paraphrase (meaning-preserving): each continuation token is replaced with probability ``replace`` by a
  draw from the LM's next-token distribution at that position (other than itself), or deleted with
  probability ``delete``;
- sentiment spoof (meaning-flipping): content words swapped for antonyms (whole continuation, or its
  latter half only, as the dev code's "latter" attack); when no listed word occurs, a negation is inserted;
- hate spoof: a fixed offensive phrase inserted at a random word boundary (the dev code's
  `hate_phrase.json`; mild placeholder phrases here).
"""

from __future__ import annotations

import random

import torch

ANTONYMS = {
    "true": "false", "false": "true", "valid": "invalid", "invalid": "valid", "enable": "disable",
    "disable": "enable", "enabled": "disabled", "disabled": "enabled", "success": "failure", "always": "never",
    "never": "always", "can": "cannot", "cannot": "can", "must": "must not", "should": "should not",
    "add": "remove", "remove": "add", "open": "close", "close": "open", "start": "stop", "stop": "start",
    "first": "last", "last": "first", "before": "after", "after": "before", "with": "without",
    "include": "exclude", "same": "different", "new": "old", "empty": "full", "all": "no", "allow": "forbid",
    "returns": "discards", "return": "discard", "read": "write", "write": "read", "safe": "unsafe",
    "input": "output", "output": "input", "minimum": "maximum", "maximum": "minimum", "true.": "false.",
    "is": "is not", "are": "are not", "will": "will not", "may": "may not", "does": "does not",
}
HATE_PHRASES = (
    "people who use this are worthless idiots",
    "only stupid losers would ever read this",
    "everyone from that group is garbage",
)


def sentiment_spoof(text: str, rng: random.Random, latter_only: bool = False) -> str:
    words = text.split(" ")
    start = len(words) // 2 if latter_only else 0
    hits = [i for i in range(start, len(words)) if words[i].lower() in ANTONYMS]
    for i in hits:
        words[i] = ANTONYMS[words[i].lower()]
    if not hits:
        words.insert(rng.randint(start, len(words)), "not")
    return " ".join(words)


def hate_spoof(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    words.insert(rng.randint(0, len(words)), rng.choice(HATE_PHRASES))
    return " ".join(words)


@torch.no_grad()
def paraphrase(tokens: list[int], probs: torch.Tensor, generator: torch.Generator, replace: float = 0.25,
               delete: float = 0.05) -> list[int]:
    """``tokens`` = continuation; ``probs[i]`` = LM distribution of the token at continuation position i."""
    out = []
    draws = torch.rand(len(tokens), generator=generator).tolist()
    for i, (token, u) in enumerate(zip(tokens, draws)):
        if u < delete:
            continue
        if u < delete + replace:
            p = probs[i].clone()
            p[token] = 0
            if p.sum() > 0:
                token = int(torch.multinomial(p / p.sum(), 1, generator=generator))
        out.append(token)
    return out
