"""Training throughput of the local training function: MiniLM and a roberta-base-sized model, fp32 vs bf16.

Measured side by side in one run on real SST-2 sentences (../shared/data/glue), with LoRA r=8 on
query/value, length-grouped batches of 32. The roberta-base-sized model has random weights (no
weights can be downloaded here) but the real roberta-base tokenizer and architecture, so its speed
is that of roberta-base.

    python benchmarks/bench_train.py [--examples 512] [--glue ../shared/data/glue]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch  # noqa: E402
from _shared import GLUE, SHARED, minilm  # noqa: E402  (puts the repository on sys.path)

from fedlora_cli.config import DataSpec, LoraSpec, ModelSpec, TrainSpec  # noqa: E402
from fedlora_cli.features import load_task_data  # noqa: E402
from fedlora_cli.modeling import LoraModel, load_base_model, load_tokenizer  # noqa: E402
from fedlora_cli.tasks import get_task  # noqa: E402
from fedlora_cli.training import train_model  # noqa: E402


def roberta_base_random(shared: Path, folder: Path) -> Path | None:
    """roberta-base's architecture and real tokenizer, random weights (saved once to a temp folder)."""
    src = shared / "models" / "roberta-base"
    if not (src / "vocab.json").is_file():
        return None
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizer

    if not (folder / "config.json").is_file():
        tok = RobertaTokenizer(vocab=str(src / "vocab.json"), merges=str(src / "merges.txt"))
        tok.save_pretrained(str(folder))
        torch.manual_seed(0)
        RobertaForMaskedLM(RobertaConfig.from_pretrained(str(src))).save_pretrained(str(folder))
    return folder


def measure(model_dir: Path, glue: Path, precision: str, examples: int, group: bool = True) -> dict:
    spec = ModelSpec(str(model_dir))
    data = load_task_data(
        DataSpec("sst2", str(glue), max_train_samples=examples), load_tokenizer(spec), evals=False
    )
    lora = LoraModel(load_base_model(spec, get_task("sst2"), 0), LoraSpec(), torch.device("cpu"))
    train = TrainSpec(epochs=1, batch_size=32, learning_rate=5e-4, precision=precision, group_by_length=group)
    # one warm-up step's worth (oneDNN picks kernels on first use), then the measured epoch
    warm = TrainSpec(epochs=1, batch_size=32, precision=precision)
    train_model(lora.module, data.train, warm, device=torch.device("cpu"), precision=precision, seed=1,
                indices=list(range(64)))  # fmt: skip
    r = train_model(lora.module, data.train, train, device=torch.device("cpu"), precision=precision, seed=0)
    return {
        "samples/s": r.samples_per_second,
        "tokens/s": r.tokens_per_second,
        "padded tokens/s": r.padded_tokens_per_second,
        "padding": r.padded_tokens / r.real_tokens - 1,
        "seconds": r.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue", default=str(GLUE))
    parser.add_argument("--shared", default=str(SHARED))
    parser.add_argument("--examples", type=int, default=512)
    args = parser.parse_args()
    glue = Path(args.glue)
    if not (glue / "SST-2" / "train.tsv").is_file():
        sys.exit(f"no SST-2 under {glue}: pass --glue DIR")
    os.environ.setdefault("FEDLORA_CACHE", tempfile.mkdtemp(prefix="fedlora-bench-"))
    tmp = Path(tempfile.mkdtemp(prefix="fedlora-bench-model-"))
    models = {
        "MiniLM-L6 (22M)": minilm(),
        "roberta-base size (125M)": roberta_base_random(Path(args.shared), tmp),
    }
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.examples} SST-2 examples, batch 32"
    )
    header = f"{'model':26} {'precision':9} {'samples/s':>10} {'tokens/s':>10} {'padded tok/s':>13} {'padding':>8} {'s':>6}"
    print(header)
    print("-" * len(header))
    for name, path in models.items():
        if path is None:
            print(f"{name:26} (not available: skipped)")
            continue
        rows = {p: measure(path, glue, p, args.examples) for p in ("fp32", "bf16")}
        for p, m in rows.items():
            print(f"{name:26} {p:9} {m['samples/s']:10.1f} {m['tokens/s']:10.0f} {m['padded tokens/s']:13.0f} "
                  f"{m['padding']:8.1%} {m['seconds']:6.1f}")  # fmt: skip
        print(f"{'':26} bf16/fp32 speed-up: {rows['bf16']['tokens/s'] / rows['fp32']['tokens/s']:.2f}x")
    # what length-grouping saves, on the small model
    if models["MiniLM-L6 (22M)"] is not None:
        grouped = measure(models["MiniLM-L6 (22M)"], glue, "bf16", args.examples, group=True)
        plain = measure(models["MiniLM-L6 (22M)"], glue, "bf16", args.examples, group=False)
        print(
            f"length-grouped batches (MiniLM, bf16): padding {grouped['padding']:.1%} vs {plain['padding']:.1%} "
            f"random; real tokens/s {grouped['tokens/s']:.0f} vs {plain['tokens/s']:.0f} "
            f"({grouped['tokens/s'] / plain['tokens/s']:.2f}x)"
        )


if __name__ == "__main__":
    main()
