"""sharding.py: partition invariants (property tests), label skew, and the reference's manifest format."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora_cli import sharding
from fedlora_cli.errors import InputError, OutputError
from fedlora_cli.sharding import (
    ShardPlan,
    bin_scores,
    make_client_splits,
    read_shards,
    validate_shards,
    write_shards,
)

PARTITION_MODES = ("iid", "category", "dirichlet", "quantity")
OVERLAP_MODES = ("overlap", "category_overlap")
PROPS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problems(draw, min_n: int = 1, max_n: int = 240, max_clients: int = 12):
    """Synthetic labels (1-5 classes), categories (1-6 values), K <= N and a seed."""
    n = draw(st.integers(min_n, max_n))
    n_labels = draw(st.integers(1, 5))
    n_cats = draw(st.integers(1, 6))
    labels = np.asarray(draw(st.lists(st.integers(0, n_labels - 1), min_size=n, max_size=n)), dtype=np.int64)
    cats = np.asarray(
        draw(st.lists(st.sampled_from("abcdef"[:n_cats]), min_size=n, max_size=n)), dtype=object
    )
    k = draw(st.integers(1, min(n, max_clients)))
    seed = draw(st.integers(0, 2**32 - 1))
    return labels, cats, k, seed


def split(labels, cats, k, seed, mode, **kw) -> ShardPlan:
    return make_client_splits(labels, k, mode, seed, categories=cats, **kw)


def assert_sound(plan: ShardPlan, n: int, k: int) -> None:
    """What every mode guarantees: K non-empty, sorted, duplicate-free int64 arrays into 0..N-1."""
    assert len(plan.clients) == k
    for c in plan.clients:
        assert c.dtype == np.int64 and c.size > 0
        assert np.all(np.diff(c) > 0)  # sorted, no duplicates within a client
        assert c.min() >= 0 and c.max() < n


def assert_partition(plan: ShardPlan, n: int) -> None:
    """Disjoint and covering: every example in exactly one client."""
    everything = np.concatenate(plan.clients)
    assert len(everything) == n
    assert np.array_equal(np.sort(everything), np.arange(n))


# ---------------------------------------------------------------------------------------------------
# invariants of every mode


@PROPS
@given(problems(), st.sampled_from(PARTITION_MODES))
def test_partitions_are_disjoint_cover_and_have_no_empty_client(problem, mode):
    labels, cats, k, seed = problem
    try:
        plan = split(labels, cats, k, seed, mode, dirichlet_alpha=1.0)
    except InputError as e:
        # Only the Dirichlet modes may fail, and only by their bounded redraws; the message says what to do.
        assert mode in ("dirichlet", "quantity") and "raise --dirichlet-alpha" in str(e)
        return
    assert_sound(plan, len(labels), k)
    assert_partition(plan, len(labels))


@PROPS
@given(problems(), st.sampled_from(OVERLAP_MODES), st.sampled_from([0.05, 0.2, 0.5, 0.9]))
def test_overlap_modes_share_only_the_pool(problem, mode, ratio):
    labels, cats, k, seed = problem
    plan = split(labels, cats, k, seed, mode, overlap_ratio=ratio)
    n = len(labels)
    assert_sound(plan, n, k)
    pool = plan.params["pool_size"]
    uses = np.bincount(np.concatenate(plan.clients), minlength=n)
    assert (uses >= 2).sum() <= pool  # only pool examples are shared
    assert (uses >= 1).sum() >= n - pool  # everything outside the pool is used, exactly once
    if pool:
        # each client's pool part is ~ratio of its shard: m = round(ratio * unique / (1 - ratio))
        for size, drawn in zip(plan.sizes, plan.params["pool_draws"], strict=True):
            assert drawn == min(pool, round(ratio * (size - drawn) / (1 - ratio)))


@PROPS
@given(problems(), st.sampled_from(PARTITION_MODES + OVERLAP_MODES))
def test_deterministic_for_a_seed(problem, mode):
    labels, cats, k, seed = problem
    try:
        a = split(labels, cats, k, seed, mode)
    except InputError:
        return
    b = split(labels, cats, k, seed, mode)
    assert all(np.array_equal(x, y) for x, y in zip(a.clients, b.clients, strict=True))
    assert a.notes == b.notes and a.params == b.params


@PROPS
@given(problems(min_n=40, max_clients=8), st.sampled_from(("iid", "overlap", "dirichlet", "quantity")))
def test_different_across_seeds(problem, mode):
    labels, cats, k, seed = problem
    if k < 2:
        k = 2
    try:
        plans = [split(labels, cats, k, s, mode, dirichlet_alpha=5.0) for s in (seed, seed + 1, seed + 2)]
    except InputError:
        return
    keys = {tuple(map(tuple, p.clients)) for p in plans}
    assert len(keys) > 1


def test_category_split_depends_on_the_seed():
    labels = np.zeros(60, dtype=np.int64)
    cats = np.asarray(list("abcdef") * 10, dtype=object)
    plans = [make_client_splits(labels, 4, "category", s, categories=cats) for s in range(6)]
    assert len({tuple(map(tuple, p.clients)) for p in plans}) > 1


# ---------------------------------------------------------------------------------------------------
# mode by mode


@PROPS
@given(problems(), st.booleans())
def test_iid_matches_global_label_mix_within_one_example_per_stratum(problem, separate_strata):
    labels, cats, k, seed = problem
    # MNLI-style: strata label|genre, finer than the labels
    strata = labels * 10 + (np.arange(len(labels)) % 3) if separate_strata else None
    plan = split(labels, cats, k, seed, "iid", strata=strata)
    assert_partition(plan, len(labels))
    keys = labels if strata is None else strata
    for g in np.unique(keys):
        share = (keys == g).sum() / k
        for c in plan.clients:
            assert abs((keys[c] == g).sum() - share) < 1
    assert max(plan.sizes) - min(plan.sizes) <= 1


def test_overlap_ratio_zero_is_exactly_iid():
    labels = np.random.default_rng(0).integers(0, 3, 500)
    a = make_client_splits(labels, 7, "iid", 11)
    b = make_client_splits(labels, 7, "overlap", 11, overlap_ratio=0.0)
    assert all(np.array_equal(x, y) for x, y in zip(a.clients, b.clients, strict=True))


def test_overlap_pool_share_per_client():
    labels = np.random.default_rng(1).integers(0, 2, 10_000)
    plan = make_client_splits(labels, 5, "overlap", 3, overlap_ratio=0.2)
    assert plan.params["pool_size"] == 2000
    for size, drawn in zip(plan.sizes, plan.params["pool_draws"], strict=True):
        assert drawn / size == pytest.approx(0.2, abs=0.001)
    assert "shared pool of 2,000 examples" in plan.notes[0]


@PROPS
@given(problems())
def test_category_whole_categories_or_one_category_per_client(problem):
    labels, cats, k, seed = problem
    plan = split(labels, cats, k, seed, "category")
    assert_partition(plan, len(labels))
    n_cats = len(np.unique(cats))
    held = [set(cats[c]) for c in plan.clients]
    assert [sorted(h) for h in held] == plan.client_categories
    if k <= n_cats:
        # no category is split: categories' clients are disjoint
        for a in range(k):
            for b in range(a + 1, k):
                assert not held[a] & held[b]
    else:
        assert all(len(h) == 1 for h in held)
        assert "each client still sees one category" in plan.notes[0]


def test_category_more_clients_than_categories_splits_proportionally():
    labels = np.asarray([0] * 70 + [1] * 30)
    plan = make_client_splits(labels, 5, "category", 0, categories=np.asarray(["pos"] * 70 + ["neg"] * 30))
    # quotas 3.5 and 1.5: floors 3 + 1, the fifth client to the larger remainder (a tie: by name)
    assert plan.params["clients_per_category"] == {"neg": 2, "pos": 3}
    assert sorted(plan.sizes) == [15, 15, 23, 23, 24]
    assert any("'pos' (70 examples) split across clients" in note for note in plan.notes)


def test_category_balances_whole_categories_largest_first():
    cats = np.asarray(["a"] * 50 + ["b"] * 30 + ["c"] * 20 + ["d"] * 10, dtype=object)
    plan = make_client_splits(np.zeros(110, dtype=np.int64), 2, "category", 0, categories=cats)
    # LPT: a -> 1st, b -> 2nd, c -> 2nd (30 < 50), d -> 1st (50 = 50, tie) or 2nd: 60/50 either way
    assert sorted(plan.sizes) == [50, 60]


def test_category_overlap_keeps_one_category_plus_pool():
    labels = np.asarray([0] * 600 + [1] * 400)
    cats = np.where(labels == 0, "neg", "pos").astype(object)
    plan = make_client_splits(labels, 2, "category_overlap", 5, categories=cats, overlap_ratio=0.15)
    assert plan.params["pool_size"] == 150
    for c, held in zip(plan.clients, plan.client_categories, strict=True):
        main = (cats[c] == held[0]).mean()
        assert 0.85 <= main < 1.0  # mostly its category, some of the other from the pool


@PROPS
@given(problems(min_n=50), st.sampled_from([0.5, 2.0, 50.0]))
def test_quantity_keeps_labels_balanced(problem, alpha):
    labels, cats, k, seed = problem
    try:
        plan = split(labels, cats, k, seed, "quantity", dirichlet_alpha=alpha)
    except InputError:
        return
    assert_partition(plan, len(labels))
    n = len(labels)
    for g in np.unique(labels):
        n_g = (labels == g).sum()
        for c in plan.clients:
            assert abs((labels[c] == g).sum() - len(c) * n_g / n) < 1


def test_dirichlet_and_quantity_meet_min_size_or_say_what_to_change():
    labels = np.random.default_rng(2).integers(0, 4, 2000)
    for mode in ("dirichlet", "quantity"):
        plan = make_client_splits(labels, 10, mode, 0, dirichlet_alpha=0.5, min_size=20)
        assert min(plan.sizes) >= 20
        assert plan.params["min_size"] == 20 and plan.params["redraws"] >= 0
    with pytest.raises(InputError, match="raise --dirichlet-alpha, lower --min-size or use fewer clients"):
        make_client_splits(labels[:100], 50, "dirichlet", 0, dirichlet_alpha=0.01, min_size=2, max_redraws=5)


def mean_label_entropy(plan: ShardPlan, labels: np.ndarray, n_labels: int) -> float:
    """Mean over clients of the entropy of the client's label distribution, normalised by log(#labels)."""
    out = []
    for c in plan.clients:
        p = np.bincount(labels[c], minlength=n_labels) / len(c)
        p = p[p > 0]
        out.append(float(-(p * np.log(p)).sum() / np.log(n_labels)))
    return float(np.mean(out))


def test_smaller_alpha_gives_more_label_skew():
    labels = np.random.default_rng(3).integers(0, 5, 20_000)
    alphas = (0.1, 0.5, 1.0, 10.0)
    entropy = [
        np.mean([mean_label_entropy(make_client_splits(labels, 10, "dirichlet", s, dirichlet_alpha=a), labels, 5)
                 for s in range(3)])
        for a in alphas
    ]  # fmt: skip
    assert entropy == sorted(entropy), dict(zip(alphas, entropy, strict=True))
    assert entropy[0] < 0.5 < 0.95 < entropy[-1]
    iid = mean_label_entropy(make_client_splits(labels, 10, "iid", 0), labels, 5)
    assert iid > entropy[-1]


def test_regression_labels_stratify_by_score_bins():
    assert bin_scores(np.asarray([0.0, 0.15, 0.2, 0.6, 4.99, 5.0])).tolist() == [0, 0, 1, 3, 24, 25]
    scores = np.random.default_rng(4).uniform(0, 5, 1000)
    plan = make_client_splits(scores, 4, "iid", 0)
    bins = bin_scores(scores)
    for b in np.unique(bins):
        for c in plan.clients:
            assert abs((bins[c] == b).sum() - (bins == b).sum() / 4) < 1
    plan = make_client_splits(scores, 4, "dirichlet", 0, dirichlet_alpha=1.0)
    assert_partition(plan, 1000)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"clients": 0}, "--clients must be >= 1"),
        ({"clients": 11}, "more than the 10 training examples"),
        ({"mode": "random"}, "unknown sharding mode 'random'"),
        ({"overlap_ratio": 1.0}, "--overlap-ratio must be in [0, 1)"),
        ({"dirichlet_alpha": 0.0}, "--dirichlet-alpha must be > 0"),
        ({"clients": 4, "min_size": 3}, "lower --min-size or use fewer clients"),
    ],
)
def test_bad_arguments(kwargs, pattern):
    args = {"clients": 2, "mode": "iid", "seed": 0} | kwargs
    with pytest.raises(InputError) as e:
        make_client_splits(np.zeros(10, dtype=np.int64), **args)
    assert pattern in str(e.value)


def test_sharding_67k_into_100_clients_is_fast():
    labels = np.random.default_rng(5).integers(0, 2, 67_349)
    cats = np.where(labels == 1, "positive", "negative").astype(object)
    for mode in PARTITION_MODES + OVERLAP_MODES:
        t0 = time.perf_counter()
        plan = make_client_splits(labels, 100, mode, 0, categories=cats, dirichlet_alpha=1.0)
        elapsed = time.perf_counter() - t0
        assert len(plan.clients) == 100
        assert elapsed < 2.0, (mode, elapsed)


# ---------------------------------------------------------------------------------------------------
# manifests


def reference_dir(folder: Path, clients: list[list[int]], task: str = "sst2", summary: bool = True) -> Path:
    """Exactly what the reference's save_shard_manifests writes: compact client files, indent-2 summary."""
    folder.mkdir(parents=True)
    for i, idxs in enumerate(clients):
        with open(folder / f"client_{i + 1}.json", "w") as f:
            json.dump({"dataset": task, "indices": idxs}, f)
    if summary:
        info = {
            "client_indices": clients,
            "size_per_client": [len(c) for c in clients],
            "total_train": sum(len(c) for c in clients),
            "task": task,
            "mode": "iid",
            "meta": {"seed": 123, "overlap_ratio": 0.0, "category_key": None, "bin_stsb": True},
        }
        with open(folder / "summary.json", "w") as f:
            json.dump(info, f, indent=2)
    return folder


def twelve_clients() -> list[list[int]]:
    order = np.random.default_rng(6).permutation(120).tolist()  # the reference writes shuffled order
    return [order[i::12] for i in range(12)]


def test_reads_the_reference_format_in_numeric_client_order(tmp_path):
    clients = twelve_clients()
    shards = read_shards(reference_dir(tmp_path / "ref", clients))
    assert shards.client_ids == list(range(1, 13))  # client_10..12 after client_9
    assert [c.tolist() for c in shards.clients] == clients  # file order within a client kept
    assert shards.task == "sst2" and shards.summary["mode"] == "iid"
    assert shards.sizes == [10] * 12
    validate_shards(shards, "sst2", 120)
    validate_shards(shards, "SST-2", 120)  # task names as elsewhere in fedlora


def test_reads_client_files_without_summary(tmp_path):
    shards = read_shards(reference_dir(tmp_path / "ref", twelve_clients(), summary=False))
    assert shards.summary is None and len(shards.clients) == 12
    validate_shards(shards, "sst2", 120)


def test_fingerprint_tracks_the_assignment(tmp_path):
    clients = twelve_clients()
    a = read_shards(reference_dir(tmp_path / "a", clients)).fingerprint
    assert a == read_shards(reference_dir(tmp_path / "b", clients)).fingerprint
    swapped = [clients[1], clients[0], *clients[2:]]
    assert a != read_shards(reference_dir(tmp_path / "c", swapped)).fingerprint


def test_manifest_round_trip(tmp_path):
    labels = np.random.default_rng(7).integers(0, 2, 300)
    plan = make_client_splits(labels, 11, "dirichlet", 0, dirichlet_alpha=2.0)
    meta = {"seed": 0, "overlap_ratio": 0.0, "category_key": None, "bin_stsb": True}
    out = write_shards(
        tmp_path / "s", "sst2", plan, mode="dirichlet", total_train=300, meta=meta,
        summary_extra={"label_counts": [{"a": 1}] * 11, "train_fingerprint": "f" * 64},
    )  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"client_{i}.json" for i in range(1, 12)] + ["summary.json"]
    )
    client = json.loads((out / "client_10.json").read_text())
    assert set(client) == {"dataset", "indices"} and client["dataset"] == "sst2"
    summary = json.loads((out / "summary.json").read_text())
    for key in ("client_indices", "size_per_client", "total_train", "task", "mode", "meta"):
        assert key in summary
    assert summary["meta"] == meta and summary["total_train"] == 300 and summary["mode"] == "dirichlet"
    assert summary["client_indices"] == [c.tolist() for c in plan.clients]
    assert summary["size_per_client"] == plan.sizes
    assert summary["fedlora_version"] and summary["params"]["dirichlet_alpha"] == 2.0
    shards = read_shards(out)
    assert shards.client_ids == list(range(1, 12))
    assert all(np.array_equal(a, b) for a, b in zip(shards.clients, plan.clients, strict=True))
    validate_shards(shards, "sst2", 300, train_fingerprint="f" * 64)
    with pytest.raises(InputError, match="different sst2 training data"):
        validate_shards(shards, "sst2", 300, train_fingerprint="e" * 64)


def small_plan() -> ShardPlan:
    return make_client_splits(np.asarray([0, 1] * 10), 2, "iid", 0)


def test_write_refuses_an_existing_folder_without_overwrite(tmp_path):
    out = tmp_path / "s"
    write_shards(out, "sst2", small_plan(), mode="iid", total_train=20)
    with pytest.raises(InputError, match="already holds a fedlora shard folder.*--overwrite"):
        write_shards(out, "sst2", small_plan(), mode="iid", total_train=20)
    # --overwrite replaces the whole folder: no stale client files survive (the reference's hazard)
    plan = make_client_splits(np.asarray([0, 1] * 10), 4, "iid", 0)
    write_shards(out, "sst2", plan, mode="iid", total_train=20, overwrite=True)
    write_shards(out, "sst2", small_plan(), mode="iid", total_train=20, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["client_1.json", "client_2.json", "summary.json"]
    read_shards(out)


@pytest.mark.parametrize("foreign", ["thesis.tex", "client_1.json"])
def test_overwrite_never_replaces_what_fedlora_did_not_write(tmp_path, foreign):
    out = tmp_path / "home"
    out.mkdir()
    (out / foreign).write_text("precious")
    with pytest.raises(InputError, match="fedlora did not write"):
        write_shards(out, "sst2", small_plan(), mode="iid", total_train=20, overwrite=True)
    assert (out / foreign).read_text() == "precious"


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return Path(path).write_bytes(data)

    monkeypatch.setattr(sharding, "write_bytes", failing)
    with pytest.raises(OutputError, match="cannot write .*s: disk full"):
        write_shards(tmp_path / "s", "sst2", small_plan(), mode="iid", total_train=20)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a staging leftover


def write_client(folder: Path, i: int, content: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"client_{i}.json").write_text(content)


@pytest.mark.parametrize(
    ("files", "pattern"),
    [
        ({}, "no client_*.json in"),
        ({1: "{not json"}, "is not valid JSON"),
        ({1: '{"dataset": "sst2"}'}, 'has no "indices"'),
        ({1: '{"dataset": "sst2", "indices": [1, 2.5]}'}, "must be a list of integers"),
        ({1: '{"dataset": "sst2", "indices": [1, true]}'}, "must be a list of integers"),
        ({1: '{"dataset": "sst2", "indices": "1,2"}'}, "must be a list of integers"),
        ({1: '{"dataset": "sst2", "indices": [3, -1]}'}, "negative index (-1)"),
        (
            {1: '{"dataset": "sst2", "indices": [1]}', 2: '{"dataset": "rte", "indices": [2]}'},
            "different datasets",
        ),
    ],
)
def test_read_errors(tmp_path, files, pattern):
    folder = tmp_path / "s"
    folder.mkdir()
    for i, text in files.items():
        write_client(folder, i, text)
    with pytest.raises(InputError) as e:
        read_shards(folder)
    assert pattern in str(e.value)


def test_read_errors_missing_folder_and_stale_files(tmp_path):
    with pytest.raises(InputError, match="does not exist: run `fedlora shard"):
        read_shards(tmp_path / "nope")
    folder = reference_dir(tmp_path / "ref", [[0, 1], [2, 3]])
    write_client(folder, 3, '{"dataset": "sst2", "indices": [4, 5]}')  # left over from an earlier run
    with pytest.raises(InputError, match="stale files"):
        read_shards(folder)


def test_validate_errors(tmp_path):
    shards = read_shards(reference_dir(tmp_path / "a", [[0, 1], [2, 3]]))
    with pytest.raises(InputError, match="holds shards of sst2, not rte: pass --task sst2"):
        validate_shards(shards, "rte", 4)
    with pytest.raises(InputError, match="made for 4 training examples.*--max-train-samples 4"):
        validate_shards(shards, "sst2", 100)
    no_summary = read_shards(reference_dir(tmp_path / "b", [[0, 1], [2, 9]], summary=False))
    with pytest.raises(InputError) as e:
        validate_shards(no_summary, "sst2", 5)
    assert "client 2" in str(e.value) and "index 9" in str(e.value) and "5 examples" in str(e.value)
    # the reference's category mode with more clients than categories: empty clients
    empty = read_shards(reference_dir(tmp_path / "c", [[0, 1], [2, 3], []]))
    with pytest.raises(InputError, match="client\\(s\\) 3 .* have no examples"):
        validate_shards(empty, "sst2", 4)
