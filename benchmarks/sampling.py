"""Throughput of the DDIM sampler and cost of AlignProp reward backprop on the digits UNet (random weights).

    python benchmarks/sampling.py [--channels 32 64] [--batch 16] [--steps 20] [--repeats 3]
                                  [--clock cpu|wall] [--threads 1]

Prints images/s of a DDIM chain without autograd and with the graph of the whole chain kept
(forward only, with and without gradient checkpointing), best of ``--repeats``; then the peak
resident-memory growth and CPU time of one AlignProp update (sample + backward) with K = 1, the
full chain checkpointed, and the full chain without checkpointing
(``methods.generative.alignprop.backprop_costs``: peak RSS mark reset before each, Linux only);
every number also as a ratio to the first row. Costs do not depend on the weights, so no
pretraining is needed.
"""
from __future__ import annotations

import argparse
import time

import torch

from methods.generative.alignprop import backprop_costs
from methods.generative.models import ClassConditionalUNet, add_lora
from methods.generative.samplers import cfg_predictor, sample_ddim
from methods.generative.schedules import make_ddim_scheduler, make_ddpm_scheduler


def throughput(args: argparse.Namespace) -> dict[str, float]:
    """images/s of one chain: no graph, graph kept with checkpointing, graph kept without."""
    torch.manual_seed(0)
    model = add_lora(ClassConditionalUNet(block_out_channels=tuple(args.channels)).requires_grad_(False))
    scheduler = make_ddim_scheduler(make_ddpm_scheduler(), args.steps)
    predict = cfg_predictor(model, torch.arange(args.batch) % 10)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    variants = {"no graph": (0, True), "graph kept, checkpointed": (args.steps, True),
                "graph kept, no checkpointing": (args.steps, False)}
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(args.repeats):  # interleaved, so load changes hit every variant alike
        for name, (grad_steps, checkpoint) in variants.items():
            start = clock()
            with torch.set_grad_enabled(grad_steps > 0):
                sample_ddim(predict, scheduler, (args.batch, 1, 8, 8), generator=torch.Generator().manual_seed(0),
                            grad_steps=grad_steps, checkpoint=checkpoint)
            best[name] = min(best[name], clock() - start)
    return {name: args.batch / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu: thread CPU time, robust on a shared machine (use with --threads 1)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"DDIM sampler, {args.steps} steps, batch {args.batch}, UNet {args.channels} + LoRA ({args.clock} clock)")
    rates = throughput(args)
    first = next(iter(rates.values()))
    for name, rate in rates.items():
        print(f"  {name:<32} {rate:10.1f} images/s   ratio {rate / first:5.2f}")

    print("AlignProp update (sample + reward backward): peak RSS growth and CPU time")
    costs = backprop_costs(args.channels, args.batch, args.steps, {
        "K = 1": (1, True), "full chain, checkpointed": (args.steps, True),
        "full chain, no checkpointing": (args.steps, False)})
    ref = next(iter(costs.values()))
    for name, c in costs.items():
        print(f"  {name:<32} {c['peak_mb']:8.1f} MiB (ratio {c['peak_mb'] / ref['peak_mb']:5.2f})"
              f"   {c['cpu_seconds']:7.3f} s (ratio {c['cpu_seconds'] / ref['cpu_seconds']:5.2f})")


if __name__ == "__main__":
    main()
