"""Throughput of methods.engines.attacks vs torchattacks 3.5.1 on one digits classifier and batch.

    python benchmarks/attacks.py [--arch cnn|mlp] [--batch 256] [--repeats 10] [--cw-steps 50]
                                 [--clock cpu|wall] [--threads 1]

Prints images/s of FGSM, PGD-10 (L∞) and CW-L2 for both libraries and the ratio ours/theirs (best
of ``--repeats`` interleaved timings, by process CPU time unless ``--clock wall``), the accuracy
under each attack, then how closely the outputs agree. torchattacks' CW has no binary search on c,
so ours runs one round (binary_search_steps=1) with the same c, κ, lr and step count (torchattacks
3.5.1's early-stop test compares against a cost it never updates, so both take exactly
``--cw-steps`` Adam steps).
"""
from __future__ import annotations

import argparse
import time
from functools import partial

import torch
import torchattacks
from sklearn.datasets import load_digits

from methods.classifiers import accuracy, build_classifier, train_epoch
from methods.engines.attacks import CWConfig, FGSMConfig, PGDConfig, cw_l2, fgsm, pgd
from methods.engines.memory import retain_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=["cnn", "mlp"], default="cnn")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu: process CPU time, robust on a shared machine (use with --threads 1)")
    parser.add_argument("--eps", type=float, default=0.1)
    parser.add_argument("--cw-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tuned = retain_freed_memory()  # our engine does this itself; done first so both libraries share it

    x_all, y_all = load_digits(return_X_y=True)
    x_all = torch.tensor(x_all, dtype=torch.float32).view(-1, 1, 8, 8) / 16
    y_all = torch.tensor(y_all)
    gen = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(x_all), generator=gen)
    train, test = perm[:1400], perm[1400:]
    torch.manual_seed(args.seed)
    model = build_classifier(args.arch, (1, 8, 8), 10, hidden=(128,))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(8):
        train_epoch(model, opt, x_all[train], y_all[train], batch_size=64, generator=gen)
    model.eval()
    x, y = x_all[test][: args.batch], y_all[test][: args.batch]

    pgd_cfg = PGDConfig(eps=args.eps, alpha=args.eps / 4, steps=10)
    cw_cfg = CWConfig(c_init=1.0, kappa=0.0, lr=0.01, steps=args.cw_steps, binary_search_steps=1)
    cw_name = f"CW-L2 {args.cw_steps} steps"
    pairs = {
        "FGSM": (lambda: fgsm(model, x, y, FGSMConfig(eps=args.eps)), torchattacks.FGSM(model, eps=args.eps)),
        "PGD-10 Linf": (lambda: pgd(model, x, y, pgd_cfg, rng=args.seed),
                        torchattacks.PGD(model, eps=args.eps, alpha=pgd_cfg.alpha, steps=10)),
        cw_name: (lambda: cw_l2(model, x, y, cw_cfg).x_adv,
                  torchattacks.CW(model, c=1.0, kappa=0.0, steps=args.cw_steps, lr=0.01)),
    }

    print(f"{args.arch} on digits (clean accuracy {accuracy(model, x, y):.3f}), batch {len(x)}, "
          f"{args.threads} thread(s), best of {args.repeats} by {args.clock} time, "
          f"glibc keeps freed memory: {tuned}")
    print("CW: ours with binary_search_steps=1 (torchattacks.CW has no binary search); "
          "both c=1, kappa=0, lr=0.01, same steps")
    print(f"{'attack':<18}{'ours img/s':>12}{'torchattacks img/s':>20}{'ours/theirs':>13}"
          f"{'acc ours':>10}{'acc theirs':>12}")
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for name, (ours, theirs) in pairs.items():
        timed = _best_times([ours, partial(theirs, x, y)], args.repeats, clock)
        (t_ours, x_ours), (t_theirs, x_theirs) = timed
        model.zero_grad(set_to_none=True)  # torchattacks.CW back-propagates into the parameters
        print(f"{name:<18}{len(x) / t_ours:>12.0f}{len(x) / t_theirs:>20.0f}{t_theirs / t_ours:>12.2f}x"
              f"{accuracy(model, x_ours, y):>10.3f}{accuracy(model, x_theirs, y):>12.3f}")

    no_start = pgd_cfg.model_copy(update={"random_start": False})
    fgsm_diff = fgsm(model, x, y, FGSMConfig(eps=args.eps)) - torchattacks.FGSM(model, eps=args.eps)(x, y)
    their_pgd = torchattacks.PGD(model, eps=args.eps, alpha=pgd_cfg.alpha, steps=10, random_start=False)
    pgd_diff = pgd(model, x, y, no_start) - their_pgd(x, y)
    print(f"max |ours - torchattacks|: FGSM {fgsm_diff.abs().max().item():.3g}, "
          f"PGD-10 without random start {pgd_diff.abs().max().item():.3g}")


def _best_times(attacks, repeats: int, clock) -> list[tuple[float, torch.Tensor]]:
    """Per attack: fastest of ``repeats`` rounds and its output. The attacks alternate within a round,
    in reversed order every other round, so that neither always runs on the other's warm caches."""
    outs = [attack() for attack in attacks]  # warm-up
    best = [float("inf")] * len(attacks)
    for round_ in range(repeats):
        order = range(len(attacks)) if round_ % 2 == 0 else reversed(range(len(attacks)))
        for i in order:
            start = clock()
            attacks[i]()
            best[i] = min(best[i], clock() - start)
    return list(zip(best, outs))


if __name__ == "__main__":
    main()
