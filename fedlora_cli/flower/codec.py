"""What crosses Flower's wire: adapter states as ArrayRecords (one safetensors array each), LoRA shapes and
reports as ConfigRecords, and `RoundsConfig` as Flower's flat run config.

The run config is derived from the option fields of `RoundsConfig` (fedlora_cli/options.py), so the
defaults in pyproject.toml's `[tool.flwr.app.config]` (`pyproject_block`; a test checks the file), the
CLI's and the Flower apps' are one set. Keys are the field paths in kebab-case: `rounds`,
`train.learning-rate`, `aggregation.svd.rank`. Flower's config values cannot be None, so None is written
as ""; tuples (target modules) as a comma-separated string.
"""

from __future__ import annotations

import io
import json
import math
import types
import typing
import warnings
from collections.abc import Mapping
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

from fedlora_cli.config import MAX_COUNT, DataSpec, LoraSpec, RoundsConfig
from fedlora_cli.options import OptionField, build, walk
from fedlora_cli.runs.record import safetensors_header

RunConfig = dict[str, bool | int | float | str]

# Record names inside a message's RecordDict (ARRAYS and CONFIG are FedAvg's defaults).
ARRAYS = "arrays"  # ArrayRecord: the adapter state (broadcast, or a client's update)
CONFIG = "config"  # ConfigRecord: server-round, client-id and the adapter's LoRA shape
RUN_CONFIG = "run-config"  # ConfigRecord: the server's resolved settings (to_run_config)
METRICS = "metrics"  # MetricRecord: num-examples (the FedAvg weight) and the training loss
REPORT = "report"  # ConfigRecord: the rest of a client's report (report_to_config)
IDENTITY = "identity"  # ConfigRecord: a QUERY answer, the client a node serves
BASE_DELTA = "base-delta"  # ArrayRecord: a plan's frozen base delta, "<module>|P" and "<module>|Q"
PERSONAL_START = "personal-start"  # ArrayRecord: the initial values of a plan's personal parts (first turn)

# ---------------------------------------------------------------------------------------------------
# RoundsConfig <-> run config


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def run_config_key(path: tuple[str, ...]) -> str:
    """A config field's run-config key: its path in kebab-case, `train.learning-rate`,
    `aggregation.svd.rank`."""
    return ".".join(_kebab(p) for p in path)


def _encode(value: Any) -> bool | int | float | str:
    if value is None:
        return ""
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cannot put {type(value).__name__} into a Flower run config")


def _decode(key: str, value: Any, tp: Any) -> Any:
    """One run-config value back to the field's Python type; ValueError names the key."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[X]
        if value == "":
            return None
        inner = [a for a in args if a is not type(None)]
        return _decode(key, value, inner[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(f"run config {key} must be true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"run config {key} must be a number, got {value!r}")
        try:
            number = float(value) if tp is float else int(value)
        except (TypeError, ValueError):
            raise ValueError(f"run config {key} must be a number, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != number:
            raise ValueError(f"run config {key} must be a whole number, got {value!r}")
        return number
    if typing.get_origin(tp) is tuple:
        items = value if isinstance(value, list | tuple) else str(value).split(",")
        return tuple(str(v).strip() for v in items if str(v).strip())
    return str(value)


def _fields() -> list[OptionField]:
    """Every field of RoundsConfig, CLI option or not (resume, the token cache): the run config has them
    all."""
    return list(walk(RoundsConfig))


def to_run_config(config: RoundsConfig) -> RunConfig:
    """A `RoundsConfig` as Flower's flat run config (what `[tool.flwr.app.config]` holds)."""
    out: RunConfig = {}
    for f in _fields():
        value: Any = config
        for part in f.path:
            value = getattr(value, part)
        out[run_config_key(f.path)] = _encode(value)
    return out


def from_run_config(run_config: Mapping[str, Any]) -> RoundsConfig:
    """Build a `RoundsConfig` from a run config; missing keys take the dataclass defaults.

    Bad values raise ValueError naming the key (the config's own checks run too); unknown keys
    are ignored with a warning, so a run config written by a newer fedlora still loads.
    """
    values: dict[tuple[str, ...], Any] = {}
    known: set[str] = set()
    for f in _fields():
        key = run_config_key(f.path)
        known.add(key)
        if key in run_config:
            values[f.path] = _decode(key, run_config[key], f.type)
    if ("data", "task") not in values:
        raise ValueError("the run config needs data.task (a GLUE task, e.g. sst2)")
    unknown = sorted(set(run_config) - known)
    if unknown:
        warnings.warn(f"ignoring unknown run config keys {unknown}", stacklevel=2)
    return build(RoundsConfig, values)


def default_run_config() -> RunConfig:
    """The CLI's defaults (`fedlora rounds` with only --task sst2), as pyproject.toml declares them."""
    return to_run_config(RoundsConfig(data=DataSpec(task="sst2"), shards=""))


def run_config_overrides(config: RoundsConfig) -> RunConfig:
    """The keys where `config` differs from the defaults: what `flwr run --run-config` would need."""
    defaults, mine = default_run_config(), to_run_config(config)
    return {k: v for k, v in mine.items() if defaults.get(k) != v}


def pyproject_block() -> str:
    """`[tool.flwr.app.config]` of pyproject.toml, made from the fields (a test checks the file holds it)."""
    lines = ["[tool.flwr.app.config]"]
    defaults = default_run_config()
    for f in _fields():
        key = run_config_key(f.path)
        help_text = " ".join(f.option.help.split())
        if f.option.default_text:
            help_text += f" [default: {f.option.default_text}]"
        choices = f.option.choice_values()
        if choices:
            help_text += f" ({' | '.join(choices)})"
        lines.append(f"{key} = {toml_value(defaults[key])}  # {help_text}")
    return "\n".join(lines) + "\n"


def toml_value(value: bool | int | float | str) -> str:
    """A run-config value in TOML syntax (for docs, pyproject.toml and `--run-config`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---------------------------------------------------------------------------------------------------
# adapter state <-> ArrayRecord, LoraSpec <-> ConfigRecord


PACKED = "adapter"  # the one array of an adapter's ArrayRecord
PACKED_STYPE = "safetensors"  # how its bytes are laid out


def state_to_arrays(state: Mapping[str, Any]) -> ArrayRecord:
    """An adapter state dict (PEFT keys, CPU tensors) as an ArrayRecord of ONE array: the whole state as
    safetensors bytes (no pickle), the key order in its metadata.

    One array rather than one per tensor: Flower moves every array (and every record) as an object of its own
    — in a deployment one HTTP request each, from the ServerApp to the SuperLink, to the SuperNode, to the
    ClientApp and back — so a 26-tensor LoRA adapter made a 57-object message; packed, a message has about
    ten.
    """
    from safetensors.torch import save

    tensors = {str(k): v.detach().cpu().contiguous() for k, v in state.items()}
    blob = save(tensors, metadata={"order": json.dumps(list(tensors))})
    return ArrayRecord({PACKED: Array(dtype="uint8", shape=(len(blob),), stype=PACKED_STYPE, data=blob)})


def arrays_to_state(arrays: ArrayRecord) -> dict[str, Any]:
    """Back to `{key: torch.Tensor}`, keys in the order they were sent.

    What a client sent is untrusted: any failure to decode it (another layout, a dtype torch has no tensor
    for, a damaged or lying header …) is a ValueError, which the server counts as a failed client.
    """
    from safetensors.torch import load

    try:
        if list(arrays.keys()) != [PACKED] or arrays[PACKED].stype != PACKED_STYPE:
            raise ValueError(f"expected one {PACKED_STYPE} array {PACKED!r}, got {sorted(arrays.keys())[:5]}")
        blob = bytes(arrays[PACKED].data)
        state = load(blob)
        header, _ = safetensors_header(io.BytesIO(blob))
        order = json.loads(header["__metadata__"]["order"])
        if not isinstance(order, list) or sorted(order) != sorted(state):
            raise ValueError("the key order does not list the tensors")
        return {key: state[key] for key in order}
    except Exception as e:  # decoding untrusted bytes may fail in any way safetensors, json or torch can
        raise ValueError(f"unreadable arrays ({type(e).__name__}: {str(e)[:120]})") from None


def lora_to_config(spec: LoraSpec) -> dict[str, Any]:
    return {
        "lora-r": spec.r,
        "lora-alpha": float(spec.alpha),
        "lora-dropout": float(spec.dropout),
        "lora-target-modules": list(spec.target_modules),
        "lora-use-rslora": bool(spec.use_rslora),
    }


def lora_from_config(record: Mapping[str, Any]) -> LoraSpec:
    """A LoRA shape from a record; ValueError (only) when a field is missing or of the wrong type or range."""
    modules = _field(record, "lora-target-modules")
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) and m for m in modules):
        raise ValueError(f"lora-target-modules must be a list of module names, got {_show(modules)}")
    return LoraSpec(
        r=whole(record, "lora-r", 1, MAX_COUNT),
        alpha=number(record, "lora-alpha", finite=True),
        dropout=number(record, "lora-dropout", finite=True),
        target_modules=tuple(modules),
        use_rslora=_flag(record, "lora-use-rslora"),
    )  # LoraSpec's own checks (alpha > 0, 0 <= dropout < 1) raise ValueError too


# ---------------------------------------------------------------------------------------------------
# typed reading of an untrusted record: every failure is a ValueError naming the field


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _field(record: Mapping[str, Any], key: str) -> Any:
    if key not in record:
        raise ValueError(f"the report has no {key}")
    return record[key]


def whole(record: Mapping[str, Any], key: str, low: int, high: int) -> int:
    """A whole number in [low, high]: not a bool, not a float, not a string of digits."""
    value = _field(record, key)
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{key} must be a whole number in {low}..{high:,}, got {_show(value)}")
    return value


def _flag(record: Mapping[str, Any], key: str) -> bool:
    """A bool that may be absent (False): a record from a fedlora that did not send it."""
    value = record.get(key, False)
    if type(value) is not bool:
        raise ValueError(f"{key} must be true or false, got {_show(value)}")
    return value


def number(record: Mapping[str, Any], key: str, *, finite: bool) -> float:
    """A real number (int or float, not a bool); finite unless `finite=False` (then NaN is allowed, ±Inf
    not)."""
    value = _field(record, key)
    if type(value) not in (int, float):
        raise ValueError(f"{key} must be a number, got {_show(value)}")
    value = float(value)
    if math.isinf(value) or (finite and math.isnan(value)):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    return value


def run_config_record(config: RoundsConfig) -> ConfigRecord:
    """The server's resolved settings, sent with every message so clients train exactly those."""
    return ConfigRecord(to_run_config(config))


# ---------------------------------------------------------------------------------------------------
# a client's report (ClientReport without the state) <-> ConfigRecord

_EVAL_PREFIX = "eval."


def report_to_config(
    client_id: int,
    examples: int,
    seed: int,
    lora: LoraSpec,
    train: Mapping[str, Any],
    evaluation: Mapping[str, float] | None,
) -> ConfigRecord:
    record: dict[str, Any] = {
        "client-id": client_id,
        "examples": examples,
        "seed": int(seed),
        **lora_to_config(lora),
    }
    record.update({f"train.{k}": v for k, v in train.items()})
    record.update({f"{_EVAL_PREFIX}{k}": float(v) for k, v in (evaluation or {}).items()})
    return ConfigRecord(record)


# What a client's `train` statistics must hold (federation.train_client writes them): name -> kind.
# "number": a finite real number; "count": a whole number >= 0; "text": a short string. update_norm is
# there only when the plan clips the update (client-side DP).
TRAIN_FIELDS = {
    "loss": "number",
    "last_loss": "number",
    "steps": "count",
    "seconds": "number",
    "samples_per_second": "number",
    "tokens_per_second": "number",
    "order": "text",
}
OPTIONAL_TRAIN_FIELDS = {"update_norm": "number", "lr_range": "pair"}
MAX_EXAMPLES = 2**63 - 1  # the range of a count; the server then compares it with the shard's size


def report_from_config(record: Mapping[str, Any]) -> dict[str, Any]:
    """`client_id`, `examples`, `seed`, `lora`, `train` and `eval` (None when the client did not evaluate).

    The record comes from an untrusted client: every field must be present and of its type, or this
    raises ValueError naming it — never anything else (the server counts that client as failed).
    Unknown `train.*` fields are dropped. Whether the values are *right* (the example count equals the
    shard's size, the seed is the round's …) is `RoundDriver.check_report`'s business.
    """
    train: dict[str, Any] = {}
    for name, kind in {**TRAIN_FIELDS, **OPTIONAL_TRAIN_FIELDS}.items():
        key = f"train.{name}"
        if key not in record and name in OPTIONAL_TRAIN_FIELDS:
            continue
        if kind == "number":
            train[name] = number(record, key, finite=True)
        elif kind == "count":
            train[name] = whole(record, key, 0, MAX_EXAMPLES)
        elif kind == "pair":  # two finite numbers (the first and last learning rate)
            pair = _field(record, key)
            ok = (
                isinstance(pair, list)
                and len(pair) == 2
                and all(
                    isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in pair
                )
            )
            if not ok:
                raise ValueError(f"{key} must be two finite numbers, got {_show(pair)}")
            train[name] = [float(v) for v in pair]
        else:
            text = _field(record, key)
            if not isinstance(text, str) or len(text) > 256:
                raise ValueError(f"{key} must be a short text, got {_show(text)}")
            train[name] = text
    evaluation = {
        k.removeprefix(_EVAL_PREFIX): number(record, k, finite=False)
        for k in record
        if k.startswith(_EVAL_PREFIX)
    }
    return {
        "client_id": whole(record, "client-id", 0, MAX_EXAMPLES),
        "examples": whole(record, "examples", 0, MAX_EXAMPLES),
        "seed": whole(record, "seed", 0, 2**32 - 1),
        "lora": lora_from_config(record),
        "train": train,
        "eval": evaluation or None,
    }


# ---------------------------------------------------------------------------------------------------
# a client's plan (strategies.base.ClientPlan) <-> the content of a TRAIN message


def plan_to_content(
    plan: Any, round_no: int, run_config: ConfigRecord, extra: Mapping[str, Any] | None = None
) -> RecordDict:
    """Everything a client needs for its turn: the adapter (its shared parts), its shape, what trains, the
    base delta, and which of its own turns its personal parts continue from (their initial values for its
    first). `extra`: more CONFIG fields (a final turn's epochs)."""
    meta = ConfigRecord(
        {
            "server-round": round_no,
            "client-id": plan.client_id,
            **lora_to_config(plan.adapter.lora),
            "train-parts": sorted(plan.train),
            "prox-mu": float(plan.prox_mu),
            "base-delta-key": plan.base_delta_key,
            "clip-norm": "" if plan.clip_norm is None else float(plan.clip_norm),
            "clip-space": plan.clip_space,
            "tail-penalty": float(plan.tail_penalty),
            "tail-from": int(plan.tail_from),
            "personal-parts": sorted(plan.personal),
            "personal-round": int(plan.personal_round),
            **(extra or {}),
        }
    )
    content = RecordDict({ARRAYS: state_to_arrays(plan.adapter.state), CONFIG: meta, RUN_CONFIG: run_config})
    if plan.personal_start:
        content[PERSONAL_START] = state_to_arrays(plan.personal_start)
    if plan.base_delta:
        delta = {}
        for prefix, (p, q) in plan.base_delta.items():
            delta[f"{prefix}|P"], delta[f"{prefix}|Q"] = p, q
        content[BASE_DELTA] = state_to_arrays(delta)
    return content


def plan_from_content(content: RecordDict) -> Any:
    """A TRAIN message's content back as a ClientPlan (ValueError / KeyError if it is malformed)."""
    from fedlora_cli.strategies.base import PARTS, ClientPlan, GlobalAdapter

    meta = content.config_records[CONFIG]
    lora = lora_from_config(meta)
    parts = frozenset(str(p) for p in meta.get("train-parts", list(PARTS)))
    personal = frozenset(str(p) for p in meta.get("personal-parts", []))
    if not parts | personal <= set(PARTS):
        raise ValueError(f"unknown parts {sorted((parts | personal) - set(PARTS))}")
    start = {}
    if PERSONAL_START in content.array_records:
        start = arrays_to_state(content.array_records[PERSONAL_START])
    delta: dict[str, Any] = {}
    if BASE_DELTA in content.array_records:
        flat = arrays_to_state(content.array_records[BASE_DELTA])
        for key, p in flat.items():
            if key.endswith("|P"):
                prefix = key[:-2]
                delta[prefix] = (p, flat[f"{prefix}|Q"])
    adapter = GlobalAdapter(arrays_to_state(content.array_records[ARRAYS]), lora)
    clip = meta.get("clip-norm", "")
    return ClientPlan(
        int(meta["client-id"]),
        adapter,
        parts,
        float(meta.get("prox-mu", 0.0)),
        delta,
        str(meta.get("base-delta-key", "")),
        None if clip == "" else float(clip),
        str(meta.get("clip-space", "factors")),
        float(meta.get("tail-penalty", 0.0)),
        int(meta.get("tail-from", 0)),
        personal,
        int(meta.get("personal-round", 0)),
        start,
    )


if __name__ == "__main__":  # python -m fedlora_cli.flower.codec: the run-config block of pyproject.toml
    print(pyproject_block(), end="")
