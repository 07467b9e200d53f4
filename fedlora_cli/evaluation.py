"""Predictions on the dev split(s) and GLUE metrics (plain numpy), with throughput."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from fedlora_cli.tasks import GlueTask


def compute_metrics(task: GlueTask, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE's metrics for one split: `predictions` are class ids, or scores for STS-B.

    Plain numpy, with the definitions scikit-learn and scipy use (tests check them against both):
    importing `sklearn.metrics` took ~2 s and ~100 MB (it pulls in pandas and pyarrow) for a few sums.
    """
    out: dict[str, float] = {}
    for name in task.metrics:
        if name == "accuracy":
            out[name] = float(np.mean(predictions == labels)) if len(labels) else 0.0
        elif name == "f1":
            out[name] = binary_f1(predictions, labels)
        elif name == "mcc":
            out[name] = matthews(predictions, labels)
        elif name == "pearson":
            out[name] = pearson(predictions, labels)
        elif name == "spearman":
            out[name] = pearson(average_ranks(predictions), average_ranks(labels))
        else:  # pragma: no cover - tasks.py only names the metrics above
            raise ValueError(f"unknown metric {name!r}")
    return out


def majority_metrics(task: GlueTask, splits: dict) -> dict[str, float]:
    """What a model that always predicts the most frequent training-free answer scores on `splits`: the
    majority class (regression: the mean score, whose correlations are 0). The floor a run must clear to
    have learned anything; reports mark a task whose reference arm does not clear it."""
    per_split = {}
    for split, data in splits.items():
        labels = np.asarray(data.labels)
        if task.is_regression:
            constant = np.full(len(labels), float(labels.mean()) if len(labels) else 0.0)
        else:
            values, counts = np.unique(labels, return_counts=True)
            constant = np.full(len(labels), values[int(np.argmax(counts))] if len(values) else 0)
        per_split[split] = compute_metrics(task, constant, labels)
    return combine_splits(task, per_split) if per_split else {}


def binary_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """F1 of the positive class (1): 2tp / (2tp + fp + fn); 0 when there is no positive at all."""
    pred, true = np.asarray(predictions) == 1, np.asarray(labels) == 1
    tp = int(np.sum(pred & true))
    wrong = int(np.sum(pred != true))
    return 2 * tp / (2 * tp + wrong) if tp + wrong else 0.0


def matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (multi-class form, as scikit-learn's); 0 when either side is constant."""
    classes, encoded = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    true, pred = encoded[: len(labels)], encoded[len(labels) :]
    k = len(classes)
    confusion = np.bincount(true * k + pred, minlength=k * k).reshape(k, k).astype(np.float64)
    t_sum, p_sum = confusion.sum(axis=1), confusion.sum(axis=0)
    n = confusion.sum()
    cov_tp = np.trace(confusion) * n - t_sum @ p_sum
    cov_pp = n * n - p_sum @ p_sum
    cov_tt = n * n - t_sum @ t_sum
    return float(cov_tp / np.sqrt(cov_tt * cov_pp)) if cov_tt * cov_pp > 0 else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r in float64; 0 rather than NaN when either side is constant, so tables stay readable."""
    x = np.asarray(x, dtype=np.float64) - np.mean(x)
    y = np.asarray(y, dtype=np.float64) - np.mean(y)
    norm = np.linalg.norm(x) * np.linalg.norm(y)
    if norm == 0 or not np.isfinite(norm):
        return 0.0
    return float(np.clip(x @ y / norm, -1.0, 1.0))


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing the mean of their ranks (scipy's `rankdata(method="average")`)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    first = np.r_[True, sorted_x[1:] != sorted_x[:-1]]  # where each run of equal values starts
    group = np.cumsum(first) - 1
    starts = np.r_[np.flatnonzero(first), len(x)]
    mean_rank = (starts[:-1] + 1 + starts[1:]) / 2  # positions start+1 .. end, averaged
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = mean_rank[group]
    return ranks


def combine_splits(task: GlueTask, per_split: dict[str, dict[str, float]]) -> dict[str, float]:
    """Flatten per-split metrics: MNLI gets `matched_accuracy`, `mismatched_accuracy` and their mean."""
    if len(per_split) == 1:
        return dict(next(iter(per_split.values())))
    flat: dict[str, float] = {}
    for split, metrics in per_split.items():
        for name, value in metrics.items():
            flat[f"{task.split_label(split)}_{name}"] = value
    for name in task.metrics:
        flat[name] = float(np.mean([m[name] for m in per_split.values()]))
    return flat


@dataclass(frozen=True)
class EvalResult:
    metrics: dict[str, float]  # flat, see combine_splits
    per_split: dict[str, dict[str, float]]
    predictions: dict[str, np.ndarray] = field(repr=False)  # split -> class ids / scores, in data order
    examples: int
    seconds: float
    real_tokens: int
    padded_tokens: int
    split_losses: dict[str, float] = field(default_factory=dict)  # mean cross-entropy (MSE for STS-B)

    @property
    def loss(self) -> float | None:
        """The eval loss over every split, weighted by examples (what the model's own loss would give)."""
        if not self.split_losses or not self.examples:
            return None
        sizes = {s: len(p) for s, p in self.predictions.items()}
        return float(sum(self.split_losses[s] * sizes[s] for s in self.split_losses) / self.examples)

    @property
    def samples_per_second(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / self.seconds if self.seconds > 0 else 0.0


def predict(model, data, batch_size: int, device, precision: str) -> tuple[np.ndarray, int, int]:
    """Raw model outputs (logits, or scores) in data order; batches sorted by length to pad little."""
    import torch

    from fedlora_cli.features import make_batches
    from fedlora_cli.training import autocast, hold_frozen_weights

    hold_frozen_weights(model, precision)
    model.eval()
    lengths = data.lengths
    outputs: np.ndarray | None = None
    real = padded = 0
    with torch.inference_mode():
        for idx in make_batches(lengths, np.arange(len(data)), batch_size, rng=None):
            batch = data.collate(idx)
            batch.pop("labels")
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast(device, precision):
                logits = model(**batch).logits
            values = logits.float().cpu().numpy()
            if outputs is None:
                outputs = np.zeros((len(data), values.shape[1]), dtype=np.float32)
            outputs[idx] = values
            real += int(lengths[idx].sum())
            padded += len(idx) * int(lengths[idx].max())
    if outputs is None:
        outputs = np.zeros((0, 1), dtype=np.float32)
    return outputs, real, padded


def output_loss(task: GlueTask, logits: np.ndarray, labels: np.ndarray) -> float:
    """The loss the model trains on, from its outputs: cross-entropy (float64), or MSE for regression."""
    if len(labels) == 0:
        return float("nan")
    if task.is_regression:
        return float(np.mean((logits[:, 0].astype(np.float64) - labels) ** 2))
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels.astype(np.int64)].mean())


def to_predictions(task: GlueTask, logits: np.ndarray) -> np.ndarray:
    """Class ids (argmax), or the score for regression."""
    return logits[:, 0] if task.is_regression else logits.argmax(axis=1)


def evaluate(model, task: GlueTask, splits: dict, batch_size: int, device, precision: str) -> EvalResult:
    """Predict every eval split and score it."""
    per_split, predictions, losses = {}, {}, {}
    examples = real = padded = 0
    start = time.perf_counter()
    for split, data in splits.items():
        logits, r, p = predict(model, data, batch_size, device, precision)
        preds = to_predictions(task, logits)
        predictions[split] = preds
        per_split[split] = compute_metrics(task, preds, data.labels)
        losses[split] = output_loss(task, logits, data.labels)
        examples += len(data)
        real += r
        padded += p
    seconds = time.perf_counter() - start
    return EvalResult(
        combine_splits(task, per_split), per_split, predictions, examples, seconds, real, padded, losses
    )


# ---------------------------------------------------------------------------------------------------
# per-example predictions, in the format of Hugging Face's run_glue.py


def predictions_file(task: GlueTask, split: str) -> str:
    """run_glue.py's names: `predict_results_<task>.txt` for a test split (MNLI mismatched: `mnli-mm`);
    dev splits get `dev_results_<task>.txt` beside them."""
    kind = "predict" if task.is_test(split) else "dev"
    suffix = "-mm" if split.endswith("mismatched") else ""
    return f"{kind}_results_{task.name}{suffix}.txt"


def predictions_tsv(task: GlueTask, predictions: np.ndarray, labels: np.ndarray | None) -> str:
    """`index<TAB>prediction` (label names; scores to 3 decimals for STS-B), plus `label` when known."""

    def show(value) -> str:
        return f"{float(value):3.3f}" if task.is_regression else task.label_names[int(value)]

    header = "index\tprediction" + ("\tlabel" if labels is not None else "")
    lines = [header]
    for i, value in enumerate(predictions):
        line = f"{i}\t{show(value)}"
        if labels is not None:
            line += f"\t{show(labels[i])}"
        lines.append(line)
    return "\n".join(lines) + "\n"
