"""The ONE reader and writer of shard manifests: the reference's format, plus fedlora's summary keys.

`client_<i>.json` = {"dataset": task, "indices": [...]} (i from 1), exactly the reference's
`save_shard_manifests`; `summary.json` holds the reference's keys (`client_indices`, `size_per_client`,
`total_train`, `task`, `mode`, `meta`) and fedlora's beside them. Every field read is checked, so a
wrong file is one InputError, never a traceback or a wrong client.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedlora_cli import __version__, ownership
from fedlora_cli.atomic import staged_dir, write_bytes
from fedlora_cli.errors import InputError
from fedlora_cli.ownership import CLIENT_FILE, SUMMARY_FILE
from fedlora_cli.sharding.base import ShardPlan
from fedlora_cli.tasks import get_task

MAX_INDEX = 2**62  # far beyond any dataset; larger "indices" are corrupt, and would overflow int64


@dataclass(frozen=True)
class ShardSet:
    """Shards as federation uses them: one index array per client, by client number.

    Read from a folder (`read_shards`), or made in memory (`partition.make_shards`, `directory` None)
    and written later (`write_shard_set`); either way `summary` is summary.json's content.
    """

    directory: Path | None  # the folder read or written; None: made in memory, not written yet
    clients: list[np.ndarray]  # index arrays into the train split, in file order, by client number
    client_ids: list[int]  # the i of client_<i>.json, ascending numerically (client_10 after client_9)
    task: str | None  # the manifests' "dataset"
    summary: dict | None  # summary.json, if present
    fingerprint: str  # sha256 over (client id, indices): recorded in run records

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.clients]

    @property
    def where(self) -> str:
        """How messages name these shards: the folder, or what they are when made in memory."""
        return str(self.directory) if self.directory is not None else "the in-memory shard set"


def _regular_file(path: Path, where: str) -> None:
    """A manifest must be a regular file (or a link to one): a folder, device, FIFO or dangling link is an
    error, never a silently dropped client (and a FIFO would block the read forever)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise InputError(
                f"{where} is a dangling symbolic link (its target {os.readlink(path)} does not "
                f"exist): fix or remove it"
            ) from None
        raise InputError(f"{where}: no such file") from None
    except OSError as e:
        raise InputError(f"cannot read {where}: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{where} is a folder, not a manifest file: remove or rename it")
    if not stat.S_ISREG(mode):
        raise InputError(f"{where} is not a regular file (a device, FIFO or socket): remove or rename it")


def _load_json(path: Path, where: str | None = None) -> Any:
    """A manifest or summary.json: a regular file (a dangling link is said as such), then the package's one
    JSON-object reader (jsonfile.read_json: size cap, one line for anything that is not a JSON object)."""
    from fedlora_cli.jsonfile import read_json

    where = where or str(path)
    _regular_file(path, where)
    try:
        return read_json(path, "shard file", hint="re-run `fedlora shard`", any_value=True)
    except InputError as e:
        raise InputError(str(e).replace(str(path), where, 1)) from None


@dataclass(frozen=True)
class Manifest:
    """One client's manifest, `client_<i>.json` = {"dataset": task, "indices": [...]}, checked."""

    path: Path
    dataset: str | None
    indices: np.ndarray  # int64, distinct, >= 0, in file order


def read_manifest(path: str | os.PathLike, *, option: str = "") -> Manifest:
    """The one reader of a client manifest (read_shards, merge --shard-manifests): every field's type and
    range is checked, so a wrong-typed file is one InputError, never a traceback or a wrong client."""
    path = Path(path).expanduser()
    where = f"{option} {path}" if option else str(path)
    data = _load_json(path, where)
    if not isinstance(data, dict) or "indices" not in data:
        raise InputError(
            f'{where} has no "indices": a shard manifest is {{"dataset": task, "indices": [...]}}'
        )
    dataset = data.get("dataset")
    if dataset is not None and not isinstance(dataset, str):
        raise InputError(
            f'{where}: "dataset" must be a task name, got {type(dataset).__name__} {dataset!r:.40}'
        )
    values = data["indices"]
    # bool is an int subclass, and numpy would quietly turn floats or huge ints into something else.
    if not isinstance(values, list) or any(type(v) is not int for v in values):
        raise InputError(f'{where}: "indices" must be a list of integers')
    bad = next((v for v in values if not 0 <= v < MAX_INDEX), None)
    if bad is not None:
        kind = "a negative index" if bad < 0 else "an index out of range"
        raise InputError(f'{where}: "indices" holds {kind} ({bad})')
    arr = np.asarray(values, dtype=np.int64) if values else np.empty(0, dtype=np.int64)
    unique, counts = np.unique(arr, return_counts=True)
    if unique.size != arr.size:
        raise InputError(
            f"{where}: index {int(unique[counts > 1][0])} appears {int(counts.max())} times in "
            f'"indices"; a client holds each example once: re-run `fedlora shard`'
        )
    return Manifest(path, dataset, arr)


def shard_fingerprint(client_ids: Sequence[int], clients: Sequence[np.ndarray]) -> str:
    """sha256 over each client's number and its indices (little-endian int64), in client order."""
    h = hashlib.sha256(b"fedlora-shards-v1\n")
    for cid, idx in zip(client_ids, clients, strict=True):
        h.update(f"{cid}:{len(idx)}\n".encode())
        h.update(np.asarray(idx, dtype="<i8").tobytes())
    return h.hexdigest()


def read_shards(directory: str | os.PathLike) -> ShardSet:
    """Read a shard folder written by `fedlora shard` or by the reference's `save_shard_manifests`."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise InputError(
            f"shard folder {directory} does not exist: run `fedlora shard --out {directory}` first"
        )
    found: dict[int, Path] = {}
    for entry in directory.iterdir():
        m = CLIENT_FILE.match(entry.name)
        if m:  # whatever it is: read_manifest refuses what is not a regular file
            cid = int(m.group(1))
            if cid in found:
                raise InputError(f"{directory} holds both {found[cid].name} and {entry.name}: keep one")
            found[cid] = entry
    if not found:
        raise InputError(f"no client_*.json in {directory}: run `fedlora shard` first")
    client_ids = sorted(found)  # numerically: client_10 after client_9
    clients, datasets = [], set()
    for cid in client_ids:
        manifest = read_manifest(found[cid])
        clients.append(manifest.indices)
        datasets.add(manifest.dataset)
    if len(datasets) > 1:
        names = ", ".join(sorted(map(str, datasets)))
        raise InputError(
            f"the manifests in {directory} are for different datasets ({names}): keep one task per folder"
        )
    summary = None
    summary_path = directory / SUMMARY_FILE
    if summary_path.exists() or summary_path.is_symlink():
        summary = _load_json(summary_path)
        if not isinstance(summary, dict):
            raise InputError(f"{summary_path} is not a JSON object: re-run `fedlora shard`")
        for key, types in (("task", str), ("total_train", int), ("size_per_client", list)):
            value = summary.get(key)
            if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
                raise InputError(
                    f'{summary_path}: "{key}" has the wrong type ({type(value).__name__} '
                    f"{value!r:.40}): re-run `fedlora shard`"
                )
        recorded = summary.get("size_per_client")
        sizes = [len(c) for c in clients]
        if isinstance(recorded, list) and recorded != sizes:
            # The reference writes into an existing folder without clearing it: a rerun with fewer
            # clients leaves the old client files behind, and summary.json is the only witness.
            raise InputError(
                f"{directory}: summary.json lists {len(recorded)} client(s) of sizes that differ from the "
                f"{len(sizes)} client_*.json files (stale files from an earlier run?): re-shard into an "
                f"empty folder"
            )
    task = datasets.pop()
    if task is None and summary is not None:
        task = summary.get("task")
    return ShardSet(directory, clients, client_ids, task, summary, shard_fingerprint(client_ids, clients))


def validate_shards(
    shards: ShardSet, task: str, n_train: int, *, train_fingerprint: str | None = None
) -> None:
    """Check that `shards` fit the training set about to be used; InputError saying what to change."""
    task = get_task(task).name
    if shards.task is not None:
        try:
            theirs = get_task(shards.task).name
        except ValueError:
            theirs = shards.task
        if theirs != task:
            raise InputError(
                f"{shards.where} holds shards of {theirs}, not {task}: pass --task {theirs} or "
                f"run `fedlora shard --task {task}`"
            )
    summary = shards.summary or {}
    made_for = summary.get("total_train")
    hint = (
        f"shard with the same data as now (`fedlora shard --task {task}` with the same --data-dir and "
        f"--max-train-samples)"
    )
    if isinstance(made_for, int) and made_for != n_train:
        fix = f"pass --max-train-samples {made_for}" if made_for < n_train else "use the full training set"
        raise InputError(
            f"{shards.where} was made for {made_for:,} training examples but {task} has {n_train:,} "
            f"here: {fix} or {hint}"
        )
    for cid, idx in zip(shards.client_ids, shards.clients, strict=True):
        if idx.size and idx.max() >= n_train:
            raise InputError(
                f"client {cid} of {shards.where} uses index {int(idx.max()):,} but the {task} training "
                f"set has {n_train:,} examples (indices 0..{n_train - 1:,}): {hint}"
            )
    empty = [cid for cid, idx in zip(shards.client_ids, shards.clients, strict=True) if idx.size == 0]
    if empty:
        raise InputError(
            f"client(s) {', '.join(map(str, empty))} of {shards.where} have no examples (the reference's "
            f"category mode leaves clients empty when there are more clients than categories): re-shard "
            f"with `fedlora shard`, which never does"
        )
    recorded = summary.get("train_fingerprint")
    if train_fingerprint and isinstance(recorded, str) and recorded != train_fingerprint:
        raise InputError(
            f"{shards.where} was made from different {task} training data (fingerprint "
            f"{recorded[:12]} vs {train_fingerprint[:12]} now): {hint}"
        )


def check_out_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse a file, a fedlora shard folder without `overwrite`, and anything that is not fedlora's."""
    return ownership.claim(
        Path(out).expanduser().resolve(), ownership.SHARDS, overwrite=overwrite, option="--out"
    )


def _summary_text(summary: dict[str, Any]) -> str:
    """Indented JSON like the reference's, but each client's index list on one line, at the end."""
    head = json.dumps({k: v for k, v in summary.items() if k != "client_indices"}, indent=2, allow_nan=False)
    lists = ",\n".join("    " + json.dumps(c) for c in summary["client_indices"])
    return head[: -len("\n}")] + f',\n  "client_indices": [\n{lists}\n  ]\n}}\n'


def shard_summary(
    task: str,
    plan: ShardPlan,
    *,
    mode: str,
    total_train: int,
    meta: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """summary.json's content: the reference's keys with its meaning, fedlora's beside them, then `extra`."""
    summary: dict[str, Any] = {
        # the reference's keys, with the reference's meaning
        "task": task,
        "mode": mode,
        "total_train": int(total_train),
        "size_per_client": plan.sizes,
        "meta": meta or {"seed": None, "overlap_ratio": 0.0, "category_key": None, "bin_stsb": True},
        # fedlora's, beside them
        "fedlora_version": __version__,
        "params": plan.params,
        "notes": plan.notes,
    }
    if plan.client_categories is not None:
        summary["client_categories"] = plan.client_categories
    for key, value in (extra or {}).items():
        if key in summary or key == "client_indices":
            raise ValueError(f"summary_extra may not override {key!r}")
        summary[key] = value
    summary["client_indices"] = [c.tolist() for c in plan.clients]
    return summary


def write_shards(
    out: str | os.PathLike,
    task: str,
    plan: ShardPlan,
    *,
    mode: str,
    total_train: int,
    meta: dict[str, Any] | None = None,
    summary_extra: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `client_<i>.json` (exactly the reference's) and `summary.json` (its keys + fedlora's)."""
    out = check_out_dir(out, overwrite)
    summary = shard_summary(task, plan, mode=mode, total_train=total_train, meta=meta, extra=summary_extra)
    _write_folder(out, task, summary)
    return out


def write_shard_set(out: str | os.PathLike, shards: ShardSet, *, overwrite: bool = False) -> ShardSet:
    """Write shards made in memory (`partition.make_shards`) to `out`; the same set, now with its folder.

    Clients are numbered 1..K on disk, as `fedlora shard` and the reference write them.
    """
    if shards.summary is None or "client_indices" not in shards.summary or shards.task is None:
        raise ValueError("write_shard_set needs shards with a task and a summary (partition.make_shards)")
    if shards.client_ids != list(range(1, len(shards.clients) + 1)):
        raise ValueError(f"write_shard_set numbers clients 1..K, got {shards.client_ids}")
    out = check_out_dir(out, overwrite)
    _write_folder(out, shards.task, shards.summary)
    return replace(shards, directory=out)


def _write_folder(out: Path, task: str, summary: dict[str, Any]) -> None:
    """The client files and summary.json, staged beside `out` and renamed into place.

    A failure leaves nothing behind, and --overwrite never mixes old and new client files (the
    reference's stale-file hazard); it only ever replaces a fedlora shard folder (ownership.SHARDS).
    """
    with staged_dir(out, may_replace=ownership.may_replace(ownership.SHARDS, "--out")) as tmp:
        for i, idx in enumerate(summary["client_indices"], start=1):
            # compact, exactly what the reference's save_shard_manifests writes
            write_bytes(tmp / f"client_{i}.json", json.dumps({"dataset": task, "indices": idx}).encode())
        write_bytes(tmp / SUMMARY_FILE, _summary_text(summary).encode())
