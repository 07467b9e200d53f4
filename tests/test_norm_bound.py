"""Server-side norm bounding (--norm-bound, --norm-bound-median): the bound's maths in both update spaces,
the options, and a client that scales its update by 10⁶ on engine local (the Flower attack: test_flower.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import one_error_line, run
from safetensors.torch import load_file
from test_rounds import write_manifests

from fedlora_cli import privacy
from fedlora_cli.aggregation import ClientUpdate
from fedlora_cli.config import (
    AggregationSpec,
    DataSpec,
    LoraSpec,
    NormBoundSpec,
    PrivacySpec,
    RoundsConfig,
)
from fedlora_cli.strategies import build_strategy
from fedlora_cli.strategies.base import GlobalAdapter, part_of
from fedlora_cli.strategies.bounded import NormBoundStrategy, round_bound, with_norm_bound

LORA = LoraSpec(r=2, alpha=4.0)
MODULES = ("m0", "m1")
D_OUT, D_IN = 6, 5
ATTACK = 1e6  # the attacker's update is this many times its honest one


def random_state(gen: torch.Generator) -> dict[str, torch.Tensor]:
    state = {}
    for m in MODULES:
        state[f"{m}.lora_A.weight"] = torch.randn(LORA.r, D_IN, generator=gen)
        state[f"{m}.lora_B.weight"] = torch.randn(D_OUT, LORA.r, generator=gen)
    state["classifier.weight"] = torch.randn(2, D_IN, generator=gen)
    return state


def moved(state: dict[str, torch.Tensor], gen: torch.Generator, scale: float) -> dict[str, torch.Tensor]:
    return {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def scaled(
    state: dict[str, torch.Tensor], sent: dict[str, torch.Tensor], factor: float
) -> dict[str, torch.Tensor]:
    """What the attacker sends: the broadcast plus `factor` times its honest update (finite, float32)."""
    return {k: sent[k] + factor * (v - sent[k]) for k, v in state.items()}


class Spy:
    """Records the updates the wrapped method is given."""

    def __init__(self, strategy) -> None:
        self.real, self.seen = strategy.aggregate, []
        strategy.aggregate = self

    def __call__(self, round_no, previous, updates, *, sampled=None):
        self.seen = list(updates)
        return self.real(round_no, previous, updates, sampled=sampled)


def bounded(method: str, **bound) -> tuple[NormBoundStrategy, Spy]:
    inner = build_strategy(AggregationSpec(method), LORA, seed=7, client_ids=range(1, 5))
    return NormBoundStrategy(inner, NormBoundSpec(**bound)), Spy(inner)


def one_round(
    strategy, broadcast: GlobalAdapter, states: dict[int, dict[str, torch.Tensor]], round_no: int = 1
):
    for cid in states:
        strategy.plan(round_no, cid, broadcast)
    updates = [ClientUpdate(s, scaling=LORA.scaling, weight=50 + cid, name=f"client {cid}", client=cid)
               for cid, s in states.items()]  # fmt: skip
    return strategy.aggregate(round_no, broadcast, updates, sampled=len(updates))


def attack_round(seed: int = 0):
    """Three honest clients and client 4, whose update is 10⁶ times an honest one."""
    gen = torch.Generator().manual_seed(seed)
    sent = random_state(gen)
    states = {cid: moved(sent, gen, 0.05) for cid in (1, 2, 3)}
    states[4] = scaled(moved(sent, gen, 0.05), sent, ATTACK)
    return GlobalAdapter(sent, LORA), states


# ---------------------------------------------------------------------------------------------------
# the bound's maths


def test_the_bound_is_the_fixed_one_k_times_the_lower_median_or_the_smaller_of_both():
    norms = [4.0, 1.0, 3.0, 1e6]
    assert round_bound(norms, fixed=2.5, multiple=None) == (2.5, 3.0)
    # the LOWER median: of four norms the second smallest, so two clients of four cannot raise it
    assert round_bound(norms, fixed=None, multiple=2.0) == (6.0, 3.0)
    assert round_bound([1.0, 1e6], fixed=None, multiple=2.0) == (2.0, 1.0)  # not (1 + 10⁶) / 2
    assert round_bound([1.0, 2.0, 9.0], fixed=None, multiple=1.5) == (3.0, 2.0)
    assert round_bound(norms, fixed=5.0, multiple=2.0) == (5.0, 3.0)
    assert round_bound(norms, fixed=7.0, multiple=2.0) == (6.0, 3.0)
    with pytest.raises(ValueError, match="no client updates"):
        round_bound([], fixed=1.0, multiple=None)


@pytest.mark.parametrize("method", ["naive", "svd"])  # factor space, product space
def test_the_scaled_update_is_clipped_to_the_bound_in_the_methods_space_and_the_others_pass_untouched(method):
    strategy, spy = bounded(method, median_multiple=2.0)
    broadcast, states = attack_round()
    result = one_round(strategy, broadcast, states)
    record = result.record["norm_bound"]
    space = "factors" if method == "naive" else "product"
    norms = {cid: privacy.update_norm(s, broadcast.state, space=space, scaling=LORA.scaling)
             for cid, s in states.items()}  # fmt: skip
    honest = sorted(norms[c] for c in (1, 2, 3))
    assert record["space"] == space and record["clipped"] == [4]
    assert record["median"] == honest[1] and record["bound"] == 2.0 * honest[1]
    assert record["norms"] == {str(c): pytest.approx(n, rel=1e-12) for c, n in norms.items()}
    assert norms[4] > 1e4 * record["bound"]
    given = {u.client: u for u in spy.seen}
    for cid in (1, 2, 3):  # within the bound: the very tensors the client sent
        assert given[cid].state is states[cid] and given[cid].weight == 50 + cid
    after = privacy.update_norm(given[4].state, broadcast.state, space=space, scaling=LORA.scaling)
    assert after == pytest.approx(record["bound"], rel=1e-5)  # at the bound, up to float32 rounding
    assert given[4].weight == 54 and given[4].scaling == LORA.scaling
    assert all(given[4].state[k].dtype == states[4][k].dtype for k in states[4])
    if method == "naive":  # factor space: exactly the update's direction, shortened
        delta = {k: states[4][k].double() - broadcast.state[k].double() for k in broadcast.state}
        t = record["bound"] / norms[4]
        for k in delta:
            want = (broadcast.state[k].double() + t * delta[k]).float()
            assert torch.allclose(given[4].state[k], want, rtol=0, atol=1e-6), k


@pytest.mark.parametrize("method", ["naive", "svd"])
def test_the_bounded_global_adapter_stays_near_the_honest_one(method):
    broadcast, states = attack_round(seed=1)
    honest = build_strategy(AggregationSpec(method), LORA, seed=7, client_ids=range(1, 5))
    honest_out = one_round(honest, broadcast, {c: states[c] for c in (1, 2, 3)})
    attacked = build_strategy(AggregationSpec(method), LORA, seed=7, client_ids=range(1, 5))
    attacked_out = one_round(attacked, broadcast, states)
    strategy, _ = bounded(method, median_multiple=2.0)
    bounded_out = one_round(strategy, broadcast, states)
    space = "factors" if method == "naive" else "product"

    def moved_by(out) -> float:
        return privacy.update_norm(out.adapter.state, broadcast.state, space=space,
                                   scaling=out.adapter.lora.scaling, reference_scaling=LORA.scaling)  # fmt: skip

    assert moved_by(attacked_out) > 1e4 * moved_by(honest_out)  # the attack takes the model over ...
    assert moved_by(bounded_out) < 2.0 * moved_by(honest_out)  # ... and is bounded


@pytest.mark.parametrize("method", ["naive", "svd", "exact", "ffa", "rolora"])
def test_a_bound_no_client_reaches_gives_the_method_bit_for_bit(method):
    def strategy():
        return build_strategy(AggregationSpec(method), LORA, seed=7, client_ids=range(1, 4))

    gen = torch.Generator().manual_seed(3)
    alone, wrapped = strategy(), with_norm_bound(strategy(), NormBoundSpec(fixed=1e9))
    broadcast = alone.initial(GlobalAdapter(random_state(gen), LORA))
    states = {}
    for cid in (1, 2, 3):  # each client moves what the method trains this round
        plan = alone.plan(1, cid, broadcast)
        new = moved(plan.adapter.state, gen, 0.05)
        states[cid] = {k: new[k] if part_of(k) in plan.train else v for k, v in plan.adapter.state.items()}
    want = one_round(alone, broadcast, states)
    out = one_round(wrapped, broadcast, states)
    assert out.adapter.lora == want.adapter.lora
    assert all(torch.equal(out.adapter.state[k], want.adapter.state[k]) for k in want.adapter.state)
    assert out.record["norm_bound"]["clipped"] == [] and out.record["norm_bound"]["bound"] == 1e9
    assert {k: v for k, v in out.record.items() if k != "norm_bound"} == want.record
    saved = wrapped.state_dict()  # the wrapper keeps nothing of its own: the method's state, as it is
    assert saved.keys() == alone.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in alone.state_dict().items())
    wrapped.load_state_dict(saved)


def test_mixed_client_ranks_each_update_is_measured_against_what_that_client_was_sent():
    """svd with --client-ranks 1,2: each client is sent the global adapter at its own rank; a clipped
    update keeps that rank (the product-space clip moves along the client's own factors)."""
    gen = torch.Generator().manual_seed(4)
    inner = build_strategy(AggregationSpec("svd", client_ranks="1,2"), LORA, seed=7, client_ids=range(1, 5))
    strategy, spy = NormBoundStrategy(inner, NormBoundSpec(median_multiple=1.5)), Spy(inner)
    broadcast = GlobalAdapter(random_state(gen), LORA)
    plans = {cid: strategy.plan(1, cid, broadcast) for cid in (1, 2, 3, 4)}
    assert [plans[c].adapter.lora.r for c in (1, 2, 3, 4)] == [1, 2, 1, 2]
    states = {cid: moved(p.adapter.state, gen, 0.05) for cid, p in plans.items()}
    states[3] = scaled(states[3], plans[3].adapter.state, ATTACK)  # a rank-1 client
    updates = [ClientUpdate(states[c], scaling=LORA.scaling, weight=10, name=f"client {c}", client=c)
               for c in (1, 2, 3, 4)]  # fmt: skip
    record = strategy.aggregate(1, broadcast, updates, sampled=4).record["norm_bound"]
    assert record["clipped"] == [3]
    for c in (1, 2, 4):
        want = privacy.update_norm(states[c], plans[c].adapter.state, space="product", scaling=LORA.scaling)
        assert record["norms"][str(c)] == pytest.approx(want, rel=1e-12)
    clipped = next(u for u in spy.seen if u.client == 3)
    assert clipped.state["m0.lora_A.weight"].shape == (1, D_IN)
    after = privacy.update_norm(clipped.state, plans[3].adapter.state, space="product", scaling=LORA.scaling)
    assert after == pytest.approx(record["bound"], rel=1e-5)


def test_an_update_from_a_client_not_planned_this_round_is_refused():
    strategy, _ = bounded("naive", fixed=1.0)
    broadcast, states = attack_round()
    strategy.plan(1, 1, broadcast)
    stranger = ClientUpdate(states[2], scaling=LORA.scaling, weight=10, name="client 2", client=2)
    with pytest.raises(ValueError, match="client 2 is not from a client planned in round 1"):
        strategy.aggregate(1, broadcast, [stranger], sampled=1)
    with pytest.raises(ValueError, match="norm bounding needs rounds"):
        strategy.aggregate(1, None, [stranger], sampled=1)


def test_without_a_bound_the_strategy_is_not_wrapped():
    inner = build_strategy(AggregationSpec("svd"), LORA, seed=7, client_ids=[1])
    assert with_norm_bound(inner, NormBoundSpec()) is inner
    assert isinstance(with_norm_bound(inner, NormBoundSpec(median_multiple=3)), NormBoundStrategy)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fixed": 0.0}, "--norm-bound must be a finite number > 0, got 0.0"),
        ({"fixed": -1.0}, "--norm-bound must be a finite number > 0, got -1.0"),
        ({"fixed": math.inf}, "--norm-bound must be a finite number > 0, got inf"),
        ({"fixed": math.nan}, "--norm-bound must be a finite number > 0, got nan"),
        ({"median_multiple": 0.5}, "--norm-bound-median must be a finite number >= 1"),
        ({"median_multiple": math.inf}, "--norm-bound-median must be a finite number >= 1"),
    ],
)
def test_norm_bound_spec_names_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        NormBoundSpec(**kwargs)


def test_a_norm_bound_with_differential_privacy_is_refused():
    with pytest.raises(ValueError, match="--norm-bound-median 2 with --dp-clip: differential privacy's clip"):
        RoundsConfig(data=DataSpec(task="sst2"), shards="x", norm_bound=NormBoundSpec(median_multiple=2),
                     privacy=PrivacySpec(clip=1.0, noise_multiplier=1.0))  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# `fedlora rounds --norm-bound*` on the tiny model, one client scaling its update by 10⁶

FAST = ["--local-epochs", "1", "--learning-rate", "2e-2", "--precision", "fp32", "--batch-size", "16",
        "--max-eval-samples", "64", "--no-eval-each-round"]  # fmt: skip
ATTACKER = 2


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    order = np.random.default_rng(0).permutation(600).tolist()
    return write_manifests(
        tmp_path_factory.mktemp("shards") / "k3", [order[:80], order[80:160], order[160:240]]
    )


def args(model, glue, shards, root, name, *extra):
    return ["rounds", "--task", "sst2", "--model", model, "--data-dir", glue, "--shards", shards,
            "--output-root", root, "--run-name", name, *FAST, *extra]  # fmt: skip


def history(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return [r for r in rows if r["round"] > 0]


def adapter_bytes(run_dir: Path, sub: str) -> bytes:
    return (run_dir / sub / "adapter" / "adapter_model.safetensors").read_bytes()


def adapter_norm(run_dir: Path) -> float:
    """L2 norm of the final adapter (every LoRA factor and the head)."""
    state = load_file(str(run_dir / "final" / "adapter" / "adapter_model.safetensors"))
    return float(torch.cat([t.double().flatten() for t in state.values()]).norm())


@pytest.fixture
def attacker(monkeypatch):
    """Engine local with client 2 sending the broadcast plus 10⁶ × its update (finite: every check passes)."""
    from dataclasses import replace

    from fedlora_cli.federation import local

    real = local.train_client

    def scales_its_update(model, data, indices, plan, *a, **kw):
        report = real(model, data, indices, plan, *a, **kw)
        if plan.client_id != ATTACKER:
            return report
        return replace(report, state=scaled(report.state, plan.adapter.state, ATTACK))

    monkeypatch.setattr(local, "train_client", scales_its_update)


@pytest.fixture(scope="module")
def honest(tiny_model, glue_dir, shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    result = run(*args(tiny_model, glue_dir, shards, root, "honest", "--rounds", "2"))
    assert result.exit_code == 0, result.stderr
    return root / "sst2_tiny-roberta" / "honest"


@pytest.mark.slow
def test_engine_local_a_scaled_update_takes_the_model_over_unless_bounded(
    tiny_model, glue_dir, shards, honest, attacker, tmp_path
):
    taken = run(*args(tiny_model, glue_dir, shards, tmp_path, "taken", "--rounds", "2"))
    assert taken.exit_code == 0, taken.stderr  # every check passes: the update is finite and well-formed
    result = run(*args(tiny_model, glue_dir, shards, tmp_path, "bounded", "--rounds", "2",
                       "--norm-bound-median", "2"), env={"COLUMNS": "200"})  # fmt: skip
    assert result.exit_code == 0, result.stderr
    run_dir = tmp_path / "sst2_tiny-roberta" / "bounded"
    base = adapter_norm(honest)
    assert adapter_norm(tmp_path / "sst2_tiny-roberta" / "taken") > 1e3 * base
    assert adapter_norm(run_dir) < 1.5 * base
    for row in history(run_dir):
        b = row["aggregation"]["norm_bound"]
        norms = b["norms"]
        assert row["clients"] == [1, 2, 3] and b["clipped"] == [ATTACKER] and b["space"] == "product"
        assert sorted(norms) == ["1", "2", "3"] and norms["2"] > 1e4 * max(norms["1"], norms["3"])
        assert b["median"] == max(norms["1"], norms["3"]) and b["bound"] == 2 * b["median"]
        assert b["fixed"] is None and b["median_multiple"] == 2
    record = json.loads((run_dir / "run.json").read_text())
    assert record["config"]["norm_bound"] == {"fixed": None, "median_multiple": 2.0}
    assert "norm bound: each client's update is clipped on the server to 2 × the round's median" in " ".join(
        result.stderr.split()
    )
    flat = " ".join(result.stdout.split())
    assert "bound" in flat and "1/3" in flat  # the summary: the bound and one of three clients clipped
    listed = run("runs", "list", tmp_path, "--json")
    assert listed.exit_code == 0, listed.stderr
    methods = {r["name"]: r["method"] for r in json.loads(listed.stdout)}
    assert methods == {"sst2_tiny-roberta/taken": "svd", "sst2_tiny-roberta/bounded": "svd+bound"}


@pytest.mark.slow
def test_resume_after_an_interruption_is_bit_identical_with_norm_bounding(
    tiny_model, glue_dir, shards, attacker, tmp_path, monkeypatch
):
    from fedlora_cli.federation import local

    bound = ["--rounds", "3", "--aggregation", "naive", "--norm-bound", "0.05", "--norm-bound-median", "1.5"]
    reference = run(*args(tiny_model, glue_dir, shards, tmp_path, "straight", *bound))
    assert reference.exit_code == 0, reference.stderr
    straight = tmp_path / "sst2_tiny-roberta" / "straight"

    attacking = local.train_client  # the attacker's, from the fixture

    def interrupt_in_round_two(model, data, indices, plan, *a, **kw):
        if (kw["round_no"], plan.client_id) == (2, 3):
            raise KeyboardInterrupt
        return attacking(model, data, indices, plan, *a, **kw)

    interrupted = args(tiny_model, glue_dir, shards, tmp_path, "resumed", *bound)
    with monkeypatch.context() as m:
        m.setattr(local, "train_client", interrupt_in_round_two)
        one_error_line(run(*interrupted), 130, "--resume")
    again = run(*interrupted, "--resume")
    assert again.exit_code == 0, again.stderr
    resumed = tmp_path / "sst2_tiny-roberta" / "resumed"
    for sub in ("round_001/global", "round_002/global", "round_003/global", "final"):
        assert adapter_bytes(resumed, sub) == adapter_bytes(straight, sub), sub
    records = [r["aggregation"]["norm_bound"] for r in history(straight)]
    assert [r["aggregation"]["norm_bound"] for r in history(resumed)] == records
    assert all(r["space"] == "factors" and ATTACKER in r["clipped"] for r in records)
    # a resume may not change the bound: it changes what the rounds compute
    changed = run(*args(tiny_model, glue_dir, shards, tmp_path, "resumed", "--rounds", "4", "--aggregation",
                        "naive", "--norm-bound", "0.1", "--norm-bound-median", "1.5"), "--resume")  # fmt: skip
    one_error_line(changed, 2, "norm_bound.fixed: 0.05 -> 0.1")


def test_bad_norm_bound_options_are_one_line_usage_errors(tiny_model, glue_dir, shards, tmp_path):
    base = args(tiny_model, glue_dir, shards, tmp_path, "bad")
    one_error_line(run(*base, "--norm-bound", "0"), 2, "--norm-bound must be a finite number > 0, got 0")
    one_error_line(
        run(*base, "--norm-bound-median", "0.5"), 2, "--norm-bound-median must be a finite number >= 1"
    )
    one_error_line(run(*base, "--norm-bound", "1", "--dp-clip", "1", "--dp-noise-multiplier", "1"), 2,
                   "--norm-bound 1 with --dp-clip")  # fmt: skip
    assert not (tmp_path / "sst2_tiny-roberta").exists()
