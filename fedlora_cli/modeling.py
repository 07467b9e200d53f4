"""Build the encoder once, attach LoRA from a frozen spec, move adapter state in and out, read/write PEFT dirs."""

from __future__ import annotations

import json
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora_cli import __version__, atomic, memory
from fedlora_cli.config import LoraSpec, ModelSpec
from fedlora_cli.errors import FedloraError, InputError, first_line
from fedlora_cli.tasks import GlueTask

memory.bound_kernel_caches()  # before any model runs: oneDNN reads the capacity once

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_META = "fedlora_adapter.json"  # fedlora's own description; PEFT ignores it
HEAD_MODULES = ("classifier", "score")  # PEFT's sequence-classification heads, saved with the adapter


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # PEFT calls a transformers API that transformers 5 deprecated; the warning is not the user's business.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def seed_everything(seed: int) -> None:
    """Seed every RNG that model construction or training may touch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InputError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` picks bf16 autocast only where the hardware runs it natively (it is slower when emulated)."""
    if precision != "auto":
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise InputError("--precision bf16: this GPU has no bf16 support; use --precision fp32")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return "bf16" if native else "fp32"
    return "fp32"


def _load_pretrained(loader: Any, spec: ModelSpec, what: str, **kwargs: Any) -> Any:
    """Run a `from_pretrained`, turning a missing or unreachable model into one actionable line."""
    _quiet_transformers()
    name = spec.name
    # A hub id is `name` or `org/name`; anything else path-like that does not exist is a typo'd folder.
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_path and not spec.is_local:
        raise InputError(f"--model {name}: no such folder; pass an existing model folder or a hub id")
    if spec.is_local and not (Path(spec.resolved) / "config.json").is_file():
        raise InputError(f"--model {name}: the folder has no config.json; is it a Hugging Face model folder?")
    try:
        with memory.paused_gc():  # the imports this triggers would otherwise cost ~0.6 s of collections
            return loader.from_pretrained(spec.resolved, cache_dir=spec.cache_dir, **kwargs)
    except OSError as e:
        if spec.is_local:
            first = first_line(e)
            raise InputError(f"--model {name}: cannot read the {what} from the folder ({first})") from None
        raise FedloraError(
            f"model {name!r} ({what}) is not in the cache and the hub cannot be reached: run "
            f"`fedlora download --model {name}` on a machine with internet, or pass --model DIR "
            f"with a local model folder"
        ) from None


def load_tokenizer(spec: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    return _load_pretrained(AutoTokenizer, spec, "tokenizer")


def load_base_model(spec: ModelSpec, task: GlueTask, seed: int) -> torch.nn.Module:
    """The encoder with a fresh head for `task`; `seed` makes the head's random init reproducible."""
    from transformers import AutoModelForSequenceClassification

    seed_everything(seed)
    kwargs: dict[str, Any] = {
        "num_labels": task.num_labels,
        "problem_type": "regression" if task.is_regression else "single_label_classification",
        # A folder that holds a classifier for another label count still loads: its head is replaced.
        "ignore_mismatched_sizes": True,
    }
    if not task.is_regression:
        kwargs["id2label"] = dict(enumerate(task.label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(task.label_names)}
    model = _load_pretrained(AutoModelForSequenceClassification, spec, "model weights", **kwargs)
    model.config.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def lora_config(spec: LoraSpec, base_model: str | None = None, inference_mode: bool = False) -> Any:
    """A fresh PEFT LoraConfig each call: PEFT mutates the one it is given (it appends the head)."""
    from peft import LoraConfig, TaskType

    targets: Any = list(spec.target_modules)
    if len(targets) == 1 and any(c in targets[0] for c in "*()[]|\\^$"):
        targets = targets[0]  # a regular expression, as PEFT understands a plain string
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        modules_to_save=list(HEAD_MODULES),
        base_model_name_or_path=base_model,
        inference_mode=inference_mode,
    )


class LoraModel:
    """The base model, built once per process, with LoRA adapters attached on demand.

    A round may change the adapter's shape (the global adapter after `svd` aggregation has rank
    `--svd-rank` and alpha `--alpha`), so each distinct LoraSpec gets its own PEFT adapter slot and
    `load_state` switches to it; the base weights are shared and never reloaded.
    """

    def __init__(
        self, base: torch.nn.Module, spec: LoraSpec, device: torch.device, base_name: str | None = None
    ) -> None:
        with memory.paused_gc():
            from peft import get_peft_model

        self.device = device
        self.base_name = base_name or getattr(base.config, "name_or_path", None) or None
        self._slots: dict[LoraSpec, str] = {spec: "default"}
        try:
            self.peft = get_peft_model(base, lora_config(spec, self.base_name))
        except ValueError as e:
            raise InputError(
                f"cannot attach LoRA to --target-modules {','.join(spec.target_modules)}: {e}"
            ) from None
        self.peft.to(device)
        self.spec = spec

    @property
    def module(self) -> torch.nn.Module:
        return self.peft

    def activate(self, spec: LoraSpec) -> None:
        """Make the adapter of shape `spec` the active, trainable one (creating it if needed)."""
        if spec not in self._slots:
            name = f"slot{len(self._slots)}"
            try:
                self.peft.add_adapter(name, lora_config(spec, self.base_name))
            except ValueError as e:
                raise InputError(
                    f"cannot attach LoRA to --target-modules {','.join(spec.target_modules)}: {e}"
                ) from None
            self._slots[spec] = name
            self.peft.to(self.device)
        self.peft.set_adapter(self._slots[spec])
        # Training after a state load must update LoRA A/B *and* the head (the reference froze A/B
        # from round 2 on); set_adapter marks exactly those trainable — assert it, cheaply.
        self._assert_trainable(self._slots[spec])
        self.spec = spec

    def _assert_trainable(self, name: str) -> None:
        frozen = [
            pname
            for pname, p in self.peft.named_parameters()
            if f".{name}." in pname
            and ("lora_" in pname or "modules_to_save" in pname)
            and not p.requires_grad
        ]
        if frozen:  # a bug (or a PEFT change), not bad input
            raise AssertionError(f"adapter {name!r} has frozen parameters after set_adapter: {frozen[:3]}")

    def state(self) -> dict[str, torch.Tensor]:
        """The active adapter's state (LoRA A/B and head), as CPU float tensors detached from the model."""
        from peft import get_peft_model_state_dict

        sd = get_peft_model_state_dict(self.peft, adapter_name=self._slots[self.spec])
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}

    def load_state(self, state: dict[str, torch.Tensor], spec: LoraSpec) -> None:
        """Put an adapter state into the model (as PeftModel.from_pretrained would), checking it fits."""
        from peft import set_peft_model_state_dict

        self.activate(spec)
        check_state_fits(state, self.state(), spec)
        result = set_peft_model_state_dict(self.peft, state, adapter_name=self._slots[spec])
        unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k or "classifier" in k]
        if unexpected:
            raise InputError(f"adapter keys not used by the model: {', '.join(unexpected[:3])}")


def check_state_fits(
    state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], spec: LoraSpec
) -> None:
    """Same keys and shapes as the model's own adapter state, or an error that says what differs."""
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if extra or missing:
        lora_extra = [k for k in extra if ".lora_" in k]
        if lora_extra:
            raise InputError(
                f"the adapter has LoRA weights for modules the model does not have ({lora_extra[0]}); "
                f"was it trained on another base model or with other --target-modules?"
            )
        raise InputError(
            f"the adapter does not match the model: missing {missing[:2]}, unexpected {extra[:2]} "
            f"(target modules {','.join(spec.target_modules)})"
        )
    for key, ref in reference.items():
        got = state[key]
        if tuple(got.shape) != tuple(ref.shape):
            if key.endswith(("out_proj.weight", "out_proj.bias")) or key.split(".")[-2] in HEAD_MODULES:
                raise InputError(
                    f"the adapter's head has shape {tuple(got.shape)} but this task needs {tuple(ref.shape)} "
                    f"({key}): it was trained for a task with another number of labels"
                )
            raise InputError(
                f"adapter tensor {key} has shape {tuple(got.shape)}, the model expects {tuple(ref.shape)}: "
                f"was it trained on another base model (hidden size) or with another rank?"
            )


# ---------------------------------------------------------------------------------------------------
# adapter folders (PEFT format: adapter_config.json + adapter_model.safetensors)


@dataclass(frozen=True)
class Adapter:
    state: dict[str, torch.Tensor]
    lora: LoraSpec
    base_model: str | None = None
    path: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def save_adapter(
    path: str | os.PathLike,
    state: dict[str, torch.Tensor],
    lora: LoraSpec,
    *,
    base_model: str | None,
    meta: dict[str, Any] | None = None,
    extra_json: dict[str, Any] | None = None,
) -> int:
    """Write a PEFT adapter folder atomically; returns the size of the weights file in bytes.

    `PeftModel.from_pretrained(base, path)` opens it without fedlora. `extra_json` maps file names
    to objects written as JSON beside it, inside the same atomic step.
    """
    from safetensors.torch import save_file

    with atomic.staged_dir(path) as tmp:
        lora_config(lora, base_model, inference_mode=True).save_pretrained(str(tmp))
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        description = {"fedlora_version": __version__, **(meta or {})}
        (tmp / ADAPTER_META).write_text(atomic.dumps_json(description))
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(atomic.dumps_json(obj))
        size = (tmp / ADAPTER_WEIGHTS).stat().st_size
    return size


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Read a PEFT LoRA adapter folder (fedlora's or plain peft's); pickled weights are refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise InputError(f"adapter {path}: no such folder")
    cfg_path = folder / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise InputError(
            f"adapter {path}: no {ADAPTER_CONFIG}; is it a PEFT adapter folder (save_pretrained)?"
        )
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise InputError(
                f"adapter {path} has only pickled weights (adapter_model.bin), which fedlora does not load "
                f"(unpickling runs arbitrary code): re-save it with save_pretrained(..., "
                f"safe_serialization=True) to get {ADAPTER_WEIGHTS}"
            )
        raise InputError(f"adapter {path}: no {ADAPTER_WEIGHTS}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"adapter {path}: {ADAPTER_CONFIG} is not valid JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise InputError(f"adapter {path} is a {cfg.get('peft_type')} adapter; fedlora works with LoRA only")
    for unsupported in ("use_dora", "use_rslora"):
        if cfg.get(unsupported):
            raise InputError(f"adapter {path} uses {unsupported}, which fedlora does not aggregate")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise InputError(f"adapter {path} has per-module ranks (rank_pattern/alpha_pattern): not supported")
    targets = cfg.get("target_modules") or []
    targets = (targets,) if isinstance(targets, str) else tuple(sorted(targets))
    try:
        lora = LoraSpec(
            r=int(cfg["r"]),
            alpha=float(cfg["lora_alpha"]),
            dropout=float(cfg.get("lora_dropout", 0.0)),
            target_modules=targets,
        )
    except (KeyError, ValueError) as e:
        raise InputError(f"adapter {path}: {ADAPTER_CONFIG} is incomplete or invalid ({e})") from None
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise InputError(f"adapter {path}: cannot read {ADAPTER_WEIGHTS} ({e})") from None
    meta: dict[str, Any] = {}
    if (folder / ADAPTER_META).is_file():
        try:
            meta = json.loads((folder / ADAPTER_META).read_text())
        except json.JSONDecodeError:
            meta = {}
    return Adapter(state, lora, cfg.get("base_model_name_or_path"), str(folder), meta)


def head_num_labels(state: dict[str, torch.Tensor]) -> int | None:
    """Number of outputs of the saved head (RoBERTa `out_proj`, BERT `classifier`), if it can be told."""
    for key in sorted(state):
        if key.endswith("out_proj.weight"):
            return int(state[key].shape[0])
    for key in sorted(state):
        parts = key.split(".")
        if len(parts) >= 2 and parts[-2] in HEAD_MODULES and parts[-1] == "weight":
            return int(state[key].shape[0])
    return None


def check_adapter_task(adapter: Adapter, task: GlueTask, path: str) -> str | None:
    """Refuse an adapter whose head cannot serve `task`; return a note if it was trained on another task."""
    n = head_num_labels(adapter.state)
    if n is not None and n != task.num_labels:
        raise InputError(
            f"adapter {path} has a head with {n} output(s) but task {task.name} needs {task.num_labels}: "
            f"it was trained for another task"
        )
    trained_for = adapter.meta.get("task")
    if trained_for and trained_for != task.name:
        return f"note: adapter {path} was trained on {trained_for}, used here for {task.name}"
    return None
