"""Seconds per federated round, FedAgain vs FedAvg in the same run, and clients per second.

    python benchmarks/federated_round.py [--clients 10 50] [--rounds 5] [--repeats 1]
                                         [--local-epochs 1] [--address ADDR]

Attaches to a Ray cluster (``--address`` / RAY_ADDRESS) or starts local Ray once, then for each
client count runs FedAvg and FedAgain simulations alternately (``--repeats`` pairs) with every
client training every round (fraction_fit 1, no federated evaluation, 30% corrupted clients). A
round's seconds are the server's wall clock from sending the round's messages to holding the
aggregate; seconds per round is the median over rounds 2.. of all repeats (round 1 also starts the
client actors). Prints seconds per round of both, the ratio FedAgain / FedAvg (goal <= 1.2x) and
clients per second (client updates per round / seconds per round).
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from federated.simulation import FedSettings, simulate
from pipelines.ray_session import ensure_ray


def seconds_per_round(settings: FedSettings) -> list[float]:
    result = simulate(settings)
    return [m["seconds"] for r, m in sorted(result.server_metrics.items()) if r >= 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--address", help="Ray cluster (default: RAY_ADDRESS, else local Ray)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    ensure_ray(args.address)

    rows = []
    for clients in args.clients:
        times: dict[str, list[float]] = {"fedavg": [], "fedagain": []}
        for repeat in range(args.repeats):
            for strategy in times:
                settings = FedSettings(strategy=strategy, clients=clients, rounds=args.rounds,
                                       fraction_fit=1.0, fraction_evaluate=0.0, corrupted_ratio=0.3,
                                       local_epochs=args.local_epochs, seed=repeat, round_timeout=600)
                times[strategy] += seconds_per_round(settings)
        avg, again = (float(np.median(times[s])) for s in ("fedavg", "fedagain"))
        rows.append({"clients": clients, "fedavg_s_per_round": avg, "fedagain_s_per_round": again,
                     "ratio": again / avg, "fedavg_clients_per_s": clients / avg,
                     "fedagain_clients_per_s": clients / again, "rounds_timed": len(times["fedagain"])})

    print(f"{'clients':>7}  {'FedAvg s/round':>14}  {'FedAgain s/round':>16}  {'ratio':>6}  "
          f"{'FedAvg clients/s':>16}  {'FedAgain clients/s':>18}")
    for r in rows:
        verdict = "ok" if r["ratio"] <= 1.2 else "over the 1.2x goal"
        print(f"{r['clients']:>7}  {r['fedavg_s_per_round']:>14.3f}  {r['fedagain_s_per_round']:>16.3f}  "
              f"{r['ratio']:>5.2f}x  {r['fedavg_clients_per_s']:>16.1f}  {r['fedagain_clients_per_s']:>18.1f}"
              f"  ({verdict})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
