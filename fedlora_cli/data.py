"""Load a GLUE split as plain columns: from the hub through `datasets`, or from a local GLUE folder.

No torch here: sharding needs labels only and must stay fast. Tokenization lives in features.py.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlora_cli.errors import FedloraError, InputError, first_line
from fedlora_cli.tasks import HUB_DATASET, GlueTask, get_task

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


@dataclass(frozen=True)
class RawSplit:
    """One split of a task as columns: the task's text fields, `label`, and any extras (MNLI's genre)."""

    task: str
    split: str
    columns: dict[str, list]
    source: str  # "hub" or the file read

    def __len__(self) -> int:
        return len(self.columns["label"])

    @property
    def labels(self) -> np.ndarray:
        """Class ids (int64), or scores (float64) for regression."""
        dtype = np.float64 if get_task(self.task).is_regression else np.int64
        return np.asarray(self.columns["label"], dtype=dtype)

    def texts(self, field: str) -> list[str]:
        return self.columns[field]

    @property
    def has_labels(self) -> bool:
        """False for test splits: their labels are -1 placeholders (local files and the hub alike)."""
        return not get_task(self.task).is_test(self.split)

    def head(self, n: int | None) -> RawSplit:
        """The first n examples, in order (HF run_glue's `--max_*_samples`)."""
        if n is None or n >= len(self):
            return self
        return RawSplit(self.task, self.split, {k: v[:n] for k, v in self.columns.items()}, self.source)

    def take(self, indices: np.ndarray) -> RawSplit:
        """The examples at `indices`, in that order (the training split without its held-out examples)."""
        idx = [int(i) for i in indices]
        return RawSplit(
            self.task, self.split, {k: [v[i] for i in idx] for k, v in self.columns.items()}, self.source
        )

    def fingerprint(self) -> str:
        """sha256 over the task, the text fields and labels, in order: identifies the data, not the file."""
        task = get_task(self.task)
        h = hashlib.sha256(f"{task.name}\n".encode())
        for field in (*task.text_fields, "label"):
            h.update(json.dumps(self.columns[field], ensure_ascii=False).encode("utf-8"))
        return h.hexdigest()


def load_split(
    task: str | GlueTask,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | None = None,
    max_samples: int | None = None,
) -> RawSplit:
    """A split from `data_dir` (original GLUE layout) if given, else from the hub (or its cache)."""
    task = get_task(task) if isinstance(task, str) else task
    if split != "train" and split not in task.eval_splits and not task.is_test(split):
        raise InputError(
            f"task {task.name} has no split {split!r}: use train, "
            f"{', '.join(task.eval_splits)} or {', '.join(task.test_splits)}"
        )
    if data_dir:  # a local file is parsed only as far as `max_samples` needs
        raw = read_local_split(task, split, data_dir, limit=max_samples).head(max_samples)
    else:
        raw = load_hub_split(task, split, cache_dir).head(max_samples)
    if len(raw) == 0:
        # Training on nothing fails late; evaluating on nothing gives a metric that means nothing.
        raise InputError(f"{raw.source}: the {task.name} {split} split has no examples")
    return raw


# ---------------------------------------------------------------------------------------------------
# local GLUE files


def local_file(task: GlueTask, split: str, data_dir: str | os.PathLike) -> Path:
    return Path(data_dir).expanduser() / task.local.folder / task.local.files[split]


def read_local_split(
    task: GlueTask, split: str, data_dir: str | os.PathLike, limit: int | None = None
) -> RawSplit:
    """Parse one GLUE TSV file in file order: quoting off (sentences contain quotes), BOM stripped.

    With `limit`, parsing stops after that many examples: the same examples as `.head(limit)` of the
    whole file, without reading the rest (SST-2's 67k lines for a 600-example run).
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise InputError(f"--data-dir {data_dir} does not exist or is not a folder")
    path = local_file(task, split, root)
    if not path.is_file():
        expected = ", ".join(f"{task.local.folder}/{f}" for f in task.local.files.values())
        raise InputError(
            f"{path} not found: --data-dir must hold the original GLUE layout ({expected}); "
            f"or leave --data-dir out to use the hub"
        )
    # StringIO(newline="") splits lines exactly as open(newline="") does: csv's own contract
    rows = csv.reader(io.StringIO(_read_text(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    if task.is_test(split):
        rows = list(rows)
        if not rows:
            raise InputError(f"{path} is empty")
        return _read_test_rows(task, split, rows, path)
    return _parse_rows(task, split, path, rows, limit)


# MultiNLI marks a pair its annotators did not agree on with gold_label "-": no example, skipped. Any other
# task's "-" is a bad label like any other (one error naming the line), never a row dropped in silence.
NO_GOLD_LABEL, NO_GOLD_TASKS = "-", ("mnli",)


def _parse_rows(task: GlueTask, split: str, path: Path, rows: Any, limit: int | None) -> RawSplit:
    layout = task.local
    first = next(rows, None)
    if first is None:
        raise InputError(f"{path} is empty")
    data_start = 1
    if layout.has_header:
        header = first
        data_start = 2
        wanted = {**layout.columns, "label": layout.label_column, **layout.extra_columns}
        missing = [str(c) for c in wanted.values() if c not in header]
        if missing:
            raise InputError(
                f"{path} lacks column(s) {', '.join(missing)} (has: {', '.join(header)}): "
                f"is it the {task.local.folder} file of the original GLUE layout?"
            )
        position = {name: header.index(col) for name, col in wanted.items()}
    else:
        position = {**layout.columns, "label": layout.label_column, **layout.extra_columns}
        rows = itertools.chain([first], rows)  # no header: the first row is an example
    width = max(position.values()) + 1

    columns: dict[str, list] = {name: [] for name in position}
    labels = columns["label"]
    for line_no, row in enumerate(rows, start=data_start):
        if limit is not None and len(labels) >= limit:
            break
        if not row:  # trailing blank line
            continue
        if len(row) < width:
            raise InputError(
                f"{path}:{line_no}: expected at least {width} tab-separated fields, got {len(row)}"
            )
        raw_label = row[position["label"]].strip()
        if raw_label == NO_GOLD_LABEL and task.name in NO_GOLD_TASKS:  # not a training or eval example
            continue
        label = _parse_label(task, raw_label, path, line_no)
        for name, pos in position.items():
            columns[name].append(label if name == "label" else row[pos])
    return RawSplit(task.name, split, columns, str(path))


def _read_text(path: Path) -> str:
    """The file as text: UTF-8, a byte-order mark dropped; bytes that are not UTF-8 are one error with the
    line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); GLUE files are UTF-8: re-encode "
            "the file (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _read_test_rows(task: GlueTask, split: str, rows: list[list[str]], path: Path) -> RawSplit:
    """A GLUE test file: a header, the text columns, no labels (label -1, as the hub's test splits)."""
    header, rows = rows[0], rows[1:]
    wanted = dict(task.local.test_columns or task.local.columns)
    missing = [str(c) for c in wanted.values() if c not in header]
    if missing:
        raise InputError(
            f"{path} lacks column(s) {', '.join(missing)} (has: {', '.join(header)}): "
            f"is it the {task.local.folder} test file of the original GLUE layout?"
        )
    wanted.update({k: c for k, c in task.local.extra_columns.items() if c in header})
    position = {name: header.index(str(col)) for name, col in wanted.items()}
    width = max(position.values()) + 1
    columns: dict[str, list] = {name: [] for name in position}
    for line_no, row in enumerate(rows, start=2):
        if not row:
            continue
        if len(row) < width:
            raise InputError(
                f"{path}:{line_no}: expected at least {width} tab-separated fields, got {len(row)}"
            )
        for name, pos in position.items():
            columns[name].append(row[pos])
    n = len(next(iter(columns.values()))) if columns else 0
    columns["label"] = [-1.0 if task.is_regression else -1] * n
    return RawSplit(task.name, split, columns, str(path))


def _parse_label(task: GlueTask, raw: str, path: Path, line_no: int) -> int | float:
    if task.is_regression:
        try:
            return float(raw)
        except ValueError:
            raise InputError(f"{path}:{line_no}: score {raw!r} is not a number") from None
    if raw in task.label_names:  # MNLI / RTE / QNLI spell labels out; map to the hub's ids
        return task.label_names.index(raw)
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 0 <= value < task.num_labels:
        names = ", ".join(task.label_names)
        raise InputError(
            f"{path}:{line_no}: label {raw!r} is neither 0..{task.num_labels - 1} nor one of {names}"
        )
    return value


# ---------------------------------------------------------------------------------------------------
# the hub


def load_hub_split(task: GlueTask, split: str, cache_dir: str | None = None) -> RawSplit:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise FedloraError(f"the `datasets` package is needed to read GLUE from the hub: {e}") from None
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset(HUB_DATASET, task.name, split=split, cache_dir=cache_dir)
    except Exception as e:  # offline, not cached, network errors: all lead to the same advice
        reason = first_line(e)
        raise FedloraError(
            f"GLUE task {task.name} ({split}) is not in the cache and the hub could not be reached "
            f"({reason}): run `fedlora download --task {task.name}` on a machine with internet, "
            f"or pass --data-dir DIR with the original GLUE files"
        ) from None
    wanted = [*task.text_fields, "label", *(c for c in ("genre",) if c in ds.column_names)]
    columns = {name: list(ds[name]) for name in wanted}
    return RawSplit(task.name, split, columns, "hub")
