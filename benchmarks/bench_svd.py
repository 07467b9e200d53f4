"""Times the factored SVD aggregation against the dense one (form d x d, full SVD, truncate).

Usage: python benchmarks/bench_svd.py [--sizes 768 4096] [--clients 5] [--client-rank 8] [--rank 8]

Both paths start from the same float32 client factors (one LoRA module, d_out = d_in = d), do their
maths in float64 and return the factors; that is what is timed. The dense path is what the
factored one avoids; the table shows what that saves and, from the same factors in float64, that
both give the same product s·B·A and the same relative error.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

# Run as a script from a checkout: make the package importable without installing it.
import _shared  # noqa: E402, F401  (puts the repository on sys.path)
import torch

from fedlora_cli.aggregation import ClientUpdate, aggregate_svd, normalise_weights  # noqa: E402

Factors = tuple[torch.Tensor, torch.Tensor, float]  # B, A, reported relative error
MODULE = "base_model.model.roberta.encoder.layer.0.attention.self.query"
A_KEY, B_KEY = f"{MODULE}.lora_A.weight", f"{MODULE}.lora_B.weight"


def make_clients(d: int, n_clients: int, client_rank: int, seed: int) -> list[ClientUpdate]:
    """Random trained-looking adapters: A at PEFT's init scale, B small and non-zero."""
    g = torch.Generator().manual_seed(seed)
    clients = []
    for i in range(n_clients):
        state = {
            A_KEY: torch.randn(client_rank, d, generator=g) / d**0.5,
            B_KEY: 0.01 * torch.randn(d, client_rank, generator=g),
        }
        clients.append(ClientUpdate(state, scaling=16.0 / client_rank, weight=1000 + 250 * i))
    return clients


def dense_svd(clients: list[ClientUpdate], rank: int, alpha: float) -> Factors:
    """The approach the factored path replaces: form the d x d target, full SVD, keep R. Returns
    factors in the same convention as aggregate_svd (B = U_R Σ_R / s, A = V_R^T) and the error,
    left in float64: the cast back costs nothing next to the SVD, and the comparison wants float64."""
    weights = normalise_weights([c.weight for c in clients])
    target = sum(
        float(w) * c.scaling * (c.state[B_KEY].double() @ c.state[A_KEY].double())
        for w, c in zip(weights, clients, strict=True)
    )
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    error = float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())
    return (u[:, :rank] * s[:rank]) / (alpha / rank), vh[:rank], error


def factored_svd(clients: list[ClientUpdate], rank: int, alpha: float) -> Factors:
    res = aggregate_svd(clients, rank=rank, alpha=alpha)
    return res.state[B_KEY], res.state[A_KEY], res.error


def product(b: torch.Tensor, a: torch.Tensor, rank: int, alpha: float) -> torch.Tensor:
    """s·B·A in float64: the factors are unique only up to rotation, the product is what to compare."""
    return (alpha / rank) * b.double() @ a.double()


def median_seconds(fn: Callable[[], Factors], repeats: int, warm_up: bool = True) -> tuple[float, Factors]:
    """Median wall time of `fn()` over `repeats` calls, and the last call's result."""
    if warm_up:  # first calls pay for allocator and LAPACK workspace setup
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[768, 4096], help="d = d_out = d_in")
    parser.add_argument("--clients", type=int, default=5, help="K, number of clients")
    parser.add_argument("--client-rank", type=int, default=8, help="r of every client's adapter")
    parser.add_argument("--rank", type=int, default=8, help="R, rank of the aggregate (--svd-rank)")
    parser.add_argument("--alpha", type=float, default=16.0, help="lora_alpha of the aggregate")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (after one warm-up)")
    parser.add_argument(
        "--dense-repeats-large",
        type=int,
        default=1,
        help="timed repeats of the dense path for d >= 2048 (one full SVD there takes tens of seconds)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 keeps torch's default")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(
        f"K={args.clients} clients of rank {args.client_rank}, aggregate rank R={args.rank}, "
        f"one module, float32 inputs, float64 maths, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    header = (
        f"{'d':>6} {'factored ms':>12} {'dense ms':>10} {'dense/fact':>11} "
        f"{'max|Δ|/max|P|':>14} {'‖Δ‖/‖P‖':>9} {'error fact':>11} {'error dense':>12}"
    )
    print(header)
    print("-" * len(header))
    for d in args.sizes:
        clients = make_clients(d, args.clients, args.client_rank, args.seed)
        dense_repeats = args.dense_repeats_large if d >= 2048 else args.repeats
        # Timed: only what the server does, client factors in, result factors out (no d x d product).
        t_fact, _ = median_seconds(lambda c=clients: factored_svd(c, args.rank, args.alpha), args.repeats)
        # A warm-up is noise next to a full SVD that takes seconds: skip it where repeats are few.
        t_dense, (b_dense, a_dense, err_dense) = median_seconds(
            lambda c=clients: dense_svd(c, args.rank, args.alpha), dense_repeats, warm_up=d < 2048
        )
        # Compared in float64 (float64 copies of the same inputs, so the factored output is not cast
        # to float32): the columns show the algorithms' agreement, not two float32 roundings.
        clients64 = [
            ClientUpdate({k: v.double() for k, v in c.state.items()}, c.scaling, c.weight) for c in clients
        ]
        b_fact, a_fact, err_fact = factored_svd(clients64, args.rank, args.alpha)
        p_fact = product(b_fact, a_fact, args.rank, args.alpha)
        p_dense = product(b_dense, a_dense, args.rank, args.alpha)
        diff = p_fact - p_dense
        max_rel = float(diff.abs().max() / p_dense.abs().max())
        fro_rel = float(diff.norm() / p_dense.norm())
        print(
            f"{d:>6} {t_fact * 1e3:>12.2f} {t_dense * 1e3:>10.1f} {t_dense / t_fact:>10.1f}x "
            f"{max_rel:>14.1e} {fro_rel:>9.1e} {err_fact:>11.4f} {err_dense:>12.4f}"
        )
    print(
        f"(times: medians of {args.repeats} repeats, dense at d >= 2048: {args.dense_repeats_large}; "
        "Δ = s·B·A factored − dense, P = dense, both from float64 inputs)"
    )


if __name__ == "__main__":
    main()
