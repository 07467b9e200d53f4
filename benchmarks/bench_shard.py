"""Times every sharding mode on SST-2 with 100 clients, and measures label skew against the Dirichlet alpha.

Usage: python benchmarks/bench_shard.py [--data-dir ../shared/data/glue] [--clients 100] [--repeat 5]

Reads the real SST-2 training labels when the GLUE folder is there, else uses 67,349 synthetic labels
with SST-2's class balance. Times only `make_client_splits` (median of --repeat runs, seeds differ);
reading the TSV and writing manifests are reported once, through `run_shard`, for scale.

Skew table (dirichlet, 10 clients, mean over --repeat seeds): H = mean over clients of the entropy
of the client's label distribution divided by log(#labels) (1 = the global mix of a balanced task,
0 = one label per client); TV = mean over clients of the total-variation distance between the
client's label distribution and the global one (0 = iid).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

# Run as a script from a checkout: make the package importable without installing it.
from _shared import GLUE  # noqa: E402  (puts the repository on sys.path)

from fedlora_cli.config import SHARD_MODES, ShardConfig  # noqa: E402
from fedlora_cli.data import load_split  # noqa: E402
from fedlora_cli.sharding import make_client_splits, run_shard  # noqa: E402

DEFAULT_GLUE = GLUE
SST2_TRAIN, SST2_POSITIVE = 67_349, 37_569


def sst2_labels(data_dir: Path) -> tuple[np.ndarray, str]:
    if (data_dir / "SST-2" / "train.tsv").is_file():
        return load_split("sst2", "train", data_dir=data_dir).labels, f"real SST-2 ({data_dir})"
    labels = np.zeros(SST2_TRAIN, dtype=np.int64)
    labels[np.random.default_rng(0).permutation(SST2_TRAIN)[:SST2_POSITIVE]] = 1
    return labels, "synthetic labels with SST-2's balance (no GLUE folder found)"


def skew(clients: list[np.ndarray], labels: np.ndarray) -> tuple[float, float]:
    """(mean normalised label entropy, mean total-variation distance to the global label mix)."""
    n_labels = int(labels.max()) + 1
    overall = np.bincount(labels, minlength=n_labels) / len(labels)
    entropy, tv = [], []
    for c in clients:
        p = np.bincount(labels[c], minlength=n_labels) / len(c)
        nz = p[p > 0]
        entropy.append(float(-(nz * np.log(nz)).sum() / np.log(n_labels)))
        tv.append(0.5 * float(np.abs(p - overall).sum()))
    return float(np.mean(entropy)), float(np.mean(tv))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_GLUE)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    labels, source = sst2_labels(args.data_dir)
    names = np.asarray(["negative", "positive"], dtype=object)[labels]
    print(f"data: {source}: {len(labels):,} examples; {args.clients} clients; median of {args.repeat} runs\n")

    print(f"{'mode':<18}{'seconds':>10}{'min size':>10}{'max size':>10}")
    for mode in SHARD_MODES:
        times, plan = [], None
        for seed in range(args.repeat):
            t0 = time.perf_counter()
            plan = make_client_splits(labels, args.clients, mode, seed, categories=names, overlap_ratio=0.2)
            times.append(time.perf_counter() - t0)
        print(f"{mode:<18}{statistics.median(times):>10.4f}{min(plan.sizes):>10,}{max(plan.sizes):>10,}")

    if (args.data_dir / "SST-2" / "train.tsv").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            config = ShardConfig(
                task="sst2",
                clients=args.clients,
                mode="dirichlet",
                data_dir=str(args.data_dir),
                out=f"{tmp}/s",
            )
            t0 = time.perf_counter()
            r = run_shard(config)
            total = time.perf_counter() - t0
        print(
            f"\nrun_shard end to end (dirichlet): {total:.3f} s = read TSV {r.load_seconds:.3f} s + "
            f"shard {r.seconds:.3f} s + write {args.clients + 1} files {r.write_seconds:.3f} s"
        )

    print(f"\nlabel skew, dirichlet, 10 clients, mean of {args.repeat} seeds (iid and quantity for scale)")
    print(f"{'split':<22}{'H (entropy)':>12}{'TV':>8}{'min size':>10}{'max size':>10}")
    rows = [("iid", {}), *[("dirichlet", {"dirichlet_alpha": a}) for a in (0.1, 0.5, 1.0, 10.0)]]
    rows.append(("quantity", {"dirichlet_alpha": 0.5}))
    for mode, kw in rows:
        h, tv, lo, hi = [], [], [], []
        for seed in range(args.repeat):
            plan = make_client_splits(labels, 10, mode, seed, **kw)
            e, t = skew(plan.clients, labels)
            h.append(e)
            tv.append(t)
            lo.append(min(plan.sizes))
            hi.append(max(plan.sizes))
        label = mode + (f" alpha={kw['dirichlet_alpha']:g}" if kw else "")
        print(f"{label:<22}{np.mean(h):>12.3f}{np.mean(tv):>8.3f}{min(lo):>10,}{max(hi):>10,}")


if __name__ == "__main__":
    main()
