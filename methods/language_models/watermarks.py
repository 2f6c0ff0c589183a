"""KGW and Gumbel (Aaronson) watermarks as transformers logits processors, with their detectors.

Both re-seed a CPU MT19937 generator at every position from the last w = `context_width` tokens
(fewer at the very start of a sequence) and a secret `key`:
  - "three_bricks" (facebookresearch/three_bricks, used by dapurv5/alignmark, `seeding='hash'`):
        s ← key;  for each context token c:  s ← (s·35317 + c) mod (2^64 − 1)
  - "lefthash" (Kirchenbauer et al.; transformers `WatermarkLogitsProcessor`):
        s = key·c_last mod (2^64 − 1)   (only the last token is used, whatever w is)

KGW ("maryland"): green list G = first ⌊γ|V|⌋ entries of torch.randperm(|V|); logits[G] += δ
  (drawn by `randperm_prefixes`, which runs only the shuffle steps that reach the prefix).
  Detection over T scored tokens with s green ones:
      z = (s − γT) / sqrt(T γ (1 − γ)),   p = ½ erfc(z/√2),   exact p = I_γ(s, T − s + 1) = P[Bin(T, γ) ≥ s].
Gumbel ("openai"): r ~ U(0,1)^{|V|} = rand(|V|) after seeding; with p the temperature/top-p distribution:
      argmax variant:     x_t = argmax_v r_v^{1/p_v}
      randomized variant: x_t ~ Categorical(r_v^{1/p_v} / Σ_u r_u^{1/p_u})   ("openai_dr")
  Detection: S = Σ_t −log(1 − r_{x_t}) ~ Gamma(T, 1) under H0, p = Q(T, S) (regularised upper
  incomplete gamma); the reference z-score uses μ0 = 1, σ0 = π/√6: z = (S/T − 1)/(σ0/√T).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from scipy import special
from transformers import LogitsProcessor
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from methods.language_models.randperm_prefix import randperm_prefixes

Seeding = Literal["three_bricks", "lefthash"]

THREE_BRICKS_SALT = 35317
TRANSFORMERS_HASH_KEY = 15485863
_MODULUS = 2**64 - 1
DETECTION_CHUNK = 256  # positions whose green lists are drawn at once in detection


def context_seed(context: Sequence[int], key: int, seeding: Seeding = "three_bricks") -> int:
    """Seed of the position-wise generator from the context tokens and the key (see module docstring)."""
    if seeding == "three_bricks":
        seed = key
        for token in context:
            seed = (seed * THREE_BRICKS_SALT + int(token)) % _MODULUS
        return seed
    if seeding == "lefthash":
        return (key * int(context[-1])) % _MODULUS
    raise ValueError(f"unknown seeding {seeding!r}; expected 'three_bricks' or 'lefthash'")


class _ContextKeyedWatermark(LogitsProcessor):
    """Shared seeding: the generator's seed at every position from (key, last w tokens).

    `vocab_size` must be the width of the model's logits (the reference draws over it).
    """

    def __init__(self, vocab_size: int, key: int, context_width: int, seeding: Seeding):
        if context_width < 1:
            raise ValueError("context_width must be ≥ 1")
        if seeding not in get_args(Seeding):
            raise ValueError(f"unknown seeding {seeding!r}; expected one of {get_args(Seeding)}")
        self.vocab_size = vocab_size
        self.key = key
        self.context_width = context_width
        self.seeding = seeding

    def _seed(self, context: Sequence[int]) -> int:
        return context_seed(context[-self.context_width :], self.key, self.seeding)

    def _scored_positions(
        self, token_ids: Sequence[int], first_scored: int | None, ignore_repeated_ngrams: bool
    ) -> list[tuple[list[int], int]]:
        """(context, token) pairs for positions t ≥ first_scored (default w); optionally unique pairs only."""
        tokens = [int(t) for t in token_ids]
        start = self.context_width if first_scored is None else max(first_scored, self.context_width)
        pairs = [(tokens[t - self.context_width : t], tokens[t]) for t in range(start, len(tokens))]
        if ignore_repeated_ngrams:
            pairs = list({(tuple(c), x): (c, x) for c, x in pairs}.values())
        if not pairs:
            raise ValueError(f"no token to score in a sequence of {len(tokens)} tokens")
        return pairs


@dataclass(frozen=True)
class KGWDetection:
    num_scored: int
    num_green: int
    z_score: float
    p_value: float
    p_value_binomial: float


class KGWWatermark(_ContextKeyedWatermark):
    """KGW green-list watermark: adds δ to the logits of the green list G(context).

    Use as a logits processor in sampled generation: transformers applies it before temperature
    and top-p, the order of the reference `MarylandGenerator`. Given `bos_token_id`, detection
    ignores a leading BOS token, as transformers' `WatermarkDetector` does.
    """

    def __init__(
        self,
        vocab_size: int,
        gamma: float = 0.25,
        delta: float = 2.0,
        context_width: int = 4,
        key: int = 0,
        seeding: Seeding = "three_bricks",
        bos_token_id: int | None = None,
    ):
        super().__init__(vocab_size, key, context_width, seeding)
        if not 0.0 < gamma < 1.0:
            raise ValueError("gamma must lie in (0, 1)")
        self.gamma = gamma
        self.delta = delta
        self.greenlist_size = int(gamma * vocab_size)
        self.bos_token_id = bos_token_id

    def greenlist(self, context: Sequence[int]) -> torch.LongTensor:
        """G(context) = randperm(|V|)[:⌊γ|V|⌋] under the context-seeded generator."""
        return self.greenlists([context])[0]

    def greenlists(self, contexts: Sequence[Sequence[int]]) -> torch.LongTensor:
        """(N, ⌊γ|V|⌋): G of each context, drawing only the swaps of randperm that reach the prefix."""
        return randperm_prefixes([self._seed(context) for context in contexts], self.vocab_size, self.greenlist_size)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        green = self.greenlists(input_ids[:, -self.context_width :].tolist()).to(scores.device)
        return scores.scatter_add(1, green, torch.full(green.shape, self.delta, dtype=scores.dtype,
                                                           device=scores.device))

    def detect(
        self, token_ids: Sequence[int], first_scored: int | None = None, ignore_repeated_ngrams: bool = False
    ) -> KGWDetection:
        """Green-token z-test on tokens t ≥ first_scored (default w; three_bricks scores from w + 1).

        `ignore_repeated_ngrams` counts each distinct (context, token) pair once, as transformers'
        `WatermarkDetector(ignore_repeated_ngrams=True)` and three_bricks `scoring_method='v2'`.
        A leading `bos_token_id` is dropped: scoring starts at t ≥ w + 1, so no context holds it
        (`first_scored` still counts positions in `token_ids`, BOS included).
        """
        if self.bos_token_id is not None and len(token_ids) and int(token_ids[0]) == self.bos_token_id:
            first_scored = max(first_scored or 0, self.context_width + 1)
        pairs = self._scored_positions(token_ids, first_scored, ignore_repeated_ngrams)
        num_green = 0
        for start in range(0, len(pairs), DETECTION_CHUNK):  # bounded memory: DETECTION_CHUNK × ⌊γ|V|⌋ indices
            chunk = pairs[start : start + DETECTION_CHUNK]
            tokens = torch.tensor([token for _, token in chunk])
            num_green += int((self.greenlists([context for context, _ in chunk]) == tokens[:, None]).any(1).sum())
        total, gamma = len(pairs), self.gamma
        z = (num_green - gamma * total) / math.sqrt(total * gamma * (1 - gamma))
        return KGWDetection(
            num_scored=total,
            num_green=num_green,
            z_score=z,
            p_value=float(0.5 * special.erfc(z / math.sqrt(2))),
            p_value_binomial=float(special.betainc(num_green, total - num_green + 1, gamma)) if num_green else 1.0,
        )


@dataclass(frozen=True)
class GumbelDetection:
    num_scored: int
    score: float
    p_value: float
    z_score: float


class GumbelWatermark(_ContextKeyedWatermark):
    """Gumbel-max (Aaronson) watermark; its output keeps only the selected token (others −inf).

    Temperature and top-p are applied inside (transformers' warpers) because `generate` runs custom
    processors before its own warpers; decode greedily (`do_sample=False`). The randomized variant
    draws from its own generator (`sampling_seed`), not the keyed one, so repeated generations differ.
    """

    def __init__(
        self,
        vocab_size: int,
        context_width: int = 4,
        key: int = 0,
        seeding: Seeding = "three_bricks",
        temperature: float = 1.0,
        top_p: float = 1.0,
        randomized: bool = False,
        sampling_seed: int | None = None,
    ):
        super().__init__(vocab_size, key, context_width, seeding)
        self.warpers = ([TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []) + (
            [TopPLogitsWarper(top_p)] if top_p < 1.0 else [])  # identity warpers skipped (a top-p sort per step)
        self.randomized = randomized
        self._rng = torch.Generator()
        self._sampler = torch.Generator()
        if sampling_seed is None:
            self._sampler.seed()
        else:
            self._sampler.manual_seed(sampling_seed)

    def uniforms(self, context: Sequence[int]) -> torch.Tensor:
        """r(context) = rand(|V|) under the context-seeded generator."""
        return self.uniform_rows([context])[0]

    def uniform_rows(self, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
        """(N, |V|): r of each context, each drawn straight into its row."""
        rows = torch.empty(len(contexts), self.vocab_size)
        for row, context in zip(rows.unbind(), contexts):
            torch.rand(self.vocab_size, generator=self._rng.manual_seed(self._seed(context)), out=row)
        return rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        warped = scores.float()
        for warper in self.warpers:
            warped = warper(input_ids, warped)
        probs = warped.softmax(dim=-1).cpu()
        # log r_v^{1/p_v} = log(r_v)/p_v; tokens outside the nucleus (p_v = 0) get −inf.
        log_keys = self.uniform_rows(input_ids[:, -self.context_width :].tolist()).log_() / probs
        if self.randomized:  # x ~ Categorical(∝ r_v^{1/p_v}) by the exponential race argmax_v r_v^{1/p_v} / E_v
            exponential = torch.rand(log_keys.shape, generator=self._sampler).log_().neg_()  # E = −log U
            log_keys -= exponential.log_()
        tokens = log_keys.argmax(dim=-1, keepdim=True)
        return torch.full_like(scores, -math.inf).scatter_(1, tokens.to(scores.device), 0.0)

    def detect(
        self, token_ids: Sequence[int], first_scored: int | None = None, ignore_repeated_ngrams: bool = False
    ) -> GumbelDetection:
        """S = Σ −log(1 − r_{x_t}) over tokens t ≥ first_scored (default w), Gamma(T, 1) p-value."""
        pairs = self._scored_positions(token_ids, first_scored, ignore_repeated_ngrams)
        score = sum(-math.log1p(-self.uniforms(context)[token].item()) for context, token in pairs)
        total = len(pairs)
        return GumbelDetection(
            num_scored=total,
            score=score,
            p_value=float(special.gammaincc(total, score)),
            z_score=(score / total - 1.0) / (math.pi / math.sqrt(6) / math.sqrt(total)),
        )
