"""Tests for fedlora_cli.aggregation: factored SVD and naive merges against dense float64 references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora_cli.aggregation import (
    AggregateResult,
    ClientUpdate,
    aggregate_naive,
    aggregate_svd,
    lora_modules,
    lora_rank,
    normalise_weights,
)

PREFIX = "base_model.model.roberta.encoder.layer.0.attention.self"
QUERY, VALUE = f"{PREFIX}.query", f"{PREFIX}.value"
HEAD_W, HEAD_B = "base_model.model.classifier.dense.weight", "base_model.model.classifier.dense.bias"


# --- helpers ------------------------------------------------------------------------------------


def a_key(module: str) -> str:
    return f"{module}.lora_A.weight"


def b_key(module: str) -> str:
    return f"{module}.lora_B.weight"


def random_state(
    seed: int,
    rank: int,
    dims: dict[str, tuple[int, int]],
    dtype: torch.dtype = torch.float32,
    zero_b: bool = False,
) -> dict[str, torch.Tensor]:
    """A PEFT-like adapter state: one A/B pair per module (d_out, d_in) plus a small head."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for module, (d_out, d_in) in dims.items():
        state[a_key(module)] = torch.randn(rank, d_in, generator=g, dtype=dtype)
        b = torch.randn(d_out, rank, generator=g, dtype=dtype)
        state[b_key(module)] = torch.zeros_like(b) if zero_b else b
    state[HEAD_W] = torch.randn(3, 4, generator=g, dtype=dtype)
    state[HEAD_B] = torch.randn(3, generator=g, dtype=dtype)
    return state


def dense_delta(state: dict[str, torch.Tensor], module: str, scaling: float) -> torch.Tensor:
    """s · B · A of one module, formed densely in float64 (the test's reference, never the code's)."""
    return scaling * state[b_key(module)].double() @ state[a_key(module)].double()


def dense_target(clients: list[ClientUpdate], module: str) -> torch.Tensor:
    total = sum(c.weight for c in clients)
    return sum((c.weight / total) * dense_delta(dict(c.state), module, c.scaling) for c in clients)


def dense_truncate(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


DIMS = {QUERY: (24, 20), VALUE: (10, 30)}


def mixed_clients(dtype: torch.dtype = torch.float32) -> list[ClientUpdate]:
    """Three clients of ranks 2, 4, 8 with different scalings and example counts (Σr = 14)."""
    return [
        ClientUpdate(random_state(0, 2, DIMS, dtype), scaling=8.0, weight=100),
        ClientUpdate(random_state(1, 4, DIMS, dtype), scaling=2.0, weight=250),
        ClientUpdate(random_state(2, 8, DIMS, dtype), scaling=0.5, weight=650),
    ]


# --- weights and module discovery ---------------------------------------------------------------


def test_normalise_weights_hand_numbers():
    # Execute
    w = normalise_weights([1, 3])
    # Assert
    assert w.dtype == np.float64
    np.testing.assert_allclose(w, [0.25, 0.75])


def test_normalise_weights_huge_counts_do_not_overflow():
    np.testing.assert_allclose(normalise_weights([1e308, 1e308, 1e308]), [1 / 3] * 3)


@pytest.mark.parametrize(
    "weights, match",
    [
        ([], "at least one"),
        ([10, 0], "client 1"),
        ([10, -5], "client 1"),
        ([float("nan")], "client 0"),
        ([float("inf"), 1], "client 0"),
        ([True, 3], "client 0"),
    ],
)
def test_normalise_weights_rejects(weights, match):
    with pytest.raises(ValueError, match=match):
        normalise_weights(weights)


def test_lora_modules_pairs_a_and_b_by_prefix():
    # Prepare
    state = random_state(0, 2, DIMS)
    # Execute
    modules = lora_modules(state)
    # Assert: the head is not a module; order follows the state
    assert modules == {QUERY: (a_key(QUERY), b_key(QUERY)), VALUE: (a_key(VALUE), b_key(VALUE))}
    assert list(modules) == [QUERY, VALUE]


def test_lora_modules_a_without_b_names_the_key():
    state = random_state(0, 2, DIMS)
    del state[b_key(VALUE)]
    with pytest.raises(ValueError, match=r"value\.lora_A\.weight.*but no.*value\.lora_B\.weight"):
        lora_modules(state)


def test_lora_modules_b_without_a_names_the_key():
    state = random_state(0, 2, DIMS)
    del state[a_key(QUERY)]
    with pytest.raises(ValueError, match=r"query\.lora_B\.weight.*but no"):
        lora_modules(state)


def test_lora_rank():
    assert lora_rank(random_state(0, 4, DIMS)) == 4


def test_lora_rank_modules_disagree():
    state = random_state(0, 4, {QUERY: (6, 6)}) | {
        k: v for k, v in random_state(1, 2, {VALUE: (6, 6)}).items() if "lora" in k
    }
    with pytest.raises(ValueError, match=r"disagree on the rank: \[2, 4\]"):
        lora_rank(state)


def test_lora_rank_no_modules():
    with pytest.raises(ValueError, match="no LoRA modules"):
        lora_rank({HEAD_B: torch.zeros(3)})


def test_lora_rank_a_and_b_do_not_multiply():
    state = {a_key(QUERY): torch.zeros(2, 5), b_key(QUERY): torch.zeros(5, 3)}
    with pytest.raises(ValueError, match=r"\(2, 5\).*\(5, 3\)"):
        lora_rank(state)


def test_client_update_rejects_bad_scaling():
    with pytest.raises(ValueError, match="scaling"):
        ClientUpdate({}, scaling=0.0, weight=1)


# --- svd ----------------------------------------------------------------------------------------


def test_svd_hand_numbers_keeps_the_heavier_direction():
    # Prepare: two rank-1 clients on orthogonal directions, 1 and 3 examples, scaling 1.
    # Target = 0.25 e1 e1^T + 0.75 e2 e2^T; its best rank-1 approximation is 0.75 e2 e2^T.
    e1, e2 = torch.tensor([[1.0], [0.0], [0.0]]), torch.tensor([[0.0], [1.0], [0.0]])
    c0 = ClientUpdate({a_key(QUERY): e1.T.clone(), b_key(QUERY): e1.clone()}, scaling=1.0, weight=1)
    c1 = ClientUpdate({a_key(QUERY): e2.T.clone(), b_key(QUERY): e2.clone()}, scaling=1.0, weight=3)
    # Execute
    res = aggregate_svd([c0, c1], rank=1, alpha=2.0)
    # Assert: s = alpha / rank = 2, so B A = 0.375 e2 e2^T; error = 0.25 / sqrt(0.25² + 0.75²)
    product = 2.0 * res.state[b_key(QUERY)] @ res.state[a_key(QUERY)]
    torch.testing.assert_close(product, 0.75 * e2 @ e2.T)
    assert res.error == pytest.approx(0.25 / math.sqrt(0.625), rel=1e-12)
    assert (res.rank, res.alpha) == (1, 2.0)


@pytest.mark.parametrize("rank", [1, 5, 10])
def test_svd_matches_dense_reference(rank):
    # Prepare
    clients = mixed_clients()
    alpha = 16.0
    # Execute
    res = aggregate_svd(clients, rank=rank, alpha=alpha)
    # Assert: compare products, since the factors are only unique up to a rotation
    for module in DIMS:
        expected = dense_truncate(dense_target(clients, module), rank)
        got = dense_delta(res.state, module, alpha / rank)
        assert rel(got, expected) < 1e-5, module


@pytest.mark.parametrize("rank", [1, 5, 10])
def test_svd_error_equals_dense_truncation_error(rank):
    # Prepare
    clients = mixed_clients()
    # Execute
    res = aggregate_svd(clients, rank=rank, alpha=8.0)
    # Assert: per module, and combined as sqrt(Σ num² / Σ den²)
    num = den = 0.0
    for module in DIMS:
        target = dense_target(clients, module)
        residual = target - dense_truncate(target, rank)
        assert res.module_errors[module] == pytest.approx(rel(dense_truncate(target, rank), target), abs=1e-6)
        num += float(residual.norm() ** 2)
        den += float(target.norm() ** 2)
    assert res.error == pytest.approx(math.sqrt(num / den), abs=1e-6)
    assert res.error > 0.01  # truncation of Σr = 14 to <= 10 really loses something here


def test_svd_rank_at_least_sum_of_ranks_is_exact_and_padded():
    # Prepare: Σr = 14, so rank 16 keeps everything and needs 2 padding rows per module
    dims = {QUERY: (24, 20), VALUE: (16, 40)}
    clients = [
        ClientUpdate(random_state(s, r, dims), scaling=sc, weight=n)
        for s, r, sc, n in [(0, 2, 8.0, 100), (1, 4, 2.0, 250), (2, 8, 0.5, 650)]
    ]
    rank, alpha = 16, 32.0
    # Execute
    res = aggregate_svd(clients, rank=rank, alpha=alpha)
    # Assert
    assert res.error < 1e-6
    for module, (d_out, d_in) in dims.items():
        a, b = res.state[a_key(module)].double(), res.state[b_key(module)].double()
        assert a.shape == (rank, d_in) and b.shape == (d_out, rank)
        assert rel(alpha / rank * b @ a, dense_target(clients, module)) < 1e-5
        assert res.module_errors[module] < 1e-6
        # padding: B's extra columns are zero, A's extra rows are live (non-zero) and orthonormal
        # to each other and to the kept rows, so they get gradient in the next round
        assert torch.all(b[:, 14:] == 0)
        assert torch.all(a[14:].norm(dim=1) > 0.99)
        torch.testing.assert_close(a @ a.T, torch.eye(rank, dtype=torch.float64), atol=1e-5, rtol=0)


def test_svd_result_metadata_dtype_and_layout():
    # Prepare
    clients = mixed_clients()
    # Execute
    res = aggregate_svd(clients, rank=4, alpha=8.0)
    # Assert
    assert isinstance(res, AggregateResult)
    assert (res.rank, res.alpha) == (4, 8.0)
    assert list(res.state) == list(clients[0].state)
    assert set(res.module_errors) == set(DIMS)
    for key, t in res.state.items():
        assert t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous(), key
    assert res.state[a_key(QUERY)].shape == (4, 20)
    assert res.state[b_key(QUERY)].shape == (24, 4)


def test_svd_float64_in_float64_out():
    res = aggregate_svd(mixed_clients(torch.float64), rank=4, alpha=8.0)
    assert all(t.dtype == torch.float64 for t in res.state.values())


def test_svd_rank_larger_than_module_names_module_and_sizes():
    with pytest.raises(ValueError, match=r"rank 11 .*value.*10 x 30"):
        aggregate_svd(mixed_clients(), rank=11, alpha=8.0)


@pytest.mark.parametrize("rank, alpha", [(0, 8.0), (-1, 8.0), (2.5, 8.0), (4, 0.0), (4, -1.0), (4, math.nan)])
def test_svd_rejects_bad_rank_or_alpha(rank, alpha):
    with pytest.raises(ValueError, match="rank|alpha"):
        aggregate_svd(mixed_clients(), rank=rank, alpha=alpha)


# --- naive --------------------------------------------------------------------------------------


def naive_hand_clients() -> list[ClientUpdate]:
    """2x2 factors, rank 2, scaling 1, 1 and 3 examples (weights 0.25 / 0.75)."""
    c0 = {a_key(QUERY): torch.eye(2), b_key(QUERY): 2 * torch.eye(2), HEAD_B: torch.tensor([0.0, 4.0])}
    c1 = {
        a_key(QUERY): 3 * torch.eye(2),
        b_key(QUERY): torch.tensor([[0.0, 4.0], [4.0, 0.0]]),
        HEAD_B: torch.tensor([4.0, 0.0]),
    }
    return [ClientUpdate(c0, scaling=1.0, weight=1), ClientUpdate(c1, scaling=1.0, weight=3)]


def test_naive_is_weighted_mean_of_factors_hand_numbers():
    # Prepare
    clients = naive_hand_clients()
    # Execute
    res = aggregate_naive(clients)
    # Assert: Ā = 0.25 I + 0.75·3 I = 2.5 I;  B̄ = 0.25·2 I + 0.75 [[0,4],[4,0]] = [[0.5,3],[3,0.5]]
    torch.testing.assert_close(res.state[a_key(QUERY)], 2.5 * torch.eye(2))
    torch.testing.assert_close(res.state[b_key(QUERY)], torch.tensor([[0.5, 3.0], [3.0, 0.5]]))
    # target = [[0.5, 9], [9, 0.5]], naive B̄Ā = [[1.25, 7.5], [7.5, 1.25]]:
    # ||diff||² = 2·0.75² + 2·1.5² = 5.625, ||target||² = 2·0.25 + 2·81 = 162.5
    assert res.error == pytest.approx(math.sqrt(5.625 / 162.5), rel=1e-12)
    assert (res.rank, res.alpha) == (2, 2.0)


def test_naive_error_equals_dense_computation():
    # Prepare: equal ranks and scalings, random factors, two modules
    clients = [
        ClientUpdate(random_state(s, 4, DIMS), scaling=2.0, weight=n) for s, n in [(0, 10), (1, 30), (2, 60)]
    ]
    # Execute
    res = aggregate_naive(clients, rank=4, alpha=8.0)
    # Assert
    num = den = 0.0
    for module in DIMS:
        target = dense_target(clients, module)
        got = dense_delta(res.state, module, 2.0)
        # the reported error is of the float64 merge, before the cast back to float32
        assert res.module_errors[module] == pytest.approx(rel(got, target), rel=1e-6)
        num += float((got - target).norm() ** 2)
        den += float(target.norm() ** 2)
    assert res.error == pytest.approx(math.sqrt(num / den), rel=1e-6)
    assert res.error > 0.1  # mean of products is far from the product of means here


def test_naive_identical_clients_is_exact():
    state = random_state(0, 4, DIMS, torch.float64)
    res = aggregate_naive([ClientUpdate(state, 2.0, 5), ClientUpdate(state, 2.0, 7)])
    assert res.error < 1e-12


def test_naive_zero_pads_unequal_ranks_hetlora():
    # Prepare: ranks 2 and 4 at the same scaling, weights 1:3
    small, large = random_state(0, 2, DIMS, torch.float64), random_state(1, 4, DIMS, torch.float64)
    clients = [ClientUpdate(small, 2.0, 1), ClientUpdate(large, 2.0, 3)]
    # Execute
    res = aggregate_naive(clients)
    # Assert: rank 4; the rank-2 client counts as zeros in rows/columns 2..3
    assert (res.rank, res.alpha) == (4, 8.0)
    for module in DIMS:
        a, b = a_key(module), b_key(module)
        padded_a = torch.cat([small[a], torch.zeros(2, small[a].shape[1], dtype=torch.float64)])
        padded_b = torch.cat([small[b], torch.zeros(small[b].shape[0], 2, dtype=torch.float64)], dim=1)
        torch.testing.assert_close(res.state[a], 0.25 * padded_a + 0.75 * large[a])
        torch.testing.assert_close(res.state[b], 0.25 * padded_b + 0.75 * large[b])
        target = dense_target(clients, module)
        assert res.module_errors[module] == pytest.approx(
            rel(dense_delta(res.state, module, 2.0), target), rel=1e-9
        )


def test_naive_unequal_scalings_says_use_svd():
    clients = [ClientUpdate(random_state(0, 2, DIMS), 2.0, 1), ClientUpdate(random_state(1, 2, DIMS), 1.0, 1)]
    with pytest.raises(ValueError, match="scaling.*use svd"):
        aggregate_naive(clients)


@pytest.mark.parametrize("rank, alpha, match", [(1, None, "rank 2.*rank=1"), (None, 5.0, "lora_alpha 2")])
def test_naive_rank_or_alpha_must_match_the_clients(rank, alpha, match):
    with pytest.raises(ValueError, match=match):
        aggregate_naive(naive_hand_clients(), rank=rank, alpha=alpha)


def aggregate(method: str, clients, *, rank: int, alpha: float):
    return {"svd": aggregate_svd, "naive": aggregate_naive}[method](clients, rank=rank, alpha=alpha)


# --- dense keys and weights ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["svd", "naive"])
def test_head_is_averaged_with_example_weights(method):
    # Prepare: 1 and 3 examples -> a 0.25 / 0.75 mix of [0, 4] and [4, 0]
    clients = naive_hand_clients()
    # Execute
    res = aggregate(method, clients, rank=2, alpha=2.0)
    # Assert
    torch.testing.assert_close(res.state[HEAD_B], torch.tensor([3.0, 1.0]))


def test_weights_are_examples_not_batches():
    # Prepare: client 0 trained on 100 examples in 10 batches of 10, client 1 on 300 examples in
    # 3 batches of 100. The caller passes examples; the head must be the 1:3 mix, not the 10:3 one.
    c0 = {a_key(QUERY): torch.eye(2), b_key(QUERY): torch.zeros(2, 2), HEAD_B: torch.tensor([1.0, 0.0])}
    c1 = {a_key(QUERY): torch.eye(2), b_key(QUERY): torch.zeros(2, 2), HEAD_B: torch.tensor([0.0, 1.0])}
    clients = [ClientUpdate(c0, scaling=1.0, weight=100), ClientUpdate(c1, scaling=1.0, weight=300)]
    # Execute
    res = aggregate_svd(clients, rank=2, alpha=2.0)
    # Assert
    torch.testing.assert_close(res.state[HEAD_B], torch.tensor([0.25, 0.75]))
    batch_weighted = torch.tensor([10 / 13, 3 / 13])
    assert not torch.allclose(res.state[HEAD_B], batch_weighted)


# --- checks -------------------------------------------------------------------------------------


def test_no_clients():
    with pytest.raises(ValueError, match="no clients"):
        aggregate_svd([], rank=2, alpha=4.0)


def test_different_key_sets_name_the_client_and_key():
    clients = mixed_clients()
    state = dict(clients[2].state)
    del state[HEAD_B]
    clients[2] = ClientUpdate(state, 1.0, 1, name="client 7")  # messages use the client's id when it has one
    with pytest.raises(ValueError, match=r"client 7 .*missing \['base_model.model.classifier.dense.bias'\]"):
        aggregate_svd(clients, rank=2, alpha=4.0)


def test_dense_shape_mismatch_names_key_and_shapes():
    clients = mixed_clients()
    clients[1] = ClientUpdate(dict(clients[1].state) | {HEAD_W: torch.zeros(3, 5)}, 1.0, 1)
    with pytest.raises(ValueError, match=r"client #2: .*dense.weight.*\(3, 5\).*\(3, 4\)"):
        aggregate_svd(clients, rank=2, alpha=4.0)


def test_module_dims_mismatch_names_module_and_sizes():
    clients = mixed_clients()
    bad = dict(clients[1].state) | {a_key(QUERY): torch.zeros(4, 21)}
    clients[1] = ClientUpdate(bad, 1.0, 1)
    with pytest.raises(ValueError, match=r"query.*client #2 has d_out x d_in = 24 x 21.*24 x 20"):
        aggregate_svd(clients, rank=2, alpha=4.0)


def test_non_floating_tensor_is_rejected():
    clients = mixed_clients()
    clients[0] = ClientUpdate(dict(clients[0].state) | {HEAD_B: torch.zeros(3, dtype=torch.int64)}, 1.0, 1)
    with pytest.raises(ValueError, match=r"client #1: .*dense.bias.*int64"):
        aggregate_naive(clients)


def test_unknown_method_lists_known_ones():
    from fedlora_cli.strategies import get_method

    with pytest.raises(ValueError, match=r"one of svd, naive.*'fedprox'"):
        get_method("fedprox")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method, rank", [("svd", 3), ("svd", 16), ("naive", 4)])
def test_inputs_are_not_mutated(dtype, method, rank):
    # Prepare: float64 included because `.to(float64)` then returns the very same tensor
    dims = {QUERY: (24, 20)}
    clients = [ClientUpdate(random_state(s, 4, dims, dtype), 2.0, n) for s, n in [(0, 1), (1, 2), (2, 3)]]
    before = [{k: v.clone() for k, v in c.state.items()} for c in clients]
    # Execute
    res = aggregate(method, clients, rank=rank, alpha=2.0 * rank)
    # Assert
    for c, b in zip(clients, before, strict=True):
        assert set(c.state) == set(b)
        assert all(torch.equal(c.state[k], b[k]) for k in b)
    assert all(t.dtype == dtype for t in res.state.values())
    assert all(res.state[k] is not c.state[k] for c in clients for k in res.state)


@pytest.mark.parametrize("method, rank", [("svd", 2), ("svd", 4), ("svd", 16), ("naive", 4)])
def test_zero_target_gives_zero_error_and_zero_b(method, rank):
    # Prepare: all B = 0, as right after LoRA init (PEFT initialises B to zero); Σr = 8
    dims = {QUERY: (24, 20), VALUE: (16, 40)}
    clients = [ClientUpdate(random_state(s, 4, dims, zero_b=True), 2.0, 5) for s in (0, 1)]
    # Execute
    res = aggregate(method, clients, rank=rank, alpha=2.0 * rank)
    # Assert
    assert res.error == 0.0
    assert all(e == 0.0 for e in res.module_errors.values())
    for module in res.module_errors:
        assert torch.all(res.state[b_key(module)] == 0)
        a = res.state[a_key(module)]
        assert torch.isfinite(a).all() and a.shape[0] == rank
        assert torch.all(a.norm(dim=1) > 0)  # A stays live so the next round can learn


# --- property -----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_svd_with_enough_rank_reproduces_weighted_sum(data):
    # Prepare: 1-3 clients of ranks 1-3, sizes at least Σr, any rank from Σr to min(d_out, d_in)
    ranks = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=3), label="ranks")
    total = sum(ranks)
    d_out = data.draw(st.integers(total, total + 4), label="d_out")
    d_in = data.draw(st.integers(total, total + 4), label="d_in")
    rank = data.draw(st.integers(total, min(d_out, d_in)), label="rank")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    clients = [
        ClientUpdate(
            random_state(seed + i, r, {QUERY: (d_out, d_in)}, torch.float64),
            scaling=data.draw(st.floats(0.1, 8.0), label="scaling"),
            weight=data.draw(st.integers(1, 10_000), label="examples"),
        )
        for i, r in enumerate(ranks)
    ]
    alpha = data.draw(st.floats(0.5, 64.0), label="alpha")
    # Execute
    res = aggregate_svd(clients, rank=rank, alpha=alpha)
    # Assert
    target = dense_target(clients, QUERY)
    got = dense_delta(res.state, QUERY, alpha / rank)
    assert res.state[a_key(QUERY)].shape == (rank, d_in)
    assert rel(got, target) < 1e-9
    assert res.error < 1e-9
