"""Robust weight signatures: signature arithmetic, quantisation, layer analysis, and the CLI end to end."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from methods.adversarial import signatures as rws
from methods.adversarial.rws import RWSConfig, claims, tables
from methods.classifiers import build_classifier
from pipelines.cli import main
from pipelines.pipeline import Outputs

torch.set_num_threads(1)


def weights(arch: str = "mlp", seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = build_classifier(arch, (1, 8, 8), 10, hidden=(32, 16))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_layers_group_weight_and_bias_from_the_input_side():
    assert rws.first_layers(weights("mlp"), 1) == ["1.weight", "1.bias"]
    assert rws.first_layers(weights("mlp"), 2) == ["1.weight", "1.bias", "3.weight", "3.bias"]
    assert rws.first_layers(weights("cnn"), 1) == ["0.weight", "0.bias"]


@pytest.mark.parametrize("alpha", [1.0, 0.7, 1.5])
def test_patch_then_unpatch_restores_weights_exactly(alpha):
    theta = weights()
    gen = torch.Generator().manual_seed(1)
    sig = {k: 0.01 * torch.randn(theta[k].shape, generator=gen) for k in rws.first_layers(theta, 2)}
    patched = rws.patch(theta, sig, alpha)
    assert not torch.equal(patched["1.weight"].float(), theta["1.weight"])
    assert torch.equal(patched["5.weight"].float(), theta["5.weight"])  # unpatched layer untouched
    restored = rws.unpatch(patched, sig, alpha)
    for k in theta:
        assert torch.equal(restored[k].float(), theta[k]), k


def test_signature_removes_the_clean_update_direction():
    pre, std = weights(seed=0), weights(seed=1)
    gen = torch.Generator().manual_seed(2)
    keys = rws.first_layers(pre, 1)
    a = {k: std[k] - pre[k] for k in keys}
    v = {k: torch.randn(pre[k].shape, generator=gen) for k in keys}
    flat_a = torch.cat([a[k].flatten() for k in keys])
    # make v orthogonal to a per tensor, then robust = pre + 2·a + v  ->  RWS = v
    for k in keys:
        v[k] = v[k] - a[k] * (a[k] * v[k]).sum() / (a[k] * a[k]).sum()
    robust = {k: pre[k] + 2 * a[k] + v[k] if k in keys else pre[k] for k in pre}
    sig = rws.signature(pre, std, robust, keys)
    for k in keys:
        assert torch.allclose(sig[k], v[k], atol=1e-5)
    assert abs(float(torch.cat([sig[k].flatten() for k in keys]) @ flat_a)) < 1e-3


def test_int8_quantisation_error_and_storage():
    gen = torch.Generator().manual_seed(0)
    sig = {"w": torch.randn(64, 64, generator=gen), "b": torch.randn(64, generator=gen)}
    q = rws.quantize(sig)
    assert q["w"]["q"].dtype == torch.uint8
    back = rws.dequantize(q)
    for k in sig:
        assert (back[k] - sig[k]).abs().max() <= q[k]["step"] / 2 + 1e-6
    assert rws.quantized_nbytes(q) == 64 * 64 + 64 + 2 * 8
    assert rws.nbytes(sig) / rws.quantized_nbytes(q) == pytest.approx(4, rel=0.01)


def test_layer_changes_and_cosine_on_a_planted_difference():
    pre, std = weights(seed=0), weights(seed=1)
    robust = {k: v + 0.1 if k.startswith("1.") else v.clone() for k, v in std.items()}
    rows = rws.layer_changes(pre, std, robust)
    assert [r["layer"] for r in rows] == ["1", "3", "5"]
    assert rows[0]["ratio"] > 0 and rows[1]["ratio"] == rows[2]["ratio"] == 0
    sig = {"1.weight": torch.ones(3)}
    assert rws.cosine(sig, {"1.weight": torch.ones(3)}) == pytest.approx(1)
    assert rws.cosine(sig, {"1.weight": torch.tensor([1.0, -1.0, 0.0])}) == pytest.approx(0, abs=1e-12)


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_run_end_to_end_through_the_cli(ray_session, tmp_path):
    out = tmp_path / "run"
    code = main(["run", "rws", "--set", "hidden=[32]", "pretrain_epochs=2", "finetune_epochs=2", "alphas=[1.0]",
                 "--out", str(out)])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["removal_max_abs_error"] == 0
    assert metrics["storage"]["full_over_int8"] > 1
    assert len(metrics["layer_ratio"]["gaussian_noise"]) == 2
    acc = pq.read_table(out / "results.parquet").to_pydict()
    assert {"clean", "robust", "patch", "patch_int8", "compose"} == set(acc["arm"])
    assert (out / "rws.png").stat().st_size > 0


def test_claims_pair_by_corruption_and_seed():
    cfg = RWSConfig(seeds=2, alphas=[1.0])
    cs, composed = cfg.corruptions, "+".join(cfg.corruptions)
    acc = {"clean": 0.95, **dict.fromkeys(cs, 0.6)}  # θ_std per test set

    def rows(arm, signature, alpha, gain):
        return [{"arm": arm, "signature": signature, "alpha": alpha, "test_set": t,
                 "acc": acc[t] + (gain if t == signature or arm == "compose" and t != "clean" else 0.0)} for t in acc]
    results = [*rows("clean", "", 0.0, 0.0), *rows("compose", composed, 0.5, 0.05)]
    for arm, alpha, gain in (("robust", 0.0, 0.2), ("patch", 1.0, 0.15), ("patch_int8", 1.0, 0.15)):
        results += [r for c in cs for r in rows(arm, c, alpha, gain)]
    layers = [[{"layer": str(d), "ratio": 2.0 - 0.5 * d, "relative": 0.1} for d in range(3)]]
    bytes_ = {"full_weights": 4000, "rws_float32": 1600, "rws_int8": 400}
    summary = {"per_seed": {str(s): {"rows": results, "layers": dict.fromkeys(cs, layers[0]), "bytes": bytes_}
                            for s in (0, 1)}, "test_items": 500}
    acc_table, lay_table = tables(summary)
    found = claims(cfg, summary, Outputs(tables={"results": acc_table, "layers": lay_table}))
    assert found[0].pairs == [[c, s] for c in cs for s in (0, 1)] and found[0].difference == pytest.approx(0.25)
    assert found[2].verdict == "reproduced" and found[2].difference == pytest.approx(0.75)  # 2.0 vs mean(1.5, 1.0)
    assert found[3].pairs == [0, 1] and found[3].difference == pytest.approx(0.05)  # composition, per seed
    assert found[4].difference == 0 and "binomial over 500 test items" in found[4].test
    assert found[5].difference == pytest.approx(9.0) and found[5].verdict == "reproduced"  # 4000 B / 400 B vs 1
