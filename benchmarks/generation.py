"""Throughput of watermarked vs plain generation on one tiny LM, and of watermark detection.

    python benchmarks/generation.py [--vocab V] [--batch B] [--new-tokens N] [--top-p P] [--repeats R] [--clock cpu|wall]

Generates ``--new-tokens`` tokens for ``--batch`` prompts with the KV cache (transformers
``generate``), every scheme with the same nucleus ``--top-p``: plain sampling, KGW and Gumbel argmax
and randomized with watermark_ar's defaults (γ = 0.25, δ = 2, context 4), transformers' own KGW
processor (lefthash, context 1) for reference, and the RL watermark's learned split. Prints generated
tokens/s (best of ``--repeats`` interleaved rounds, by process CPU time unless ``--clock wall``), the
ratio watermarked / plain (goal ≥ 0.9) and the scheme's own cost per token, then scored tokens/s of
each detector.

The defaults are the rl_watermark pipeline's own generation, read from its config: its LM shape and
vocabulary, its rollout batch (prompts × group), prompt and continuation lengths, nucleus and learned
split (at present 2×128, vocabulary 1024, 32 rows of 16 + 40 tokens, top-p 0.9). A scheme's
cost per token does not depend on the LM, so the ratio falls as the LM shrinks and as plain sampling
gets cheaper: ``--vocab 2048 --new-tokens 64 --top-p 1.0`` is a stress setting. On a 2-core VM the
ratios move by about ±0.03 from one process to the next; compare runs, not single numbers.
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import WatermarkLogitsProcessor

from methods.language_models.learned_split import LearnedSplitWatermark, SplitEncoder
from methods.language_models.rl_watermark import RLWatermarkConfig
from methods.language_models.tiny_lm import build_tiny_lm, generate
from methods.language_models.watermark_ar import WatermarkARConfig
from methods.language_models.watermarks import TRANSFORMERS_HASH_KEY, GumbelWatermark, KGWWatermark


def best_times(runs: dict, repeats: int, clock) -> dict[str, float]:
    """Fastest of ``repeats`` rounds per run; the runs alternate within a round, in reversed order
    every other round, so that machine load and warm caches hit every variant alike."""
    best = dict.fromkeys(runs, float("inf"))
    names = list(runs)
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            start = clock()
            runs[name]()
            best[name] = min(best[name], clock() - start)
    return best


def main() -> None:
    rl, ar = RLWatermarkConfig(), WatermarkARConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=rl.vocab_size)
    parser.add_argument("--layers", type=int, default=rl.lm_layers)
    parser.add_argument("--dim", type=int, default=rl.lm_dim)
    parser.add_argument("--batch", type=int, default=rl.batch_prompts * rl.group)
    parser.add_argument("--prompt", type=int, default=rl.prompt_tokens)
    parser.add_argument("--new-tokens", type=int, default=rl.continuation_tokens)
    parser.add_argument("--top-p", type=float, default=rl.top_p, help="nucleus of every scheme (plain included)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="process CPU time (robust to other load on the machine) or wall time")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    model = build_tiny_lm(args.vocab, n_layer=args.layers, d_model=args.dim, n_head=rl.lm_heads,
                          max_positions=args.prompt + args.new_tokens, seed=0)
    prompts = torch.randint(0, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0))
    n = args.new_tokens
    kgw = KGWWatermark(args.vocab, ar.gamma, ar.delta, ar.context_width, key=1)
    reference = WatermarkLogitsProcessor(args.vocab, "cpu", greenlist_ratio=ar.gamma, bias=ar.delta,
                                         hashing_key=TRANSFORMERS_HASH_KEY, seeding_scheme="lefthash", context_width=1)
    top_p = args.top_p
    gumbel = GumbelWatermark(args.vocab, ar.context_width, key=1, top_p=top_p)
    randomized = GumbelWatermark(args.vocab, ar.context_width, key=1, top_p=top_p, randomized=True, sampling_seed=0)
    encoder = SplitEncoder(args.vocab, rl.embed_dim, rl.encoder_hidden)
    learned = LearnedSplitWatermark(encoder, args.prompt, rl.delta, rl.alpha, rl.measure_threshold)
    runs = {
        "plain (sampled)": lambda: generate(model, prompts, n, do_sample=True, top_p=top_p, seed=0),
        "KGW": lambda: generate(model, prompts, n, do_sample=True, top_p=top_p, logits_processors=[kgw], seed=0),
        "transformers KGW": lambda: generate(model, prompts, n, do_sample=True, top_p=top_p,
                                             logits_processors=[reference], seed=0),
        "Gumbel argmax": lambda: generate(model, prompts, n, logits_processors=[gumbel]),
        "Gumbel randomized": lambda: generate(model, prompts, n, logits_processors=[randomized]),
        "RL learned split": lambda: generate(model, prompts, n, do_sample=True, top_p=top_p, logits_processors=[learned],
                                             seed=0),
    }
    for fn in runs.values():  # warm-up
        fn()
    timings = best_times(runs, args.repeats, clock)
    plain = timings["plain (sampled)"]
    print(f"generation: {args.batch} prompts × {n} new tokens, vocab {args.vocab}, "
          f"{args.layers}×{args.dim} GPT-2, top-p {top_p}, {args.threads} thread(s), "
          f"best of {args.repeats} by {args.clock} time")
    print(f"{'scheme':<20} {'tokens/s':>10} {'ratio':>7} {'µs/token vs plain':>18}")
    for name, t in timings.items():
        goal = "" if name.startswith("plain") or plain / t >= 0.9 else "  (< 0.9 goal)"
        print(f"{name:<20} {args.batch * n / t:>10.0f} {plain / t:>7.2f} {(t - plain) / (args.batch * n) * 1e6:>+18.1f}"
              + goal)
    print("(µs/token: the scheme's own cost per generated token, whatever the LM's depth and width)")

    sequences = torch.cat([prompts, generate(model, prompts, n, do_sample=True, logits_processors=[kgw], seed=1)], 1)
    rows = sequences.tolist()
    detectors = {"KGW z-test": lambda: [kgw.detect(r, first_scored=args.prompt) for r in rows],
                 "Gumbel Gamma test": lambda: [gumbel.detect(r, first_scored=args.prompt) for r in rows]}
    print(f"\ndetection: {args.batch} sequences × {n} scored tokens")
    for name, t in best_times(detectors, args.repeats, clock).items():
        print(f"{name:<20} {args.batch * n / t:>10.0f} tokens/s")


if __name__ == "__main__":
    main()
