"""The model-and-adapter preamble every workflow starts from: device, precision, the adapter to start from,
the base model and the tokenized data, and the LoRA model built on them.

It sits above `modeling` (the model) and `features` (the data), which know nothing of each other, so that
`train`, `eval`, `rounds` and the Flower ClientApp start the same way without reaching into each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fedlora_cli.config import DataSpec, LoraSpec, ModelSpec
from fedlora_cli.features import TaskData, load_task_data
from fedlora_cli.modeling import (
    Adapter,
    LoraModel,
    check_adapter_task,
    check_model_limits,
    load_base_model,
    load_tokenizer,
    read_adapter,
    resolve_device,
    resolve_precision,
)
from fedlora_cli.progress import Progress
from fedlora_cli.tasks import GlueTask


def load_model_and_data(
    model_spec: ModelSpec,
    data_spec: DataSpec,
    seed: int,
    *,
    train: bool,
    progress: Progress,
    lora: LoraSpec | None = None,
) -> tuple[Any, TaskData, Any]:
    """The pieces every workflow starts from: base model (seeded head), tokenizer, tokenized splits.

    The model comes first so that the options it bounds (`--max-seq-length`, the LoRA rank) are
    checked before any data is read or tokenized.
    """
    task = data_spec.glue_task
    tokenizer = load_tokenizer(model_spec)
    base = load_base_model(model_spec, task, seed)
    check_model_limits(base, data_spec, lora)
    data = load_task_data(
        data_spec, tokenizer, train=train, hub_cache_dir=model_spec.cache_dir, progress=progress
    )
    return base, data, tokenizer


@dataclass(frozen=True)
class Start:
    """Where a LoRA run starts, settled before any model is loaded."""

    device: torch.device
    precision: str  # fp32 / bf16 / fp16, `auto` resolved for `device`
    adapter: Adapter | None  # to start from (--init-adapter, eval's --adapter), checked for the task

    @classmethod
    def resolve(
        cls, model: ModelSpec, precision: str, adapter: str | None, task: GlueTask, progress: Progress
    ) -> Start:
        """Resolve --device and --precision; read the adapter (if any) and refuse one whose head cannot
        serve `task` (a note when it was trained on another task)."""
        device = resolve_device(model.device)
        start = cls(device, resolve_precision(precision, device), read_adapter(adapter) if adapter else None)
        if start.adapter is not None and (note := check_adapter_task(start.adapter, task, adapter)):
            progress.log(note)
        return start

    def lora(self, configured: LoraSpec) -> LoraSpec:
        """The LoRA shape to train: the starting adapter's own, else the configured one (--lora-r …)."""
        return self.adapter.lora if self.adapter is not None else configured

    def build(
        self,
        model: ModelSpec,
        data: DataSpec,
        seed: int,
        lora: LoraSpec,
        *,
        progress: Progress,
        fits: LoraSpec | None = None,
    ) -> tuple[LoraModel, TaskData]:
        """Load the base model and the training data, attach LoRA of shape `lora`, load the starting
        adapter's state into it.

        `fits`: the largest LoRA shape the run will use (default `lora`), checked against the target
        modules as soon as the model is built, before any data is read.
        """
        base, task_data, _ = load_model_and_data(
            model, data, seed, train=True, progress=progress, lora=fits or lora
        )
        lora_model = LoraModel(base, lora, self.device, base_name=model.resolved)
        if self.adapter is not None:
            lora_model.load_state(self.adapter.state, self.adapter.lora)
        return lora_model, task_data
