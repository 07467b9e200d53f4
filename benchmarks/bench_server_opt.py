"""What a server optimiser costs the server: seconds per aggregation and bytes of state, at a model's shapes.

Usage: python benchmarks/bench_server_opt.py [--model roberta-base|minilm] [--clients 10] [--client-rank 8]
                                             [--rounds 3] [--methods svd naive] [--optimizers avg momentum adam]

No model is loaded: the adapters are random tensors of the model's LoRA shapes (query and value of every
layer, rank --client-rank, plus the classification head), so this measures the server's maths only. Each
(method, optimiser) runs --rounds rounds on the same client updates; the table gives the median seconds of
one aggregation and the bytes of server state after the last round (what state.safetensors holds);
`avg` (at --server-lr 1) is the method itself, unwrapped: the baseline.
"""

from __future__ import annotations

import argparse
import statistics
import time

import _shared  # noqa: F401  (puts the repository on sys.path)
import torch

from fedlora_cli.aggregation import ClientUpdate
from fedlora_cli.config import AggregationSpec, LoraSpec, ServerOptSpec
from fedlora_cli.strategies import build_strategy
from fedlora_cli.strategies.base import GlobalAdapter, state_bytes
from fedlora_cli.strategies.server_opt import with_server_optimizer

SHAPES = {  # hidden size, layers, head tensors
    "roberta-base": (768, 12, {"classifier.dense.weight": (768, 768), "classifier.dense.bias": (768,),
                               "classifier.out_proj.weight": (2, 768), "classifier.out_proj.bias": (2,)}),
    "minilm": (384, 6, {"classifier.weight": (2, 384), "classifier.bias": (2,)}),
}  # fmt: skip


def adapter(model: str, r: int, g: torch.Generator, zero_b: bool = False) -> dict[str, torch.Tensor]:
    d, layers, head = SHAPES[model]
    state = {}
    for layer in range(layers):
        for proj in ("query", "value"):
            prefix = f"base_model.model.encoder.layer.{layer}.attention.self.{proj}"
            state[f"{prefix}.lora_A.weight"] = torch.randn(r, d, generator=g) / d**0.5
            b = torch.zeros(d, r) if zero_b else 0.01 * torch.randn(d, r, generator=g)
            state[f"{prefix}.lora_B.weight"] = b
    for key, shape in head.items():
        state[key] = 0.02 * torch.randn(*shape, generator=g)
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(SHAPES), default="roberta-base")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--client-rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["svd", "naive"])
    parser.add_argument("--optimizers", nargs="+", default=["avg", "momentum", "adam"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    r, ids = args.client_rank, list(range(1, args.clients + 1))
    lora = LoraSpec(r, 2.0 * r)
    g = torch.Generator().manual_seed(0)
    start = adapter(args.model, r, g, zero_b=True)
    rounds = [[ClientUpdate(adapter(args.model, r, g), lora.scaling, 1000 + 10 * c) for c in ids]
              for _ in range(args.rounds)]  # fmt: skip
    print(f"{args.model}: {args.clients} clients, rank {r}, {args.rounds} rounds, 1 thread")
    print(f"{'method':8} {'optimizer':10} {'s / round':>10} {'state MB':>9}")
    for method in args.methods:
        for name in args.optimizers:
            spec = ServerOptSpec(
                name, lr=0.5 if name == "momentum" else None
            )  # avg at η = 1: the method itself
            strategy = with_server_optimizer(
                build_strategy(AggregationSpec(method), lora, seed=0, client_ids=ids), spec
            )
            current, seconds = GlobalAdapter(dict(start), lora), []
            for rnd, updates in enumerate(rounds, start=1):
                t = time.perf_counter()
                current = strategy.aggregate(rnd, current, updates, sampled=len(updates)).adapter
                seconds.append(time.perf_counter() - t)
            mb = state_bytes(strategy.state_dict()) / 1e6
            print(f"{method:8} {name:10} {statistics.median(seconds):10.2f} {mb:9.1f}")


if __name__ == "__main__":
    main()
