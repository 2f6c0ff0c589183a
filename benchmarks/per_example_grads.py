"""Per-example gradients: the torch.func engine vs a per-example backward loop vs Opacus.

Prints examples/s of each on a small CNN over digits at batch 256, side by side, as ratios
(goal: engine ≥ 20× the loop and ≥ 1.0× Opacus' GradSampleModule), and checks all three agree.

    python benchmarks/per_example_grads.py [--batch 256] [--repeats 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from methods.classifiers import build_classifier
from methods.engines.memory import retain_freed_memory
from methods.engines.per_example_grads import flatten, per_example_grads


def engine(model, x, y):
    return flatten(per_example_grads(model, F.cross_entropy, x, y))


def loop(model, x, y):
    rows = []
    for xi, yi in zip(x, y):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xi[None]), yi[None]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(rows)


def batched_backward(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def make_opacus(model):
    from opacus import GradSampleModule

    wrapped = GradSampleModule(model, loss_reduction="sum")

    def run(_, x, y):
        wrapped.zero_grad(set_to_none=True)
        F.cross_entropy(wrapped(x), y, reduction="sum").backward()
        return torch.cat([p.grad_sample.flatten(1) for p in wrapped.parameters()], dim=1)

    return run


def throughput(fn, model, x, y, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn(model, x, y)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(model, x, y)
        best = min(best, time.perf_counter() - start)
    return len(x) / best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    tuned = retain_freed_memory()  # the engine does this itself; done first so every row shares it

    digits = load_digits()
    x = torch.tensor(digits.images[: args.batch, None] / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target[: args.batch])
    torch.manual_seed(0)
    model = build_classifier("cnn", (1, 8, 8), 10).eval()
    opacus_model = build_classifier("cnn", (1, 8, 8), 10).train()  # Opacus hooks record in train mode only
    opacus_model.load_state_dict(model.state_dict())  # (the CNN has no dropout or batch norm)

    rates = {}
    rates["engine (torch.func)"], ref = throughput(engine, model, x, y, args.repeats)
    rates["per-example loop"], loop_out = throughput(loop, model, x, y, max(1, args.repeats // 3))
    rates["opacus GradSampleModule"], opacus_out = throughput(make_opacus(opacus_model), None, x, y, args.repeats)
    rates["floor: batched backward"], _ = throughput(batched_backward, model, x, y, args.repeats)

    print(f"small CNN on digits, batch {args.batch}, {args.threads} thread(s), best of {args.repeats}, "
          f"glibc keeps freed memory: {tuned}")
    print(f"{'method':<26}{'examples/s':>12}{'engine ÷ this':>15}")
    for name, rate in rates.items():
        print(f"{name:<26}{rate:>12.0f}{rates['engine (torch.func)'] / rate:>14.2f}x")
    print(f"max |engine − loop|   = {(ref - loop_out).abs().max():.2e}")
    print(f"max |engine − opacus| = {(ref - opacus_out).abs().max():.2e}")
    print("goals: engine ≥ 20× loop, ≥ 1.0× opacus; "
          f"no per-example method can exceed {rates['floor: batched backward'] / rates['per-example loop']:.1f}× loop here")


if __name__ == "__main__":
    main()
