"""The nine GLUE tasks as data: text fields, labels in the hub's order, eval splits, metrics, local layout."""

from __future__ import annotations

from dataclasses import dataclass, field

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class LocalLayout:
    """Where a task lives in the original GLUE folder layout (as written by `download_glue_data.py`).

    `columns` maps a canonical field (the hub's column name) to the file's column: a header name,
    or an int index for header-less files (CoLA).
    """

    folder: str
    files: dict[str, str]  # split name (hub's) -> file name inside `folder`
    columns: dict[str, str | int]
    label_column: str | int
    has_header: bool = True
    extra_columns: dict[str, str | int] = field(default_factory=dict)  # e.g. MNLI's genre
    test_columns: dict[str, str] | None = None  # test files (no labels, always a header), if named otherwise


@dataclass(frozen=True)
class GlueTask:
    name: str  # canonical, the hub's config name
    text_fields: tuple[str, ...]  # one field (single sentence) or two (pair)
    label_names: tuple[str, ...]  # in the hub's label-id order; empty for regression
    eval_splits: tuple[str, ...]  # hub split names
    metrics: tuple[str, ...]  # metric names, see evaluation.compute_metrics
    main_metric: str
    local: LocalLayout
    test_splits: tuple[str, ...] = ("test",)  # hub split names; unlabelled (the hub's labels are -1)

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        """Size of the model head: 1 for regression (STS-B)."""
        return len(self.label_names) or 1

    def split_label(self, split: str) -> str:
        """Short prefix for metrics of a split when the task has several (MNLI: matched/mismatched)."""
        if len(self.eval_splits) == 1:
            return ""
        return split.removeprefix("validation_")

    def is_test(self, split: str) -> bool:
        """Test splits carry no labels (GLUE keeps them for its leaderboard)."""
        return split in self.test_splits


def _layout(folder: str, columns: dict[str, str | int], label: str | int, **kw) -> LocalLayout:
    files = kw.pop("files", {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"})
    return LocalLayout(folder=folder, files=files, columns=columns, label_column=label, **kw)


TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask(
            "cola",
            ("sentence",),
            ("unacceptable", "acceptable"),
            ("validation",),
            ("mcc", "accuracy"),
            "mcc",
            # CoLA's train/dev files have no header: source, label, original label, sentence; test.tsv has
            # one.
            _layout("CoLA", {"sentence": 3}, 1, has_header=False, test_columns={"sentence": "sentence"}),
        ),
        GlueTask(
            "sst2",
            ("sentence",),
            ("negative", "positive"),
            ("validation",),
            ("accuracy",),
            "accuracy",
            _layout("SST-2", {"sentence": "sentence"}, "label"),
        ),
        GlueTask(
            "mrpc",
            ("sentence1", "sentence2"),
            ("not_equivalent", "equivalent"),
            ("validation",),
            ("accuracy", "f1"),
            "accuracy",
            _layout("MRPC", {"sentence1": "#1 String", "sentence2": "#2 String"}, "Quality"),
        ),
        GlueTask(
            "qqp",
            ("question1", "question2"),
            ("not_duplicate", "duplicate"),
            ("validation",),
            ("accuracy", "f1"),
            "accuracy",
            _layout("QQP", {"question1": "question1", "question2": "question2"}, "is_duplicate"),
        ),
        GlueTask(
            "stsb",
            ("sentence1", "sentence2"),
            (),
            ("validation",),
            ("pearson", "spearman"),
            "pearson",
            _layout(
                "STS-B",
                {"sentence1": "sentence1", "sentence2": "sentence2"},
                "score",
                extra_columns={"genre": "genre"},
            ),
        ),
        GlueTask(
            "mnli",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            ("validation_matched", "validation_mismatched"),
            ("accuracy",),
            "accuracy",
            _layout(
                "MNLI",
                {"premise": "sentence1", "hypothesis": "sentence2"},
                "gold_label",
                files={
                    "train": "train.tsv",
                    "validation_matched": "dev_matched.tsv",
                    "validation_mismatched": "dev_mismatched.tsv",
                    "test_matched": "test_matched.tsv",
                    "test_mismatched": "test_mismatched.tsv",
                },
                extra_columns={"genre": "genre"},
            ),
            test_splits=("test_matched", "test_mismatched"),
        ),
        GlueTask(
            "qnli",
            ("question", "sentence"),
            ("entailment", "not_entailment"),
            ("validation",),
            ("accuracy",),
            "accuracy",
            _layout("QNLI", {"question": "question", "sentence": "sentence"}, "label"),
        ),
        GlueTask(
            "rte",
            ("sentence1", "sentence2"),
            ("entailment", "not_entailment"),
            ("validation",),
            ("accuracy",),
            "accuracy",
            _layout("RTE", {"sentence1": "sentence1", "sentence2": "sentence2"}, "label"),
        ),
        GlueTask(
            "wnli",
            ("sentence1", "sentence2"),
            ("not_entailment", "entailment"),
            ("validation",),
            ("accuracy",),
            "accuracy",
            _layout("WNLI", {"sentence1": "sentence1", "sentence2": "sentence2"}, "label"),
        ),
    ]
}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "").replace("_", "")


_ALIASES = {_normalise(t.name): t.name for t in TASKS.values()} | {
    _normalise(t.local.folder): t.name for t in TASKS.values()
}


def task_names() -> list[str]:
    return list(TASKS)


def get_task(name: str) -> GlueTask:
    """Look a task up by its hub name or its GLUE folder name, case- and dash-insensitive."""
    key = _ALIASES.get(_normalise(name))
    if key is None:
        raise ValueError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return TASKS[key]
