"""Tokenize a split once and cache it on disk (safetensors); dynamic padding; length-grouped batches."""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlora_cli import atomic
from fedlora_cli.config import DataSpec
from fedlora_cli.data import RawSplit, load_split
from fedlora_cli.errors import OutputError, first_line
from fedlora_cli.tasks import get_task

CACHE_FORMAT = 1  # bump when the cached layout changes: old entries are then simply not found
_CHUNK = 4096  # examples per tokenizer call: bounded memory, regular progress


@dataclass(frozen=True)
class TokenizedSplit:
    """Token ids of every example stored flat (ragged), plus labels: compact, and cheap to cache."""

    ids: np.ndarray  # int32, all examples' ids concatenated
    offsets: np.ndarray  # int64, n + 1: example i is ids[offsets[i]:offsets[i+1]]
    type_ids: np.ndarray | None  # int8 like ids, for models with segment embeddings (BERT); None otherwise
    labels: np.ndarray  # int64 class ids, or float32 scores for regression
    pad_id: int
    fingerprint: str  # cache key: tokenizer + max length + data

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def subset(self, idx: np.ndarray) -> TokenizedSplit:
        """The examples at `idx`, in that order, as a split of their own (the held-out validation split)."""
        idx = np.asarray(idx, dtype=np.int64)
        lengths = self.lengths[idx]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        pieces = [self.ids[self.offsets[i] : self.offsets[i + 1]] for i in idx]
        ids = np.concatenate(pieces) if pieces else self.ids[:0]
        types = None
        if self.type_ids is not None:
            parts = [self.type_ids[self.offsets[i] : self.offsets[i + 1]] for i in idx]
            types = np.concatenate(parts) if parts else self.type_ids[:0]
        return TokenizedSplit(
            ids, offsets, types, self.labels[idx], self.pad_id, f"{self.fingerprint}[subset]"
        )

    def collate(self, idx: np.ndarray) -> dict[str, Any]:
        """A batch padded to its longest example (dynamic padding), as torch tensors on CPU."""
        import torch

        lengths = self.lengths[idx]
        width = int(lengths.max())
        ids = np.full((len(idx), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(idx), width), dtype=np.int64)
        types = np.zeros((len(idx), width), dtype=np.int64) if self.type_ids is not None else None
        for row, (i, n) in enumerate(zip(idx, lengths, strict=True)):
            start = self.offsets[i]
            ids[row, :n] = self.ids[start : start + n]
            mask[row, :n] = 1
            if types is not None:
                types[row, :n] = self.type_ids[start : start + n]
        batch = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if types is not None:
            batch["token_type_ids"] = torch.from_numpy(types)
        batch["labels"] = torch.from_numpy(self.labels[idx])
        return batch


@dataclass(frozen=True)
class TaskData:
    """A task ready for training and evaluation: tokenized splits plus the raw data fingerprints.

    With a held-out validation split (`holdout`), `train` is still the whole training split (shard
    manifests index into it), training uses `train_indices` only, and `validation` is the held-out part.
    """

    task: str
    train: TokenizedSplit | None
    evals: dict[str, TokenizedSplit]
    fingerprints: dict[str, str]  # split -> RawSplit.fingerprint()
    sizes: dict[str, int]
    holdout: Any = None  # holdout.Holdout, or None
    validation: TokenizedSplit | None = None

    @property
    def train_indices(self) -> np.ndarray:
        """The training examples that may be trained on (all but the held-out ones)."""
        if self.holdout is not None:
            return self.holdout.train
        return np.arange(len(self.train) if self.train is not None else 0, dtype=np.int64)

    @property
    def validation_splits(self) -> dict[str, TokenizedSplit]:
        """What the choosing evaluations score: {"validation": …}, or nothing."""
        return {"validation": self.validation} if self.validation is not None else {}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identifies what the tokenizer does (vocabulary, merges, special tokens), not where it came from."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # Truncation/padding are per-call state that the tokenizer remembers; they are not its identity.
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode("utf-8"))
    else:  # slow tokenizers: the vocabulary and special tokens are what matter
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
        h.update(json.dumps(tokenizer.all_special_tokens).encode())
    h.update(json.dumps(list(tokenizer.model_input_names)).encode())
    return h.hexdigest()


def tokenize_split(
    raw: RawSplit,
    tokenizer: Any,
    max_length: int,
    cache_root: Path | None = None,
    progress=None,
    tokenizer_key: str | None = None,
) -> TokenizedSplit:
    """Tokenize `raw` (truncating to `max_length`), reading/writing the on-disk cache when given.

    `tokenizer_key` is `tokenizer_fingerprint(tokenizer)` when the caller has it already (it serialises
    the whole vocabulary: a tenth of a second for MiniLM, more for RoBERTa's vocabulary and merges).
    """
    task = get_task(raw.task)
    key_src = {
        "format": CACHE_FORMAT,
        "tokenizer": tokenizer_key or tokenizer_fingerprint(tokenizer),
        "max_length": max_length,
        "data": raw.fingerprint(),
    }
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    path = (
        cache_root / "tokenized" / task.name / f"{raw.split}-{key[:24]}.safetensors" if cache_root else None
    )
    if path is not None:
        cached = _read_cache(path, key, pad_id)
        if cached is not None:
            return cached

    want_types = "token_type_ids" in tokenizer.model_input_names
    ids_parts, type_parts, lengths = [], [], []
    n = len(raw)
    if progress is not None:
        progress.start("tokenize", f"tokenizing {task.name} {raw.split}", total=n)
    for start in range(0, n, _CHUNK):
        stop = min(n, start + _CHUNK)
        args = [raw.texts(f)[start:stop] for f in task.text_fields]
        enc = tokenizer(
            *args,
            truncation=True,
            max_length=max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=want_types,
        )
        for i, seq in enumerate(enc["input_ids"]):
            ids_parts.append(np.asarray(seq, dtype=np.int32))
            lengths.append(len(seq))
            if want_types:
                type_parts.append(np.asarray(enc["token_type_ids"][i], dtype=np.int8))
        if progress is not None:
            progress.advance("tokenize", stop - start)
    if progress is not None:
        progress.stop("tokenize")

    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, dtype=np.int32)
    type_ids = (
        (np.concatenate(type_parts) if type_parts else np.zeros(0, dtype=np.int8)) if want_types else None
    )
    labels = raw.labels.astype(np.float32 if task.is_regression else np.int64)
    split = TokenizedSplit(ids, offsets, type_ids, labels, pad_id, key)
    if path is not None:
        try:
            _write_cache(path, split)
        except (OutputError, OSError) as e:  # the cache is an optimisation: never a reason to fail
            _cache_unwritable(cache_root, e, progress)
    return split


_WARNED: set[str] = set()  # cache folders already reported as unwritable in this process


def _cache_unwritable(root: Path, error: Exception, progress: Any) -> None:
    """Say once per cache folder that it cannot be written, and go on without it."""
    if str(root) in _WARNED:
        return
    _WARNED.add(str(root))
    cause = error.__cause__ if isinstance(error.__cause__, OSError) else error
    reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else first_line(cause)
    message = (
        f"note: the tokenized-data cache {root} cannot be written ({reason}): tokenizing in memory "
        f"instead; set FEDLORA_CACHE to a writable folder to keep the cache"
    )
    if progress is not None:
        progress.log(message)
    else:
        warnings.warn(message, stacklevel=3)


def _write_cache(path: Path, split: TokenizedSplit) -> None:
    from safetensors.numpy import save

    tensors = {"ids": split.ids, "offsets": split.offsets, "labels": split.labels}
    if split.type_ids is not None:
        tensors["type_ids"] = split.type_ids
    atomic.write_bytes(path, save(tensors, metadata={"key": split.fingerprint, "format": str(CACHE_FORMAT)}))


def _read_cache(path: Path, key: str, pad_id: int) -> TokenizedSplit | None:
    from safetensors import safe_open

    try:
        if not path.is_file():
            return None
        with safe_open(str(path), framework="numpy") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            t = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception:  # a damaged cache entry is rebuilt, never trusted
        return None
    return TokenizedSplit(t["ids"], t["offsets"], t.get("type_ids"), t["labels"], pad_id, key)


def load_task_data(
    spec: DataSpec,
    tokenizer: Any,
    *,
    train: bool = True,
    evals: bool = True,
    hub_cache_dir: str | None = None,
    progress=None,
) -> TaskData:
    """Read and tokenize the splits a command needs; each split is tokenized once, then cached."""
    task = spec.glue_task
    cache = spec.tokenized_cache
    fingerprints, sizes = {}, {}
    tokenizer_key = tokenizer_fingerprint(tokenizer)  # once for all splits

    held = []

    def one(split: str, limit: int | None) -> TokenizedSplit:
        raw = load_split(task, split, data_dir=spec.data_dir, cache_dir=hub_cache_dir, max_samples=limit)
        fingerprints[split] = raw.fingerprint()
        sizes[split] = len(raw)
        if split == "train" and spec.holds_out:
            from fedlora_cli.holdout import holdout_of

            held.append(
                holdout_of(raw, spec.validation_fraction, spec.validation_examples, spec.validation_seed)
            )
        return tokenize_split(raw, tokenizer, spec.max_seq_length, cache, progress, tokenizer_key)

    train_split = one("train", spec.max_train_samples) if train else None
    eval_splits = {s: one(s, spec.max_eval_samples) for s in task.eval_splits} if evals else {}
    holdout = held[0] if held else None
    validation = (
        train_split.subset(holdout.validation) if holdout is not None and train_split is not None else None
    )
    if holdout is not None:
        sizes["validation"] = len(holdout.validation)
    return TaskData(task.name, train_split, eval_splits, fingerprints, sizes, holdout, validation)


def load_test_splits(
    spec: DataSpec, tokenizer: Any, *, hub_cache_dir: str | None = None, progress=None
) -> tuple[dict[str, TokenizedSplit], list[str]]:
    """The task's unlabelled test split(s), tokenized (first `max_eval_samples` of each, if set).

    Returns them and the splits a local `--data-dir` lacks (GLUE copies often ship without test.tsv).
    """
    from fedlora_cli.data import local_file

    task = spec.glue_task
    splits: dict[str, TokenizedSplit] = {}
    missing: list[str] = []
    for split in task.test_splits:
        if spec.data_dir and not local_file(task, split, spec.data_dir).is_file():
            missing.append(split)
            continue
        raw = load_split(
            task, split, data_dir=spec.data_dir, cache_dir=hub_cache_dir, max_samples=spec.max_eval_samples
        )
        splits[split] = tokenize_split(raw, tokenizer, spec.max_seq_length, spec.tokenized_cache, progress)
    return splits, missing


def make_batches(
    lengths: np.ndarray,
    indices: np.ndarray,
    batch_size: int,
    *,
    rng: np.random.Generator | None = None,
    group_by_length: bool = True,
) -> list[np.ndarray]:
    """Split `indices` into batches.

    Training (rng given): shuffle, then, if grouping, sort each mega-batch of 50 batches by length
    and shuffle the batch order — similar lengths share a batch (little padding) while every epoch
    still sees a different order. Evaluation (no rng): longest first, so memory peaks at once.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        return []
    if rng is None:
        order = indices[np.argsort(-lengths[indices], kind="stable")] if group_by_length else indices
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    order = rng.permutation(indices)
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    mega = batch_size * 50
    batches: list[np.ndarray] = []
    for m in range(0, len(order), mega):
        chunk = order[m : m + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return math.ceil(n_examples / batch_size)
