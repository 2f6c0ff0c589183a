"""CodeEraser: corpus masks, batched MA / EL, each unlearning loss on a toy batch, early stopping, CLI."""
import json
import random

import pytest
import torch
import torch.nn.functional as F

from methods.language_models.code_eraser import EarlyStopping, secret_items
from methods.language_models.corpus import SECRET_KINDS, Sample, encode, plant_secret
from methods.language_models.memorization import (batched_greedy_continuations, extraction_likelihoods,
                                                  greedy_continuations, memorization_accuracy, memorization_scores)
from methods.language_models.tiny_lm import build_tiny_lm, token_blocks, train_step
from methods.language_models.tokenizer import stdlib_source_texts, train_bpe_tokenizer
from methods.language_models.unlearning_losses import forget_loss, kl_to_reference, retain_loss, token_losses

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe_tokenizer(stdlib_source_texts("json"), vocab_size=400)


# --- corpus --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(SECRET_KINDS))
def test_planted_secret_mask_covers_exactly_the_secret(tokenizer, kind):
    snippet = stdlib_source_texts("json")[0].splitlines(keepends=True)[20:32]
    sample = plant_secret("".join(snippet), kind, random.Random(3))
    secret = sample.text[sample.span[0] : sample.span[1]]
    rows = encode(tokenizer, [sample, Sample("x = 1\n")], block=256)
    (prefix, tokens), = secret_items({k: v[:1] for k, v in rows.items()})
    before, through = tokenizer.decode(prefix), tokenizer.decode(prefix + tokens)
    assert sample.text.startswith(through) and secret in through[len(before) :]
    assert len(through) - len(before) <= len(secret) + 2  # at most a quote merged into an edge token
    assert not rows["secret_mask"][1].any() and rows["attention_mask"][1].sum() < 256


# --- batched memorization metrics ------------------------------------------------------------------


@pytest.fixture(scope="module")
def memorizer(tokenizer):
    model = build_tiny_lm(len(tokenizer), n_layer=1, d_model=64, n_head=4, max_positions=128,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    blocks = token_blocks(tokenizer(stdlib_source_texts("json")[1])["input_ids"], 40)[:2]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        train_step(model, optimizer, blocks)
    return model.eval(), blocks


def test_memorization_scores_match_the_per_item_definitions(memorizer):
    model, blocks = memorizer
    a, b = blocks[0].tolist(), blocks[1].tolist()
    items = [(a[:10], a[10:25]), (b[:3], b[3:9]), (None, a[:12]), (b[:30], b[30:32])]
    ma, el = memorization_scores(model, items)
    for k, (prefix, target) in enumerate(items):
        assert ma[k] == pytest.approx(memorization_accuracy(model, target, prefix))
        reference = extraction_likelihoods(model, target, prefix)
        assert {n: el[n][k] for n in (3, 5, 10)} == pytest.approx(reference)


def test_batched_greedy_continuations_equal_one_generate_per_prompt(memorizer):
    model, blocks = memorizer
    target = blocks[0, 8:20].tolist()
    prefix = blocks[0, :8].tolist()
    expected = greedy_continuations(model, target, prefix)
    got = batched_greedy_continuations(model, [prefix + target[:i] for i in range(len(target))],
                                       [len(target) - i for i in range(len(target))])
    assert got == expected


# --- unlearning losses ---------------------------------------------------------------------------

V = 11


@pytest.fixture()
def toy():
    """Two rows of 6 tokens; row 1 is padded after 4; secret tokens at positions 2–3 (row 0) and 1 (row 1)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (2, 6), generator=gen)
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    secret = torch.zeros(2, 6, dtype=torch.bool)
    secret[0, 2:4] = True
    secret[1, 1] = True
    logits = torch.randn(2, 6, V, generator=gen, requires_grad=True)
    ref = torch.randn(2, 6, V, generator=gen)
    return {"input_ids": ids, "attention_mask": attention, "secret_mask": secret}, logits, ref


def _target_grad(logits, batch, loss):
    """∂L/∂logit of the true next token, at each shifted position (B, T−1)."""
    (grad,) = torch.autograd.grad(loss, logits)
    return grad[:, :-1].gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)


def test_ga_is_the_negated_hf_loss(toy):
    batch, logits, _ = toy
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    hf = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert forget_loss("ga", logits, None, batch).item() == pytest.approx(-hf.item(), rel=1e-6)


def test_selective_loss_ascends_on_secrets_descends_on_context_ignores_padding(toy):
    batch, logits, _ = toy
    grad = _target_grad(logits, batch, forget_loss("ssga", logits, None, batch, gamma=0.1))
    secret = batch["secret_mask"][:, 1:]
    valid = batch["attention_mask"][:, 1:].bool()
    assert (grad[secret] > 0).all()  # minimising L lowers the true-token logit: ascent on ℓ
    assert (grad[~secret & valid] < 0).all()  # descent on the context
    assert (grad[~valid] == 0).all()
    losses, _ = token_losses(logits, batch["input_ids"], batch["attention_mask"])
    expected = -losses[secret & valid].mean() + 0.1 * losses[~secret & valid].mean()
    assert forget_loss("ssga", logits, None, batch, gamma=0.1).item() == pytest.approx(expected.item())


def test_kl_matches_official_batchmean_and_vanishes_at_the_reference(toy):
    batch, logits, ref = toy
    full = torch.ones(2, 5, dtype=torch.bool)
    official = F.kl_div((logits[:, :-1].softmax(-1) + 1e-10).log(), ref[:, :-1].softmax(-1) + 1e-10,
                        reduction="batchmean")
    assert (kl_to_reference(logits, ref, full) / 2).item() == pytest.approx(official.item(), rel=1e-5)
    assert kl_to_reference(ref, ref, full).abs() < 1e-5
    assert kl_to_reference(logits, ref, full) > 0


def test_code_eraser_kl_acts_on_secret_positions_only(toy):
    batch, logits, ref = toy
    kl_part = forget_loss("code_eraser", logits, ref, batch, lam=0.1) - forget_loss("ssga", logits, None, batch)
    (grad,) = torch.autograd.grad(kl_part, logits)
    secret = batch["secret_mask"][:, 1:] & batch["attention_mask"][:, 1:].bool()
    assert (grad[:, :-1][~secret] == 0).all() and grad[:, :-1][secret].abs().sum() > 0
    expected = -0.1 * kl_to_reference(logits, ref, secret) / secret.sum()
    assert kl_part.item() == pytest.approx(expected.item(), rel=1e-5)
    assert kl_part < 0  # the KL on secret tokens is pushed up


def test_cu_and_retain_losses(toy):
    batch, logits, ref = toy
    valid = batch["attention_mask"][:, 1:].bool()
    kl = kl_to_reference(logits, ref, valid) / 2
    assert forget_loss("cu", logits, ref, batch, lam=0.1).item() == pytest.approx(
        (forget_loss("ga", logits, None, batch) - 0.1 * kl).item(), rel=1e-5)
    assert retain_loss(logits, ref, batch, lam=0.1, alpha=2.0).item() == pytest.approx(0.2 * kl.item(), rel=1e-5)
    (grad,) = torch.autograd.grad(retain_loss(logits, ref, batch), logits)
    assert (grad[1, 3:] == 0).all()  # positions predicting padding carry no KL
    assert retain_loss(ref.clone().requires_grad_(), ref, batch).abs() < 1e-5


# --- early stopping ------------------------------------------------------------------------------


def test_early_stopping_follows_the_official_rule():
    stopper = EarlyStopping(tau_ma=0.4, tau_el10=0.05, margin=0.3, patience=2)
    # epoch 1: MA 0.9 (no EL yet); 2: MA 0.6 ≤ τ+margin → EL10 tracked from epoch 3
    assert stopper.update(1, 0.9, None) == (False, True)
    assert stopper.update(2, 0.6, None) == (False, True) and stopper.state["el_flag"]
    assert stopper.update(3, 0.5, 0.2) == (False, True)
    assert stopper.update(4, 0.3, 0.1) == (False, True)  # MA < τ but EL10 ≥ τ_EL10
    assert stopper.update(5, 0.3, 0.2) == (False, False)  # no EL improvement: counter 1
    assert stopper.update(6, 0.2, 0.3) == (True, False)  # counter 2 = patience
    assert stopper.state["best_epoch"] == 4
    assert EarlyStopping(0.4, 0.05, 0.3, 5, {"el_flag": True, "best_ma": 1.0, "best_el": 1.0, "counter": 0,
                                             "best_epoch": 0}).update(1, 0.1, 0.01) == (True, True)


# --- CLI -----------------------------------------------------------------------------------------

TINY = ["n_secret=4", "forget_size=2", "n_retain=2", "n_background=4", "n_heldout=2", "block=128", "snippet_lines=6",
        "repeats=2",
        "lm_dim=32", "lm_layers=1", "pretrain_epochs=1", "max_epochs=2", "el_window=12", "vocab_size=300"]


@pytest.mark.integration
def test_cli_run_then_rerun_resumes_from_the_train_checkpoints(ray_session, tmp_path):
    """Cluster-mode Ray Train (1 worker); the rerun restores both stages from their checkpoints."""
    import shutil

    from pipelines.cli import main

    out = tmp_path / "ce"
    assert main(["run", "code_eraser", "--set", *TINY, "method=code_eraser", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["by_method"]) == {"original", "code_eraser"}
    assert 0 <= metrics["by_method"]["code_eraser"]["secret_ma"] <= 1
    assert (out / "results.parquet").exists() and (out / "forget_vs_utility.png").exists()
    cached, = (out / "cache").glob("code_lm-*")
    stamp = json.loads((cached / "meta.json").read_text())
    checkpoints = sorted(p.name for p in (out / "ray").glob("pretrain-*/checkpoint_*") if p.is_dir())
    shutil.rmtree(cached)  # the rerun must rebuild the cache from the pretraining checkpoint
    (out / "metrics.json").unlink()  # as if stopped before its end: a finished run is not re-entered
    assert main(["run", "code_eraser", "--set", *TINY, "method=code_eraser", "--out", str(out)]) == 0
    again = json.loads((out / "metrics.json").read_text())
    assert again["resumed"] and again["by_method"] == metrics["by_method"]
    assert json.loads((cached / "meta.json").read_text()) == stamp
    assert sorted(p.name for p in (out / "ray").glob("pretrain-*/checkpoint_*") if p.is_dir()) == checkpoints


@pytest.mark.integration
def test_cli_reproduce_quick_runs_all_methods(ray_session, tmp_path):
    from pipelines.cli import main

    out = tmp_path / "rep"
    assert main(["reproduce", "code_eraser", "--quick", "--set", *TINY, "seeds=1", "num_workers=0",
                 "--out", str(out)]) == 0
    claims = json.loads((out / "claim.json").read_text())
    assert len(claims["more"]) == 8 and all("reproduced" in c for c in [claims, *claims["more"]])
    assert all(c["verdict"] in ("reproduced", "inconclusive", "contradicted") for c in [claims, *claims["more"]])


def test_claims_pair_each_method_with_the_original_by_seed():
    import numpy as np

    from methods.language_models.code_eraser import CodeEraserConfig, Results, claims, plan

    cfg = CodeEraserConfig(seeds=3)
    runs = plan(cfg, ["ga", "cu", "ssga", "code_eraser"])
    assert [r.key for r in runs[:2]] == ["original/0", "unlearn/ga/0"] and len(runs) == 15
    harm = {None: 0.0, "ga": 0.3, "cu": 0.1, "ssga": 0.2, "code_eraser": 0.0}
    rows = [{"method": r.method or "original", "seed": r.seed, "retain_ma": 0.9 - harm[r.method] - 0.01 * r.seed,
             "heldout_ppl": 5.0 * np.exp(harm[r.method]), "context_acc": 0.8 - harm[r.method],
             "secret_ma": 0.9 if r.method is None else 0.01 * r.seed} for r in runs]
    table = {k: np.array([row[k] for row in rows]) for k in rows[0]}
    found = claims(cfg, Results(table, {"ma": 0.15}), None)
    assert len(found) == 9 and [c.margin for c in found[:5]] == [0.01, 0.01, 0.05, 0.05, 0.01]
    assert found[0].baseline_per_seed == pytest.approx([0.3] * 3) and found[0].method_per_seed == pytest.approx([0] * 3)
    assert found[2].baseline_per_seed == pytest.approx([0.3] * 3)  # |Δ log perplexity|
    assert all(c.verdict == "reproduced" for c in found[:5])
    tau = found[-1]
    assert tau.baseline == 0.15 and "one-sample" in tau.test and f"over {cfg.forget_size} test items" in tau.test
    assert tau.method_per_seed == pytest.approx([0.0, 0.01, 0.02]) and tau.verdict == "reproduced"
