"""GLUE metrics on hand-made inputs, checked against hand computation and scikit-learn / scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from fedlora_cli.evaluation import combine_splits, compute_metrics
from fedlora_cli.tasks import get_task


def test_accuracy_and_f1_by_hand():
    labels = np.array([1, 1, 0, 0, 1])
    preds = np.array([1, 0, 0, 1, 1])
    m = compute_metrics(get_task("mrpc"), preds, labels)
    assert m["accuracy"] == pytest.approx(3 / 5)
    # tp=2, fp=1, fn=1 -> precision 2/3, recall 2/3, f1 2/3
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(f1_score(labels, preds))


def test_matthews_for_cola_by_hand():
    labels = np.array([1, 1, 0, 0])
    preds = np.array([1, 0, 0, 0])
    m = compute_metrics(get_task("cola"), preds, labels)
    # tp=1 tn=2 fp=0 fn=1: (1*2 - 0*1) / sqrt(1*2*2*3)
    assert m["mcc"] == pytest.approx(2 / math.sqrt(12))
    assert m["mcc"] == pytest.approx(matthews_corrcoef(labels, preds))


def test_stsb_correlations():
    labels = np.array([0.0, 1.0, 2.0, 3.0, 5.0])
    preds = np.array([0.5, 0.7, 2.5, 2.9, 4.0])
    m = compute_metrics(get_task("stsb"), preds, labels)
    assert m["pearson"] == pytest.approx(pearsonr(preds, labels)[0])
    assert m["spearman"] == pytest.approx(spearmanr(preds, labels)[0]) and m["spearman"] == pytest.approx(1.0)
    assert compute_metrics(get_task("stsb"), np.ones(5), labels)["pearson"] == 0.0  # constant: no NaN


def test_mnli_reports_both_splits_and_their_mean():
    task = get_task("mnli")
    flat = combine_splits(
        task, {"validation_matched": {"accuracy": 0.8}, "validation_mismatched": {"accuracy": 0.6}}
    )
    assert flat == {"matched_accuracy": 0.8, "mismatched_accuracy": 0.6, "accuracy": pytest.approx(0.7)}
