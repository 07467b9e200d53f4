"""GLUE metrics on hand-made inputs, checked against hand computation and scikit-learn / scipy.

fedlora computes them in plain numpy (importing sklearn.metrics costs seconds and ~100 MB); these tests
hold them to the reference implementations, ties and degenerate cases included.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef

from fedlora_cli.evaluation import average_ranks, combine_splits, compute_metrics
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


def test_numpy_metrics_match_sklearn_and_scipy_on_random_inputs():
    from scipy.stats import rankdata

    rng = np.random.default_rng(0)
    for trial in range(30):
        n = int(rng.integers(2, 60))
        k = int(rng.integers(2, 4))
        labels, preds = rng.integers(0, k, n), rng.integers(0, k, n)
        if trial % 5 == 0:
            preds = np.full(n, int(rng.integers(0, k)))  # constant prediction
        cola, mrpc = get_task("cola"), get_task("mrpc")
        assert compute_metrics(cola, preds, labels)["mcc"] == pytest.approx(
            matthews_corrcoef(labels, preds), abs=1e-12
        )
        binary_labels, binary_preds = labels % 2, preds % 2
        f1 = compute_metrics(mrpc, binary_preds, binary_labels)["f1"]
        assert f1 == pytest.approx(f1_score(binary_labels, binary_preds, zero_division=0.0), abs=1e-12)
        scores = np.round(rng.normal(size=n), 1)  # rounding makes ties
        gold = np.round(rng.uniform(0, 5, n), 0)
        np.testing.assert_array_equal(average_ranks(scores), rankdata(scores))
        m = compute_metrics(get_task("stsb"), scores, gold)
        if np.std(gold) > 0:
            assert m["pearson"] == pytest.approx(pearsonr(scores, gold)[0], abs=1e-9)
            assert m["spearman"] == pytest.approx(spearmanr(scores, gold)[0], abs=1e-9)


def test_no_positive_class_gives_f1_zero_not_an_error():
    assert compute_metrics(get_task("mrpc"), np.zeros(4, int), np.zeros(4, int)) == {
        "accuracy": 1.0,
        "f1": 0.0,
    }


def test_majority_metrics_are_what_a_constant_answer_scores():
    from types import SimpleNamespace

    from fedlora_cli.evaluation import majority_metrics
    from fedlora_cli.tasks import get_task

    split = SimpleNamespace(labels=np.array([1, 1, 1, 0]))
    assert majority_metrics(get_task("sst2"), {"validation": split}) == {"accuracy": 0.75}
    cola = majority_metrics(get_task("cola"), {"validation": split})
    assert cola["mcc"] == 0.0  # a constant answer has no correlation
    mrpc = majority_metrics(get_task("mrpc"), {"validation": split})
    assert mrpc["accuracy"] == 0.75 and mrpc["f1"] == pytest.approx(2 * 3 / (2 * 3 + 1))
    stsb = majority_metrics(
        get_task("stsb"), {"validation": SimpleNamespace(labels=np.array([0.5, 4.0, 2.0]))}
    )
    assert stsb["pearson"] == 0.0 and stsb["spearman"] == 0.0
