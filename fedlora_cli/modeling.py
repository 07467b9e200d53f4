"""Build the encoder once, attach LoRA from a frozen spec, move adapter state in and out, read/write PEFT
dirs."""

from __future__ import annotations

import math
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedlora_cli import __version__, atomic, memory, ownership
from fedlora_cli.config import MAX_COUNT, DataSpec, LoraSpec, ModelSpec
from fedlora_cli.errors import FedloraError, InputError, OutputError, first_line
from fedlora_cli.jsonfile import read_json, read_json_or_none
from fedlora_cli.ownership import ADAPTER_CONFIG, ADAPTER_FILES, ADAPTER_META, ADAPTER_WEIGHTS
from fedlora_cli.tasks import GlueTask

memory.bound_kernel_caches()  # before any model runs: oneDNN reads the capacity once

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


PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _check_local_model(spec: ModelSpec, what: str) -> None:
    """A local model folder: config.json an object of an architecture transformers knows, weights in
    safetensors."""
    folder = Path(spec.resolved)
    name = spec.name
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise InputError(f"--model {name}: the folder has no config.json; is it a Hugging Face model folder?")
    config = read_json(config_file, "model config", hint=f"--model {name} needs a Hugging Face model folder")
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        custom = " and ships its own code (auto_map)" if "auto_map" in config else ""
        raise InputError(
            f"--model {name}: model_type {model_type!r} is not an architecture transformers knows{custom}; "
            f"fedlora never runs a model's own code (trust_remote_code): use a model transformers supports"
        )
    if what != "model weights" or any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern))
    if pickled:
        raise InputError(
            f"--model {name} has only pickled weights ({pickled[0]}), which fedlora does not load "
            "(unpickling runs arbitrary code): convert them once, where you trust the file, with "
            '`python -c "from transformers import AutoModel; '
            f"AutoModel.from_pretrained('{folder}').save_pretrained('{folder}')\"` "
            "(writes model.safetensors)"
        )
    raise InputError(f"--model {name}: the folder has no *.safetensors weights")


def _load_pretrained(loader: Any, spec: ModelSpec, what: str, **kwargs: Any) -> Any:
    """Run a `from_pretrained` (safetensors only, never remote code), with one actionable line on failure."""
    _quiet_transformers()
    name = spec.name
    # A hub id is `name` or `org/name`; anything else path-like that does not exist is a typo'd folder.
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name
    if looks_like_path and not spec.is_local:
        raise InputError(f"--model {name}: no such folder; pass an existing model folder or a hub id")
    if spec.is_local:
        _check_local_model(spec, what)
    from safetensors import SafetensorError

    try:
        with memory.paused_gc():  # the imports this triggers would otherwise cost ~0.6 s of collections
            return loader.from_pretrained(
                spec.resolved, cache_dir=spec.cache_dir, trust_remote_code=False, **kwargs
            )
    except SafetensorError as e:  # a damaged or truncated *.safetensors: its header cannot be read
        where = "the folder" if spec.is_local else "the Hugging Face cache"
        fix = (
            "copy or save the model again"
            if spec.is_local
            else f"delete it from the cache and run `fedlora download --model {name}` again"
        )
        raise InputError(
            f"--model {name}: the {what} in {where} are damaged ({first_line(e)}); {fix}"
        ) from None
    except OSError as e:
        if spec.is_local:
            first = first_line(e)
            raise InputError(f"--model {name}: cannot read the {what} from the folder ({first})") from None
        raise FedloraError(
            f"model {name!r} ({what}) is not in the cache and the hub cannot be reached: run "
            f"`fedlora download --model {name}` on a machine with internet, or pass --model DIR "
            f"with a local model folder"
        ) from None
    except (
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
    ) as e:  # a config or tokenizer file of the wrong shape
        if "trust_remote_code" in str(e):
            raise InputError(
                f"--model {name}: its {what} needs the model's own code, which fedlora never runs "
                f"(trust_remote_code): use a model transformers supports"
            ) from None
        raise InputError(f"--model {name}: cannot load the {what} ({first_line(e)})") from None


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
        "use_safetensors": True,  # never unpickle
    }
    if not task.is_regression:
        kwargs["id2label"] = dict(enumerate(task.label_names))
        kwargs["label2id"] = {n: i for i, n in enumerate(task.label_names)}
    model = _load_pretrained(AutoModelForSequenceClassification, spec, "model weights", **kwargs)
    model.config.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    return model


def max_sequence_length(model: torch.nn.Module) -> int | None:
    """Tokens one example may have: the position table's size, less RoBERTa's offset (positions start
    after the padding index); None for models without a learned position table."""
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    table = getattr(embeddings, "position_embeddings", None)
    if isinstance(table, torch.nn.Embedding):
        n = table.num_embeddings
    else:
        n = getattr(model.config, "max_position_embeddings", None)
        if not isinstance(n, int):
            return None
    padding_idx = getattr(embeddings, "padding_idx", None)
    return n - (padding_idx + 1) if isinstance(padding_idx, int) else n


def check_model_limits(model: torch.nn.Module, data: DataSpec, lora: LoraSpec | None = None) -> None:
    """The options that depend on the model, checked once it is built and before any training."""
    limit = max_sequence_length(model)
    if limit is not None and data.max_seq_length > limit:
        raise InputError(
            f"--max-seq-length {data.max_seq_length} is more than this model takes: it has positions for "
            f"{limit} tokens; use --max-seq-length {limit} or less"
        )
    if lora is not None:
        check_lora_fits(model, lora)


def check_lora_fits(model: torch.nn.Module, spec: LoraSpec) -> None:
    """A rank-r update of a d_out x d_in matrix needs r <= min(d_out, d_in): check every target module."""
    from peft.tuners.tuners_utils import check_target_module_exists

    config = lora_config(spec)
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if (
            not isinstance(weight, torch.Tensor)
            or weight.ndim != 2
            or not check_target_module_exists(config, name)
        ):
            continue
        d_out, d_in = weight.shape
        if spec.r > min(d_out, d_in):
            raise InputError(
                f"LoRA rank {spec.r} is too large for {name} ({d_out} x {d_in}): use --lora-r "
                f"{min(d_out, d_in)} or less"
            )


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


PEFT_INITS: dict[str, Any] = {"default": True, "gaussian": "gaussian", "orthogonal": "orthogonal"}


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
        use_rslora=spec.use_rslora,
        target_modules=targets,
        modules_to_save=list(HEAD_MODULES),
        base_model_name_or_path=base_model,
        inference_mode=inference_mode,
        init_lora_weights=PEFT_INITS[spec.init],
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
        check_lora_fits(base, spec)  # before PEFT allocates r x d matrices
        try:
            self.peft = get_peft_model(base, lora_config(spec, self.base_name))
        except ValueError as e:
            raise InputError(
                f"cannot attach LoRA to --target-modules {','.join(spec.target_modules)}: {e}"
            ) from None
        self.peft.to(device)
        self.spec = spec
        self._original: dict[str, torch.Tensor] = {}  # W0 of modules whose base weight carries a delta
        self._base_delta_key = ""

    @property
    def module(self) -> torch.nn.Module:
        return self.peft

    def activate(self, spec: LoraSpec) -> None:
        """Make the adapter of shape `spec` the active, trainable one (creating it if needed)."""
        if spec not in self._slots:
            name = f"slot{len(self._slots)}"
            check_lora_fits(self.peft.get_base_model(), spec)
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

    def apply_plan(self, plan: Any) -> None:
        """Load a client's plan (strategies.base.ClientPlan): its adapter, its base delta, what trains."""
        self.load_state(plan.adapter.state, plan.adapter.lora)
        self.set_base_delta(plan.base_delta, plan.base_delta_key)
        self.set_trainable(plan.train)

    def apply_global(self, adapter: Any, base_delta: Any, base_delta_key: str) -> None:
        """Load a global model for evaluation: its adapter and the base delta it carries."""
        self.load_state(adapter.state, adapter.lora)
        self.set_base_delta(base_delta, base_delta_key)

    def set_trainable(self, parts: Any) -> None:
        """Train only `parts` of the active adapter ("A", "B", "head"); the rest is frozen for this turn.

        `activate` (every `load_state`) makes everything trainable again first.
        """
        name = self._slots[self.spec]
        for pname, p in self.peft.named_parameters():
            if f".{name}." not in pname:
                continue
            part = (
                "A"
                if "lora_A" in pname
                else "B"
                if "lora_B" in pname
                else "head"
                if "modules_to_save" in pname
                else None
            )
            if part is not None:
                p.requires_grad_(part in parts)

    def set_base_delta(self, delta: Any, key: str = "") -> None:
        """Make the base weights W0 + P @ Q for each `{module prefix: (P, Q)}` of `delta` (and W0 elsewhere).

        Methods that fold what LoRA cannot hold into the base model (exact aggregation) use this; the
        original weights are kept (only those of the target modules) so every call starts from W0.
        `key` names the delta: the same non-empty key as last time means the same tensors, applied once.
        """
        if not delta and not self._base_delta_key and not self._original:
            return
        if key and key == self._base_delta_key:
            return
        for prefix in sorted(set(self._original) | set(delta)):
            try:
                layer = self.peft.get_submodule(prefix)
            except AttributeError:
                raise InputError(f"base delta for {prefix!r}: the model has no such module") from None
            weight = layer.get_base_layer().weight
            if prefix not in self._original:
                self._original[prefix] = weight.detach().clone()
            w0 = self._original[prefix]
            with torch.no_grad():
                if prefix in delta:
                    p, q = delta[prefix]
                    change = p.to(self.device, torch.float64) @ q.to(self.device, torch.float64)
                    if tuple(change.shape) != tuple(w0.shape):
                        raise InputError(
                            f"base delta for {prefix} has shape {tuple(change.shape)}, the weight "
                            f"{tuple(w0.shape)}"
                        )
                    weight.copy_((w0.double() + change).to(w0.dtype))
                else:
                    weight.copy_(w0)
        self._base_delta_key = key

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
    option: str = "",
) -> int:
    """Write a PEFT adapter folder atomically; returns the size of the weights file in bytes.

    `PeftModel.from_pretrained(base, path)` opens it without fedlora. `extra_json` maps file names
    to objects written as JSON beside it, inside the same atomic step. An existing folder is replaced
    only if it is a fedlora adapter folder (ownership.ADAPTER); `option` names it in that error.
    """
    from safetensors import SafetensorError
    from safetensors.torch import save

    files = sorted({*ADAPTER_FILES, *(extra_json or {})})
    with atomic.staged_dir(path, may_replace=ownership.may_replace(ownership.ADAPTER, option)) as tmp:
        lora_config(lora, base_model, inference_mode=True).save_pretrained(str(tmp))
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        try:
            data = save(tensors, metadata={"format": "pt"})
        except SafetensorError as e:
            raise OutputError(f"cannot write {path}: {first_line(e)}") from e
        # written by Python, not by safetensors' save_file (which creates its file 0600 whatever the
        # umask): the weights are as readable as the JSON beside them
        (tmp / ADAPTER_WEIGHTS).write_bytes(data)
        description = {"fedlora_version": __version__, **(meta or {}), "files": files}
        (tmp / ADAPTER_META).write_text(atomic.dumps_json(description))
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(atomic.dumps_json(obj))
        size = (tmp / ADAPTER_WEIGHTS).stat().st_size
    return size


def read_adapter(path: str | os.PathLike) -> Adapter:
    """Read and check a PEFT LoRA adapter folder (fedlora's or plain peft's): the one place adapters are
    validated, for every entry point (eval, train/rounds --init-adapter, merge, resume).

    Refused, with one line (exit 2): pickled weights, a config of the wrong shape, non-float or
    non-finite tensors, LoRA factors whose rank is not the config's `r`.
    """
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
    cfg = read_json(cfg_path, "adapter config")
    lora = _lora_from_config(cfg, path)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise InputError(f"adapter {path}: cannot read {ADAPTER_WEIGHTS} ({first_line(e)})") from None
    check_adapter_tensors(state, lora, f"adapter {path}")
    meta = ownership.read_object(folder / ADAPTER_META) or {}
    base = cfg.get("base_model_name_or_path")
    return Adapter(state, lora, base if isinstance(base, str) else None, str(folder), meta)


def _lora_from_config(cfg: Any, path: str | os.PathLike) -> LoraSpec:
    """The LoraSpec an adapter_config.json describes, with every field's type checked."""
    where = f"adapter {path}: {ADAPTER_CONFIG}"
    if not isinstance(cfg, dict):
        raise InputError(f"{where} must be a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise InputError(
            f"adapter {path} is a {cfg.get('peft_type')!r} adapter; fedlora works with LoRA only"
        )
    if cfg.get("use_dora"):
        raise InputError(f"adapter {path} uses use_dora, which fedlora does not aggregate")
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise InputError(f"{where}: 'use_rslora' must be true or false, got {rslora!r}")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise InputError(f"adapter {path} has per-module ranks (rank_pattern/alpha_pattern): not supported")

    def number(key: str, default: float | None = None) -> float:
        value = cfg.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InputError(f"{where}: {key!r} must be a finite number, got {value!r}")
        return float(value)

    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_COUNT:
        raise InputError(f"{where}: 'r' must be an integer in 1..{MAX_COUNT:,}, got {r!r}")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        targets = (targets,)
    elif isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets):
        targets = tuple(sorted(targets))
    else:
        raise InputError(
            f"{where}: 'target_modules' must be a module name or a list of them, got {targets!r}"
        )
    try:
        return LoraSpec(
            r=r,
            alpha=number("lora_alpha"),
            dropout=number("lora_dropout", 0.0),
            target_modules=targets,
            use_rslora=rslora,
        )
    except ValueError as e:  # LoraSpec names the CLI flag; here the value came from the file
        raise InputError(f"{where} is invalid ({e})") from None


def check_adapter_tensors(state: dict[str, torch.Tensor], lora: LoraSpec, where: str) -> None:
    """Floating point, finite, LoRA factors of one rank that is the config's `r`: else one line naming a
    tensor."""
    from fedlora_cli.aggregation import lora_rank

    for key, tensor in state.items():
        if not torch.is_floating_point(tensor):
            raise InputError(
                f"{where}: tensor {key} is {tensor.dtype}; adapter tensors must be floating point"
            )
        if not bool(torch.isfinite(tensor).all()):
            raise InputError(f"{where}: tensor {key} holds NaN or infinite values; the adapter is corrupt")
    try:
        rank = lora_rank(state)
    except ValueError as e:
        raise InputError(f"{where}: {e}") from None
    if rank != lora.r:
        raise InputError(
            f"{where}: {ADAPTER_CONFIG} says r={lora.r} but the LoRA tensors have rank {rank}; the folder "
            "mixes files of different adapters"
        )


def adapter_base_model(path: str | os.PathLike) -> str | None:
    """The base model an adapter folder names (`base_model_name_or_path`), or None if it names none."""
    # None when unreadable: read_adapter reports what is wrong with the folder, with the rest of the checks
    cfg = read_json_or_none(Path(path).expanduser() / ADAPTER_CONFIG)
    name = cfg.get("base_model_name_or_path") if cfg is not None else None
    return name if isinstance(name, str) and name.strip() else None


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
    if isinstance(trained_for, str) and trained_for and trained_for != task.name:
        return f"note: adapter {path} was trained on {trained_for}, used here for {task.name}"
    return None
