"""Shared language-model pieces: tokenizer, tiny LM, memorization metrics, KGW and Gumbel watermarks."""

import math

import pytest
import torch
from transformers import WatermarkDetector, WatermarkingConfig, WatermarkLogitsProcessor

from methods.language_models.memorization import (
    extraction_likelihood_from_continuations,
    extraction_likelihoods,
    greedy_continuations,
    memorization_accuracy,
    memorization_accuracy_from_predictions,
    ngram_overlap,
)
from methods.language_models.randperm_prefix import randperm_prefixes
from methods.language_models.tiny_lm import (
    build_tiny_lm,
    generate,
    pad_rows,
    strip_generated,
    token_blocks,
    train_epoch,
    train_step,
)
from methods.language_models.tokenizer import (
    load_tokenizer,
    save_tokenizer,
    stdlib_source_texts,
    train_bpe_tokenizer,
)
from methods.language_models.watermarks import (
    TRANSFORMERS_HASH_KEY,
    GumbelWatermark,
    KGWWatermark,
    context_seed,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(stdlib_source_texts("json"), vocab_size=512)


def _tiny(tokenizer, family="gpt2", seed=0):
    return build_tiny_lm(
        len(tokenizer),
        family,
        n_layer=2,
        d_model=64,
        n_head=4,
        max_positions=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        seed=seed,
    )


@pytest.fixture(scope="module")
def memorizing_model(tokenizer):
    """A tiny GPT-2 trained on one repeated 48-token block until it reproduces it."""
    model = _tiny(tokenizer)
    block = token_blocks(tokenizer(stdlib_source_texts("json")[0])["input_ids"], 48)[:1]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = [train_step(model, optimizer, block) for _ in range(120)]
    return model, block[0].tolist(), losses


# --- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_save_load(tokenizer, tmp_path):
    text = stdlib_source_texts("email", max_files=1)[0][:2000] + "\nnon-ASCII: héllo ✓ 😀\n"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    loaded = load_tokenizer(save_tokenizer(tokenizer, tmp_path / "tok"))
    assert loaded(text)["input_ids"] == ids
    assert (loaded.eos_token_id, loaded.pad_token_id, len(loaded)) == (
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
        len(tokenizer),
    )


# --- tiny LM -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tiny_lm_trains_and_cached_greedy_equals_uncached(tokenizer, family):
    model = _tiny(tokenizer, family)
    blocks = token_blocks(tokenizer(stdlib_source_texts("json")[0][:4000])["input_ids"], 32)[:8]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = [train_epoch(model, optimizer, blocks, batch_size=4, generator=torch.Generator().manual_seed(0))
              for _ in range(4)]
    assert losses[-1] < losses[0] - 0.5
    prompt = blocks[:2, :6]
    cached = generate(model, prompt, max_new_tokens=24, use_cache=True)
    uncached = generate(model, prompt, max_new_tokens=24, use_cache=False)
    assert cached.shape == (2, 24) and torch.equal(cached, uncached)


def test_sampled_generation_is_reproducible_per_seed(tokenizer):
    model = _tiny(tokenizer)
    prompt = torch.tensor([[10, 11, 12, 13]])
    first = generate(model, prompt, 16, do_sample=True, temperature=1.0, top_p=0.95, seed=1)
    assert torch.equal(first, generate(model, prompt, 16, do_sample=True, temperature=1.0, top_p=0.95, seed=1))
    assert not torch.equal(first, generate(model, prompt, 16, do_sample=True, temperature=1.0, top_p=0.95, seed=2))


# --- memorization metrics ----------------------------------------------------------------------


def test_memorization_accuracy_from_predictions():
    assert memorization_accuracy_from_predictions([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75


def test_ngram_overlap_counts_generated_ngrams_found_anywhere_in_reference():
    # reference 2-grams (1,2) (2,3) (3,4) (4,5); generated (1,2) (2,3) (3,1) (1,2) → 3 of 4 found.
    assert ngram_overlap([1, 2, 3, 1, 2, 9, 9], [1, 2, 3, 4, 5], 2) == 0.75


def test_extraction_likelihood_from_continuations():
    target = [1, 2, 3, 4]
    continuations = [[1, 2, 3, 4], [9, 3, 4], [3, 4], [7]]  # from starts 0, 1, 2, 3
    # starts 0..m−n = 0..2 with n = 2: overlaps 1, 1/2, 1 → mean 5/6; start 3 is not used.
    assert extraction_likelihood_from_continuations(continuations, target, 2) == pytest.approx(5 / 6)
    # a target shorter than n counts as an exact match of the continuation from start 0, or not.
    assert extraction_likelihood_from_continuations([[5, 6, 7]], [5, 6], 3) == 1.0
    assert extraction_likelihood_from_continuations([[5, 7, 6]], [5, 6], 3) == 0.0


def test_memorization_metrics_on_a_memorizing_model(memorizing_model):
    model, sequence, losses = memorizing_model
    assert losses[-1] < 0.1 * losses[0]
    assert memorization_accuracy(model, sequence) == 1.0
    prefix, secret = sequence[:30], sequence[30:42]
    assert memorization_accuracy(model, secret, prefix) == 1.0
    assert extraction_likelihoods(model, secret, prefix) == {3: 1.0, 5: 1.0, 10: 1.0}


def test_single_pass_ma_matches_per_prefix_greedy_definition(tokenizer):
    """MA from one causal forward pass equals the official per-prefix argmax / 1-token generate."""
    model = _tiny(tokenizer, seed=3)
    prefix, target = [40, 41, 42, 43], [50, 60, 70, 80, 90, 100]
    continuations = greedy_continuations(model, target, prefix)
    first_tokens = [c[0] for c in continuations]
    with torch.no_grad():
        per_prefix = [model(torch.tensor([prefix + target[:i]])).logits[0, -1].argmax().item()
                      for i in range(len(target))]
    assert first_tokens == per_prefix
    assert memorization_accuracy(model, target, prefix) == memorization_accuracy_from_predictions(per_prefix, target)
    assert [len(c) for c in continuations] == [6, 5, 4, 3, 2, 1]


# --- KGW ---------------------------------------------------------------------------------------

V = 512


def test_three_bricks_seed_formula():
    # s ← key; s ← (s·35317 + c) mod (2^64 − 1) over the context.
    assert context_seed([5, 7], key=0) == 5 * 35317 + 7
    assert context_seed([5, 7], key=3) == ((3 * 35317 + 5) * 35317 + 7) % (2**64 - 1)
    assert context_seed([9, 5, 7], key=3, seeding="lefthash") == 3 * 7


@pytest.mark.parametrize("n, k", [(2, 1), (10, 0), (300, 75), (2048, 512), (2048, 2047), (5000, 1300)])
def test_randperm_prefixes_equal_torch_randperm(n, k):
    # k > 624 runs over several MT19937 twists; seeds ≥ 2^32 use their low 32 bits, as torch does;
    # 70 rows fill two blocks of side-by-side generators and part of a third.
    seeds = [0, 1, 12345, 2**32 - 1, 2**32, 2**63 + 11, 2**64 - 1, 987654321987654321, *range(100, 162)]
    expected = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(s))[:k] for s in seeds])
    assert torch.equal(randperm_prefixes(seeds, n, k), expected)


def test_randperm_prefixes_reject_prefix_longer_than_shuffle():
    with pytest.raises(ValueError, match="prefix length"):
        randperm_prefixes([0], 10, 10)


def test_kgw_greenlist_reproducible_and_keyed():
    watermark = KGWWatermark(V, gamma=0.25, context_width=4, key=42)
    context = [3, 1, 4, 1, 5, 9]
    green = watermark.greenlist(context)
    expected = torch.randperm(V, generator=torch.Generator().manual_seed(context_seed([4, 1, 5, 9], 42)))[:128]
    assert torch.equal(green, expected)
    assert torch.equal(green, KGWWatermark(V, context_width=4, key=42).greenlist(context))
    assert not torch.equal(green, KGWWatermark(V, context_width=4, key=43).greenlist(context))
    scores = torch.zeros(1, V)
    biased = watermark(torch.tensor([context]), scores)
    assert biased.sum() == pytest.approx(2.0 * 128) and torch.all(biased[0, green] == 2.0)


def test_kgw_z_score_planted_vs_random():
    watermark = KGWWatermark(V, gamma=0.25, context_width=4, key=7)
    rng = torch.Generator().manual_seed(0)
    planted = torch.randint(V, (4,), generator=rng).tolist()
    for _ in range(100):
        green = watermark.greenlist(planted)
        planted.append(green[torch.randint(len(green), (1,), generator=rng)].item())
    detection = watermark.detect(planted)
    assert detection.num_scored == detection.num_green == 100
    assert detection.z_score == pytest.approx(math.sqrt(100 * 0.75 / 0.25))
    assert detection.p_value < 1e-10 and detection.p_value_binomial < 1e-10
    random_z = [watermark.detect(torch.randint(V, (104,), generator=rng).tolist()).z_score for _ in range(20)]
    assert all(abs(z) < 4 for z in random_z) and abs(sum(random_z) / 20) < 1.0


def _transformers_kgw_config():
    return WatermarkingConfig(greenlist_ratio=0.25, bias=2.0, hashing_key=TRANSFORMERS_HASH_KEY,
                              seeding_scheme="lefthash", context_width=1)


def test_kgw_lefthash_matches_transformers_processor_and_detector(tokenizer):
    ours = KGWWatermark(V, gamma=0.25, delta=2.0, context_width=1, key=TRANSFORMERS_HASH_KEY, seeding="lefthash",
                        bos_token_id=tokenizer.bos_token_id)
    theirs = WatermarkLogitsProcessor(V, "cpu", greenlist_ratio=0.25, bias=2.0, hashing_key=TRANSFORMERS_HASH_KEY,
                                      seeding_scheme="lefthash", context_width=1)
    input_ids = torch.randint(2, V, (6, 5), generator=torch.Generator().manual_seed(1))
    scores = torch.randn(6, V, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ours(input_ids, scores), theirs(input_ids, scores))

    model = _tiny(tokenizer, seed=5)
    prompt = torch.tensor([tokenizer("def load(fp):")["input_ids"]])
    watermarked = generate(model, prompt, 60, do_sample=True, logits_processors=[ours], seed=0)
    # greedy decoding: transformers' own watermarking path gives the same tokens as our processor.
    with torch.no_grad():
        builtin = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20,
                                 do_sample=False, watermarking_config=_transformers_kgw_config())
    assert torch.equal(builtin[:, prompt.shape[1]:], generate(model, prompt, 20, logits_processors=[ours]))

    plain = generate(model, prompt, 60, do_sample=True, seed=0)
    bos_led = torch.cat([torch.tensor([[model.config.bos_token_id]]), watermarked], 1)  # the detector drops its BOS
    for ignore_repeated in (False, True):
        detector = WatermarkDetector(model.config, "cpu", _transformers_kgw_config(),
                                     ignore_repeated_ngrams=ignore_repeated)
        for tokens in (watermarked, plain, bos_led):
            reference = detector(tokens, return_dict=True)
            mine = ours.detect(tokens[0].tolist(), ignore_repeated_ngrams=ignore_repeated)
            assert mine.num_scored == reference.num_tokens_scored[0]
            assert mine.num_green == reference.num_green_tokens[0]
            assert mine.z_score == pytest.approx(reference.z_score[0])
            assert mine.p_value == pytest.approx(reference.p_value[0])
    assert ours.detect(watermarked[0].tolist()).z_score > 4
    assert abs(ours.detect(plain[0].tolist()).z_score) < 4
    bos_unaware = KGWWatermark(V, gamma=0.25, context_width=1, key=TRANSFORMERS_HASH_KEY, seeding="lefthash")
    assert bos_unaware.detect(bos_led[0].tolist()).num_scored == ours.detect(bos_led[0].tolist()).num_scored + 1


# --- Gumbel ------------------------------------------------------------------------------------


def test_gumbel_argmax_is_deterministic_per_key_and_context():
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(0))
    contexts = torch.randint(V, (20, 4), generator=torch.Generator().manual_seed(1))

    def choose(watermark):
        return [watermark(context[None], logits).argmax().item() for context in contexts]

    first = choose(GumbelWatermark(V, key=11))
    assert first == choose(GumbelWatermark(V, key=11))
    assert sum(a != b for a, b in zip(first, choose(GumbelWatermark(V, key=12)))) >= 15
    # the choice is argmax_v r_v^{1/p_v} with r = rand(|V|) under the context seed
    r = torch.rand(V, generator=torch.Generator().manual_seed(context_seed(contexts[0].tolist(), 11)))
    assert first[0] == torch.pow(r, 1 / logits[0].softmax(-1)).argmax().item()
    only = GumbelWatermark(V, key=11)(contexts[:1], logits)
    assert torch.isfinite(only).sum() == 1


def test_randomized_gumbel_varies_across_draws_within_the_nucleus():
    logits = torch.full((1, V), -10.0)
    logits[0, [5, 6, 7]] = 5.0  # three equally likely tokens hold almost all the mass
    context = torch.tensor([[1, 2, 3, 4]])
    argmax = GumbelWatermark(V, key=3, top_p=0.95)
    randomized = GumbelWatermark(V, key=3, top_p=0.95, randomized=True, sampling_seed=0)
    argmax_draws = {argmax(context, logits).argmax().item() for _ in range(30)}
    randomized_draws = {randomized(context, logits).argmax().item() for _ in range(30)}
    assert len(argmax_draws) == 1
    assert len(randomized_draws) >= 2 and randomized_draws <= {5, 6, 7}


def test_randomized_gumbel_draws_from_the_keyed_distribution():
    """x ~ Categorical(r_v^{1/p_v} / Σ_u r_u^{1/p_u}) for the fixed keyed r of one context."""
    vocab, draws = 4, 20000
    logits = torch.tensor([[0.3, 0.0, -0.2, 0.1]])
    context = torch.tensor([[1, 2, 3, 4]])
    randomized = GumbelWatermark(vocab, key=4, randomized=True, sampling_seed=0)
    r = randomized.uniforms([1, 2, 3, 4])
    expected = torch.pow(r, 1 / logits[0].softmax(-1))
    expected /= expected.sum()  # here ≈ (0.32, 0.07, 0.51, 0.10)
    counts = torch.bincount(randomized(context.expand(draws, 4), logits.expand(draws, vocab)).argmax(1),
                            minlength=vocab)
    assert (counts / draws - expected).abs().max() < 0.015  # 3 binomial standard deviations at most


@pytest.mark.parametrize("randomized", [False, True])
def test_gumbel_generation_is_detected(tokenizer, randomized):
    model = _tiny(tokenizer, seed=7)
    watermark = GumbelWatermark(len(tokenizer), key=5, randomized=randomized, sampling_seed=1)
    prompt = torch.tensor([tokenizer("import json\n")["input_ids"]])
    tokens = torch.cat([prompt, generate(model, prompt, 48, logits_processors=[watermark])], dim=1)[0].tolist()
    detection = watermark.detect(tokens)
    assert detection.p_value < 1e-4 and detection.z_score > 4
    unwatermarked = torch.randint(len(tokenizer), (len(tokens),), generator=torch.Generator().manual_seed(0))
    assert watermark.detect(unwatermarked.tolist()).p_value > 1e-3


def test_pad_rows_right_and_left_with_masks_and_strip_generated():
    ids, mask = pad_rows([[5, 6, 7], [8]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_rows([[5, 6, 7], [8]], pad=0, left=True)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert strip_generated([4, 9, 2, 3, 2], eos=2, pad=9) == [4]
    assert strip_generated([9, 4, 9], eos=2, pad=9) == [4]
