"""Client-level differential privacy (DP-FedAvg): clipping, noise, the accountant, and `fedlora rounds --dp-*`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("dp_accounting", reason="the `privacy` extra is not installed")

import dp_accounting  # noqa: E402
from clitools import one_error_line, run  # noqa: E402
from dp_accounting.rdp import RdpAccountant  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from test_rounds import write_manifests  # noqa: E402

from fedlora_cli import privacy  # noqa: E402
from fedlora_cli.aggregation import ClientUpdate  # noqa: E402
from fedlora_cli.config import AggregationSpec, LoraSpec, PrivacySpec, SvdOptions  # noqa: E402
from fedlora_cli.strategies import build_strategy  # noqa: E402
from fedlora_cli.strategies.base import GlobalAdapter  # noqa: E402
from fedlora_cli.strategies.privacy import PrivacyStrategy  # noqa: E402

LORA = LoraSpec(r=2, alpha=4.0)
MODULES = ("m0", "m1")
D_OUT, D_IN = 6, 5


def random_state(gen: torch.Generator, rank: int = 2, scale: float = 1.0) -> dict[str, torch.Tensor]:
    state = {}
    for m in MODULES:
        state[f"{m}.lora_A.weight"] = torch.randn(rank, D_IN, generator=gen) * scale
        state[f"{m}.lora_B.weight"] = torch.randn(D_OUT, rank, generator=gen) * scale
    state["classifier.weight"] = torch.randn(2, D_IN, generator=gen) * scale
    return state


def moved(state: dict[str, torch.Tensor], gen: torch.Generator, scale: float) -> dict[str, torch.Tensor]:
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def wrapped(
    method: str, clients: int, per_round: int, seed: int = 7, rank: int | None = None, **dp
) -> PrivacyStrategy:
    spec = AggregationSpec(method, svd=SvdOptions(rank=rank))
    inner = build_strategy(spec, LORA, seed=seed, client_ids=range(1, clients + 1))
    return PrivacyStrategy(inner, PrivacySpec(**dp), clients=clients, per_round=per_round, seed=seed)


def one_round(strategy, broadcast, states, round_no=1, sampled=None):
    """Plan every client, then aggregate the given states (fewer than planned: the rest failed)."""
    planned = sampled or len(states)
    for cid in range(1, planned + 1):
        strategy.plan(round_no, cid, broadcast)
    updates = [ClientUpdate(s, scaling=LORA.scaling, weight=100) for s in states]
    return strategy.aggregate(round_no, broadcast, updates, sampled=planned)


def product(state, key_prefix, scaling):
    return (
        scaling
        * state[f"{key_prefix}.lora_B.weight"].double()
        @ state[f"{key_prefix}.lora_A.weight"].double()
    )


# ---------------------------------------------------------------------------------------------------
# maths on tensors


@pytest.mark.parametrize("space", privacy.SPACES)
def test_a_clipped_update_has_norm_at_most_c(space):
    gen = torch.Generator().manual_seed(0)
    ref = random_state(gen)
    state = moved(ref, gen, 0.5)
    norm = privacy.update_norm(state, ref, space=space, scaling=LORA.scaling)
    for c in (norm / 10, norm / 2, norm * 0.999):
        clipped, before = privacy.clip_client_update(state, ref, c, space=space, scaling=LORA.scaling)
        assert before == pytest.approx(norm, rel=1e-12)
        after = privacy.update_norm(clipped, ref, space=space, scaling=LORA.scaling)
        assert after <= c * (1 + 1e-6) and after >= c * 0.999  # clipped to C, not below
        assert set(clipped) == set(state) and all(clipped[k].shape == state[k].shape for k in state)
    same, _ = privacy.clip_client_update(state, ref, norm * 2, space=space, scaling=LORA.scaling)
    assert all(torch.equal(same[k], state[k]) for k in state)  # under C: untouched
    # product space: the norm is that of the dense ΔW = s·B·A − s·B0·A0 (and the head's delta)
    dense = sum(float((product(state, m, 2.0) - product(ref, m, 2.0)).square().sum()) for m in MODULES)
    head = float((state["classifier.weight"].double() - ref["classifier.weight"].double()).square().sum())
    flat = sum(float((state[k].double() - ref[k].double()).square().sum()) for k in state)
    expected = dense + head if space == "product" else flat
    assert norm == pytest.approx(math.sqrt(expected), rel=1e-10)


def test_the_noise_has_the_right_standard_deviation_over_many_draws():
    draws = privacy.gaussian(privacy.noise_generator([3], 1), (400_000,), 0.7)
    assert draws.dtype == torch.float64
    assert float(draws.mean()) == pytest.approx(0.0, abs=0.7 * 5 / math.sqrt(400_000))
    assert float(draws.std()) == pytest.approx(0.7, rel=0.01)
    again = privacy.gaussian(privacy.noise_generator([3], 1), (400_000,), 0.7)
    assert torch.equal(draws, again)  # same key and round: the same noise (reruns, resumes)
    assert not torch.equal(draws, privacy.gaussian(privacy.noise_generator([3], 2), (400_000,), 0.7))


@pytest.mark.parametrize("method", ["naive", "svd"])
def test_the_mechanism_adds_noise_of_std_z_c_over_m_to_the_mean(method):
    # every client sends back the broadcast (zero update): the new global minus the broadcast is the noise
    # alone, N(0, (z·C/m)²) per coordinate of the update space: A, B and head entries for naive; for svd
    # the entries of the dense ΔW (at --svd-rank = d_in nothing is truncated) and of the head
    z, c, m = 1.5, 2.0, 4
    gen = torch.Generator().manual_seed(1)
    broadcast = GlobalAdapter({k: v.double() for k, v in random_state(gen).items()}, LORA)
    noise: list[torch.Tensor] = []
    for seed in range(200):  # one round of 200 runs (round 1's ε is computed once)
        strategy = wrapped(method, 10, m, seed=seed, rank=D_IN if method == "svd" else None, clip=c,
                           noise_multiplier=z)  # fmt: skip
        out = one_round(strategy, broadcast, [broadcast.state] * m)
        head = out.adapter.state["classifier.weight"] - broadcast.state["classifier.weight"]
        noise.append(head.flatten())
        if method == "naive":  # factor space: every A and B entry gets its own draw
            noise += [
                (out.adapter.state[k] - broadcast.state[k]).flatten() for k in broadcast.state if "lora" in k
            ]
        else:  # product space: every entry of s·B·A
            s_out = out.adapter.lora.scaling
            noise += [(product(out.adapter.state, p, s_out) - product(broadcast.state, p, LORA.scaling)).flatten()
                      for p in MODULES]  # fmt: skip
        assert out.record["privacy"]["noise_std"] == z * c
    values = torch.cat(noise)
    assert float(values.std()) == pytest.approx(z * c / m, rel=0.03)
    assert float(values.mean()) == pytest.approx(0.0, abs=5 * z * c / m / math.sqrt(values.numel()))


@pytest.mark.parametrize("method", ["naive", "svd"])
def test_z_zero_and_c_inf_give_bit_for_bit_the_method_without_dp(method):
    # DP-FedAvg's mean is unweighted: at equal example counts it is the method's own weighted mean
    gen = torch.Generator().manual_seed(2)
    broadcast = GlobalAdapter(random_state(gen), LORA)
    states = [moved(broadcast.state, gen, 0.3) for _ in range(3)]
    plain = build_strategy(AggregationSpec(method), LORA, seed=7, client_ids=[1, 2, 3])
    expected = plain.aggregate(1, broadcast, [ClientUpdate(s, LORA.scaling, 100) for s in states], sampled=3)
    got = one_round(wrapped(method, 3, 3, clip=math.inf, noise_multiplier=0.0), broadcast, states)
    assert set(got.adapter.state) == set(expected.adapter.state)
    for k, v in expected.adapter.state.items():
        assert got.adapter.state[k].dtype == v.dtype and torch.equal(got.adapter.state[k], v), k
    assert got.adapter.lora == expected.adapter.lora
    assert got.record["privacy"]["epsilon"] == math.inf and got.record["privacy"]["clipped"] == 0


@pytest.mark.parametrize("method", ["naive", "svd"])
def test_mixed_client_ranks_and_a_failed_client(method):
    # --client-ranks 2,1,2: each reply is measured against the adapter its client was sent (its rank);
    # without noise or clipping the result is the method's own (zero-padding / FlexLoRA) at equal weights
    gen = torch.Generator().manual_seed(5)
    broadcast = GlobalAdapter(random_state(gen), LORA)
    spec = AggregationSpec(method, client_ranks="2,1,2")
    plain = build_strategy(spec, LORA, seed=7, client_ids=[1, 2, 3])
    dp = PrivacyStrategy(build_strategy(spec, LORA, seed=7, client_ids=[1, 2, 3]),
                         PrivacySpec(clip=math.inf, noise_multiplier=0.0), clients=3, per_round=3, seed=7)  # fmt: skip
    plans = [dp.plan(1, c, broadcast) for c in (1, 2, 3)]
    assert [p.adapter.lora.r for p in plans] == [2, 1, 2]
    states = [moved(p.adapter.state, gen, 0.3) for p in plans]
    updates = [ClientUpdate(s, p.adapter.lora.scaling, 50) for s, p in zip(states, plans, strict=True)]
    expected = plain.aggregate(1, broadcast, updates, sampled=3)
    got = dp.aggregate(1, broadcast, updates, sampled=3)
    for k, v in expected.adapter.state.items():
        assert torch.equal(got.adapter.state[k], v), k
    # client 2 (rank 1) fails: it counts as the adapter it was sent, with the same 1/3 weight
    again = PrivacyStrategy(build_strategy(spec, LORA, seed=7, client_ids=[1, 2, 3]),
                            PrivacySpec(clip=math.inf, noise_multiplier=0.0), clients=3, per_round=3, seed=7)  # fmt: skip
    [again.plan(1, c, broadcast) for c in (1, 2, 3)]
    partial = again.aggregate(1, broadcast, [updates[0], updates[2]], sampled=3)
    as_sent = [
        updates[0],
        ClientUpdate(plans[1].adapter.state, plans[1].adapter.lora.scaling, 50),
        updates[2],
    ]
    reference = plain.aggregate(1, broadcast, as_sent, sampled=3)
    for k, v in reference.adapter.state.items():
        torch.testing.assert_close(partial.adapter.state[k], v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["naive", "svd"])
def test_clipping_bounds_each_clients_contribution_and_missing_replies_count_as_zero(method):
    gen = torch.Generator().manual_seed(3)
    broadcast = GlobalAdapter({k: v.double() for k, v in random_state(gen).items()}, LORA)
    big = moved(broadcast.state, gen, 5.0)  # far beyond C
    space = "factors" if method == "naive" else "product"
    c = 0.25
    out = one_round(wrapped(method, 10, 4, clip=c, noise_multiplier=0.0), broadcast, [big], sampled=4)
    record = out.record["privacy"]
    assert record["clipped"] == 1 and record["sampled"] == 4 and record["space"] == space
    assert record["norms"]["max"] == pytest.approx(
        privacy.update_norm(big, broadcast.state, space=space, scaling=LORA.scaling)
    )
    # one reply of four sampled: the global moves by the clipped update / 4 (fixed denominator)
    if method == "naive":
        step = privacy.update_norm(out.adapter.state, broadcast.state, space="factors")
        assert step == pytest.approx(c / 4, rel=1e-9)
    else:  # the mean of the products moves by C/4; the rank-R truncation can only shorten that step
        step = privacy.update_norm(out.adapter.state, broadcast.state, space="product", scaling=LORA.scaling)
        assert step <= c / 4 * (1 + 1e-9)


def test_dp_where_client_plans_say_clip_and_the_server_refuses_an_unclipped_update():
    gen = torch.Generator().manual_seed(4)
    broadcast = GlobalAdapter(random_state(gen), LORA)
    for method, space in (("naive", "factors"), ("svd", "product")):
        strategy = wrapped(method, 3, 3, clip=0.5, noise_multiplier=1.0, where="client")
        plan = strategy.plan(1, 1, broadcast)
        assert plan.clip_norm == 0.5 and plan.clip_space == space
        raw = moved(broadcast.state, gen, 1.0)
        reason = strategy.check_update(plan, ClientUpdate(raw, LORA.scaling, 10))
        assert reason is not None and "did not clip" in reason
        clipped, _ = privacy.clip_client_update(raw, broadcast.state, 0.5, space=space, scaling=LORA.scaling)
        assert strategy.check_update(plan, ClientUpdate(clipped, LORA.scaling, 10)) is None


def test_secret_noise_key_is_saved_with_the_round_and_restored_on_resume():
    a = wrapped("naive", 3, 3, clip=1.0, noise_multiplier=1.0, secret_noise=True)
    b = wrapped("naive", 3, 3, clip=1.0, noise_multiplier=1.0, secret_noise=True)
    assert a.noise_key != b.noise_key and a.noise_key != [7]  # drawn from the OS, not the seed
    b.load_state_dict(a.state_dict())
    assert b.noise_key == a.noise_key
    seeded = wrapped("naive", 3, 3, clip=1.0, noise_multiplier=1.0)
    assert seeded.noise_key == [7] and seeded.state_dict() == {}
    with pytest.raises(ValueError, match="secret-noise"):
        seeded.load_state_dict(a.state_dict())


# ---------------------------------------------------------------------------------------------------
# accounting


def library_epsilon(clients: int, per_round: int, z: float, rounds: int, delta: float) -> float:
    """dp-accounting called directly: fixed-size sampling without replacement, replace-one neighbours
    (sensitivity 2C, so the Gaussian's noise multiplier is z/2)."""
    accountant = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    accountant.compose(
        dp_accounting.SampledWithoutReplacementDpEvent(
            clients, per_round, dp_accounting.GaussianDpEvent(z / 2)
        ),
        rounds,
    )
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize(
    "clients,per_round,z,rounds", [(10, 10, 2.0, 3), (100, 10, 1.0, 20), (1000, 30, 0.8, 5)]
)
def test_epsilon_is_the_accountants(clients, per_round, z, rounds):
    eps = privacy.epsilon(clients=clients, per_round=per_round, noise_multiplier=z, rounds=rounds,
                          delta=1 / clients**2)  # fmt: skip
    assert eps == library_epsilon(clients, per_round, z, rounds, 1 / clients**2)
    assert 0 < eps < math.inf
    assert (
        privacy.epsilon(clients=clients, per_round=per_round, noise_multiplier=0.0, rounds=1, delta=0.1)
        == math.inf
    )


def test_rounds_within_finds_the_last_round_under_the_target():
    kw = {
        "clients": 10,
        "per_round": 10,
        "noise_multiplier": 3.0,
        "delta": 1e-4,
    }  # all sampled: fast to account
    eps = [privacy.epsilon(rounds=t, **kw) for t in range(1, 31)]
    target = (eps[11] + eps[12]) / 2  # between rounds 12 and 13
    last, spent, nxt = privacy.rounds_within(target, rounds=30, **kw)
    assert (last, spent, nxt) == (12, eps[11], eps[12])
    assert privacy.rounds_within(eps[-1], rounds=30, **kw) == (30, eps[-1], math.inf)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"clip": 1.0}, "go together"),
        ({"delta": 0.1}, "--dp-delta needs --dp-clip"),
        ({"clip": 0.0, "noise_multiplier": 1.0}, "--dp-clip must be a number > 0"),
        ({"clip": math.inf, "noise_multiplier": 1.0}, "--dp-clip inf needs --dp-noise-multiplier 0"),
        ({"clip": 1.0, "noise_multiplier": math.nan}, "--dp-noise-multiplier must be a finite"),
        ({"clip": 1.0, "noise_multiplier": 1.0, "delta": 1.0}, "--dp-delta must be in (0, 1)"),
        ({"clip": 1.0, "noise_multiplier": 1.0, "where": "both"}, "--dp-where must be server or client"),
        ({"clip": 1.0, "noise_multiplier": 1.0, "target_epsilon": math.inf}, "--dp-target-epsilon must be"),
    ],
)
def test_privacy_spec_names_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=__import__("re").escape(message)):
        PrivacySpec(**kwargs)


def test_delta_defaults_to_one_over_clients_squared():
    assert PrivacySpec(clip=1.0, noise_multiplier=1.0).delta_for(20) == 1 / 400
    assert PrivacySpec(clip=1.0, noise_multiplier=1.0, delta=1e-6).delta_for(20) == 1e-6


# ---------------------------------------------------------------------------------------------------
# `fedlora rounds --dp-*` on the tiny model

FAST = ["--local-epochs", "1", "--learning-rate", "2e-2", "--precision", "fp32", "--batch-size", "16",
        "--max-eval-samples", "64", "--no-eval-each-round"]  # fmt: skip
DP = ["--dp-clip", "0.5", "--dp-noise-multiplier", "0.8", "--clients-per-round", "2"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    # equal shard sizes: DP-FedAvg's unweighted mean is then the methods' example-weighted one
    order = np.random.default_rng(0).permutation(600).tolist()
    return write_manifests(
        tmp_path_factory.mktemp("shards") / "k3", [order[:80], order[80:160], order[160:240]]
    )


def dp_args(model, glue, shards, root, name, *extra):
    return ["rounds", "--task", "sst2", "--model", model, "--data-dir", glue, "--shards", shards,
            "--output-root", root, "--run-name", name, *FAST, *extra]  # fmt: skip


def history(run_dir: Path) -> list[dict]:
    """The rounds' rows (round 0, the starting adapter's evaluation, left out)."""
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return [r for r in rows if r["round"] > 0]


def adapter_bytes(run_dir: Path, sub: str) -> bytes:
    return (run_dir / sub / "adapter" / "adapter_model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def noisy(tiny_model, glue_dir, shards, tmp_path_factory):
    """3 rounds with DP on: 2 of 3 clients per round, clip 0.5, z = 0.8, noise seeded from --seed."""
    root = tmp_path_factory.mktemp("runs")
    result = run(
        *dp_args(tiny_model, glue_dir, shards, root, "noisy", "--rounds", "3", *DP), env={"COLUMNS": "160"}
    )
    assert result.exit_code == 0, result.stderr
    return root / "sst2_tiny-roberta" / "noisy", result


@pytest.mark.slow
def test_history_records_epsilon_of_the_accountant_clipping_and_norms(noisy):
    run_dir, result = noisy
    rows = history(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row in rows:
        p = row["aggregation"]["privacy"]
        assert p["epsilon"] == library_epsilon(3, 2, 0.8, row["round"], 1 / 9)  # δ = 1 / clients²
        assert p["delta"] == 1 / 9 and p["noise_std"] == pytest.approx(0.4) and p["sampled"] == 2
        assert p["space"] == "product" and p["where"] == "server" and p["noise"] == "seeded"
        norms = p["norms"]
        assert 0 < norms["min"] <= norms["median"] <= norms["max"]
        assert p["clipped"] == (norms["min"] > 0.5) + (norms["max"] > 0.5)  # two clients per round
    assert rows[0]["aggregation"]["privacy"]["epsilon"] < rows[2]["aggregation"]["privacy"]["epsilon"]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["config"]["privacy"] == {"clip": 0.5, "noise_multiplier": 0.8, "delta": None, "where": "server",
                                           "target_epsilon": None, "secret_noise": False}  # fmt: skip
    flat = " ".join(result.stdout.split())
    assert "ε" in flat and "clipped" in flat
    assert "differential privacy: clip 0.5" in " ".join(result.stderr.split())


@pytest.mark.slow
def test_z_zero_and_c_inf_give_the_same_final_adapter_as_no_dp(tiny_model, glue_dir, shards, tmp_path):
    plain = run(*dp_args(tiny_model, glue_dir, shards, tmp_path, "plain", "--rounds", "2"))
    assert plain.exit_code == 0, plain.stderr
    off = run(*dp_args(tiny_model, glue_dir, shards, tmp_path, "inf", "--rounds", "2",
                       "--dp-clip", "inf", "--dp-noise-multiplier", "0"))  # fmt: skip
    assert off.exit_code == 0, off.stderr
    a, b = tmp_path / "sst2_tiny-roberta" / "plain", tmp_path / "sst2_tiny-roberta" / "inf"
    for sub in ("round_001/global", "round_002/global", "final"):
        assert adapter_bytes(a, sub) == adapter_bytes(b, sub), sub
    p = history(b)[1]["aggregation"]["privacy"]
    assert p["epsilon"] == math.inf and p["clipped"] == 0 and p["noise_std"] == 0


@pytest.mark.slow
def test_resume_after_an_interruption_is_bit_identical_with_dp(tiny_model, glue_dir, shards, noisy, tmp_path,
                                                               monkeypatch):  # fmt: skip
    from fedlora_cli.federation import local

    real = local.train_client
    reference, _ = noisy
    second = history(reference)[1]["clients"][-1]

    def interrupt_in_round_two(model, data, indices, plan, *args, **kwargs):
        if (kwargs["round_no"], plan.client_id) == (2, second):
            raise KeyboardInterrupt
        return real(model, data, indices, plan, *args, **kwargs)

    args = dp_args(tiny_model, glue_dir, shards, tmp_path, "resumed", "--rounds", "3", *DP)
    with monkeypatch.context() as m:
        m.setattr(local, "train_client", interrupt_in_round_two)
        one_error_line(run(*args), 130, "--resume")
    again = run(*args, "--resume")
    assert again.exit_code == 0, again.stderr
    run_dir = tmp_path / "sst2_tiny-roberta" / "resumed"
    for sub in ("round_001/global", "round_002/global", "round_003/global", "final"):
        assert adapter_bytes(run_dir, sub) == adapter_bytes(reference, sub), sub
    assert [r["aggregation"]["privacy"] for r in history(run_dir)] == [
        r["aggregation"]["privacy"] for r in history(reference)
    ]


@pytest.mark.slow
def test_target_epsilon_stops_before_the_round_that_would_exceed_it(tiny_model, glue_dir, shards, tmp_path):
    eps = [library_epsilon(3, 2, 0.8, t, 1 / 9) for t in (1, 2, 3)]
    target = (eps[1] + eps[2]) / 2
    result = run(*dp_args(tiny_model, glue_dir, shards, tmp_path, "budget", "--rounds", "5", *DP,
                          "--dp-target-epsilon", f"{target}"))  # fmt: skip
    assert result.exit_code == 0, result.stderr
    run_dir = tmp_path / "sst2_tiny-roberta" / "budget"
    rows = history(run_dir)
    assert [r["round"] for r in rows] == [1, 2] and rows[-1][
        "eval"
    ] is not None  # the last round is evaluated
    assert rows[-1]["aggregation"]["privacy"]["epsilon"] == eps[1] <= target
    assert json.loads((run_dir / "final" / "metrics.json").read_text())["rounds"] == 2
    assert not (run_dir / "round_003").exists()
    flat = " ".join(result.stdout.split())
    assert "stopping after round 2 of 5" in flat and f"round 3 would reach ε = {eps[2]:.3f}" in flat
    # a target that one round already exceeds: refused before anything is written
    small = run(*dp_args(tiny_model, glue_dir, shards, tmp_path, "tiny-budget", "--rounds", "5", *DP,
                         "--dp-target-epsilon", f"{eps[0] / 2}"))  # fmt: skip
    one_error_line(small, 2, "one round already spends")
    assert not (tmp_path / "sst2_tiny-roberta" / "tiny-budget").exists()


@pytest.mark.slow
def test_dp_where_client_the_server_never_receives_an_update_above_c(tiny_model, glue_dir, shards, tmp_path,
                                                                    monkeypatch):  # fmt: skip
    clip = 0.05  # far below the updates' norms: every client clips
    args = dp_args(tiny_model, glue_dir, shards, tmp_path, "client", "--rounds", "2",
                   "--dp-clip", f"{clip}", "--dp-noise-multiplier", "0.5", "--dp-where", "client")  # fmt: skip
    result = run(*args)
    assert result.exit_code == 0, result.stderr
    run_dir = tmp_path / "sst2_tiny-roberta" / "client"
    for r in (1, 2):
        row = history(run_dir)[r - 1]
        sent = load_file(str(run_dir / f"round_{r - 1:03d}" / "global" / "adapter" / "adapter_model.safetensors")) \
            if r > 1 else None  # fmt: skip
        for c in row["clients"]:
            received = load_file(
                str(run_dir / f"round_{r:03d}" / f"client_{c:03d}" / "adapter" / "adapter_model.safetensors")
            )
            meta = json.loads((run_dir / f"round_{r:03d}" / f"client_{c:03d}" / "metrics.json").read_text())
            assert meta["update_norm"] > clip  # it had to clip ...
            if sent is not None:  # ... and what reached the server is within C (svd: in product space)
                norm = privacy.update_norm(received, sent, space="product", scaling=2.0)
                assert norm <= clip * (1 + 1e-6), (r, c, norm)
        assert row["aggregation"]["privacy"]["where"] == "client"
        assert row["aggregation"]["privacy"]["norms"]["max"] <= clip * (1 + 1e-6)

    # a client that does not clip is refused: the round fails (one line, exit 1), nothing is aggregated
    from fedlora_cli.federation import local

    real = local.train_client

    def ignores_the_clip(model, data, indices, plan, *a, **kw):
        from dataclasses import replace

        return real(model, data, indices, replace(plan, clip_norm=None), *a, **kw)

    monkeypatch.setattr(local, "train_client", ignores_the_clip)
    bad = run(*dp_args(tiny_model, glue_dir, shards, tmp_path, "rogue", "--rounds", "1",
                       "--dp-clip", f"{clip}", "--dp-noise-multiplier", "0.5", "--dp-where", "client"))  # fmt: skip
    one_error_line(bad, 1, "did not clip")
    assert not (tmp_path / "sst2_tiny-roberta" / "rogue" / "round_001" / "global").exists()


def test_bad_dp_options_are_one_line_usage_errors(tiny_model, glue_dir, shards, tmp_path):
    base = dp_args(tiny_model, glue_dir, shards, tmp_path, "bad")
    one_error_line(run(*base, "--dp-clip", "1"), 2, "--dp-clip and --dp-noise-multiplier go together")
    one_error_line(run(*base, "--dp-delta", "0.01"), 2, "--dp-delta needs --dp-clip")
    one_error_line(run(*base, "--dp-clip", "1", "--dp-noise-multiplier", "1", "--dp-where", "everywhere"), 2,
                   "--dp-where must be server or client")  # fmt: skip
    assert not (tmp_path / "sst2_tiny-roberta").exists()


def test_a_noise_multiplier_too_large_to_account_for_is_refused_before_any_work(tiny_model, glue_dir, shards,
                                                                                tmp_path):  # fmt: skip
    with pytest.raises(ValueError, match="beyond any number an adapter holds"):
        wrapped("svd", 3, 3, clip=1.0, noise_multiplier=1e300)
    with pytest.raises(ValueError, match="the privacy accountant cannot compute ε for it"):
        wrapped("svd", 3, 3, clip=1e-300, noise_multiplier=1e300)  # z·C = 1, but z² overflows
    base = dp_args(tiny_model, glue_dir, shards, tmp_path, "huge", "--rounds", "2")
    one_error_line(run(*base, "--dp-clip", "1", "--dp-noise-multiplier", "1e300"), 2,
                   "--dp-noise-multiplier 1e+300: the noise std")  # fmt: skip
    assert not list(tmp_path.rglob("round_001"))  # nothing trained


def test_a_delta_that_is_not_small_is_said_to_mean_little():
    three = wrapped("svd", 3, 3, clip=1.0, noise_multiplier=1.0).describe()
    first, warning = three.splitlines()
    assert first.startswith("differential privacy: clip 1")
    assert warning.startswith("warning: δ = 0.111 (the default 1/N² for N = 3 clients) is not small")
    assert "above 0.001" in warning
    assert "\n" not in wrapped("svd", 40, 10, clip=1.0, noise_multiplier=1.0).describe()  # 1/1600
    given = wrapped("svd", 100, 10, clip=1.0, noise_multiplier=1.0, delta=0.02).delta_warning()
    assert given is not None and "at least 1/N = 0.01" in given and "--dp-delta, N = 100" in given
    assert wrapped("svd", 3, 3, clip=1.0, noise_multiplier=1.0, delta=1e-5).delta_warning() is None
