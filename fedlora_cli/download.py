"""Fill the Hugging Face cache with models and GLUE tasks, so that later runs work with the hub offline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedlora_cli.config import ModelSpec
from fedlora_cli.errors import FedloraError, first_line
from fedlora_cli.progress import NullProgress, Progress
from fedlora_cli.tasks import HUB_DATASET, get_task

# Weights in safetensors only (fedlora never unpickles), plus configs and tokenizer files.
MODEL_FILES = ["*.json", "*.txt", "*.model", "*.safetensors", "merges.txt", "vocab.*", "tokenizer*"]


@dataclass(frozen=True)
class Downloaded:
    kind: str  # "model" or "task"
    name: str
    location: str
    detail: str


def download_model(name: str, cache_dir: str | None) -> Downloaded:
    spec = ModelSpec(name, cache_dir)
    if spec.is_local:
        return Downloaded("model", name, spec.resolved, "local folder, nothing to download")
    from huggingface_hub import snapshot_download

    try:
        path = Path(snapshot_download(spec.resolved, cache_dir=cache_dir, allow_patterns=MODEL_FILES))
    except Exception as e:
        reason = first_line(e)
        raise FedloraError(
            f"cannot download model {name!r} ({spec.resolved}): {reason}. This needs internet access "
            f"to the Hugging Face hub (and HF_HUB_OFFLINE unset)"
        ) from None
    weights = sorted(p.name for p in path.glob("*.safetensors"))
    if not weights:
        raise FedloraError(
            f"model {spec.resolved} has no safetensors weights on the hub; fedlora does not load pickled "
            f"weights: convert the model to safetensors and pass its folder with --model"
        )
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return Downloaded("model", name, str(path), f"{size / 2**20:,.0f} MB, {', '.join(weights)}")


def download_task(name: str, cache_dir: str | None) -> Downloaded:
    task = get_task(name)
    import datasets

    datasets.logging.set_verbosity_error()
    try:
        ds = datasets.load_dataset(HUB_DATASET, task.name, cache_dir=cache_dir)
    except Exception as e:
        reason = first_line(e)
        raise FedloraError(
            f"cannot download GLUE task {task.name}: {reason}. This needs internet access to the "
            f"Hugging Face hub; offline, use --data-dir with the original GLUE files instead"
        ) from None
    sizes = ", ".join(f"{split} {len(ds[split]):,}" for split in ds)
    return Downloaded("task", task.name, cache_dir or "Hugging Face datasets cache", sizes)


def run_download(
    models: list[str], tasks: list[str], cache_dir: str | None, progress: Progress | None = None
) -> list[Downloaded]:
    progress = progress or NullProgress()
    items = [("model", m) for m in models] + [("task", t) for t in tasks]
    done: list[Downloaded] = []
    progress.start("download", "downloading", total=len(items))
    for kind, name in items:
        progress.advance("download", 0, info=name)
        done.append(download_model(name, cache_dir) if kind == "model" else download_task(name, cache_dir))
        progress.advance("download", 1, info=name)
    progress.stop("download")
    return done
