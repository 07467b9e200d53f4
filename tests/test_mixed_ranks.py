"""Mixed client ranks as their papers define them: HetLoRA (zero-padding, sparsity-weighted aggregation, rank
self-pruning) and FlexLoRA's conventions for svd (alpha fixed across ranks, the untruncated global model)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from clitools import run
from safetensors.torch import load_file
from test_rounds import write_manifests

from fedlora_cli.aggregation import ClientUpdate, lora_rank, tail_norm
from fedlora_cli.config import AggregationSpec, HetloraOptions, LoraSpec, SvdOptions
from fedlora_cli.strategies import build_strategy
from fedlora_cli.strategies.base import GlobalAdapter
from fedlora_cli.strategies.hetlora import kept_rank

M = "m.query"
A, B, HEAD = f"{M}.lora_A.weight", f"{M}.lora_B.weight", "head.weight"
DIMS = (12, 10)


def state(r: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(r, DIMS[1], generator=g).double(), B: torch.randn(DIMS[0], r, generator=g).double(),
            HEAD: torch.randn(3, generator=g).double()}  # fmt: skip


def product(st: dict[str, torch.Tensor], scaling: float) -> torch.Tensor:
    return scaling * st[B].double() @ st[A].double()


def hetlora(ranks: str, gamma: float = 1.0, penalty: float = 0.0, lora: LoraSpec = LoraSpec(4, 8.0)):
    spec = AggregationSpec(
        "hetlora", client_ranks=ranks, hetlora=HetloraOptions(gamma=gamma, penalty=penalty)
    )
    return build_strategy(spec, lora, seed=0, client_ids=[1, 2])


# --- HetLoRA ----------------------------------------------------------------------------------------------


def test_hetlora_weights_the_padded_factors_by_each_clients_update_norm_not_its_examples():
    """Sparsity-weighted aggregation (Fig. 2): S_k = ‖s·B_k·A_k‖_F, weights S_k / Σ S; A's rows orthonormal,
    so ‖B A‖ = ‖B‖: 3 and 1 give 3/4, 1/4."""
    s = hetlora("2,4")
    eye = torch.eye(4, DIMS[1], dtype=torch.float64)
    b1 = torch.zeros(DIMS[0], 2, dtype=torch.float64)
    b1[0, 0], b1[1, 1] = 3.0 * 0.6, 3.0 * 0.8  # ‖B1‖ = 3
    b2 = torch.zeros(DIMS[0], 4, dtype=torch.float64)
    b2[2, 3] = 1.0  # ‖B2‖ = 1
    one = {A: eye[:2].clone(), B: b1, HEAD: torch.ones(3, dtype=torch.float64)}
    two = {A: eye.clone(), B: b2, HEAD: torch.zeros(3, dtype=torch.float64)}
    # example counts 1 and 99: FedAvg would give client 2 almost everything
    out = s.aggregate(1, None, [ClientUpdate(one, 2.0, 1, client=1), ClientUpdate(two, 2.0, 99, client=2)])
    assert out.record["weights"] == pytest.approx([0.75, 0.25]) and out.record["method"] == "hetlora"
    padded_b1 = torch.cat([b1, torch.zeros(DIMS[0], 2, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(out.adapter.state[B], 0.75 * padded_b1 + 0.25 * b2)
    torch.testing.assert_close(
        out.adapter.state[A],
        0.75 * torch.cat([eye[:2], torch.zeros(2, DIMS[1], dtype=torch.float64)]) + 0.25 * eye,
    )
    torch.testing.assert_close(
        out.adapter.state[HEAD], torch.full((3,), 0.01, dtype=torch.float64)
    )  # examples
    assert out.adapter.lora.r == 4 and out.adapter.lora.scaling == pytest.approx(2.0)


def test_the_kept_rank_is_floor_gamma_r_and_never_below_one():
    assert [kept_rank(r, 0.5) for r in (1, 2, 3, 8)] == [1, 1, 1, 4]
    assert kept_rank(8, 0.99) == 7 and kept_rank(8, 1.0) == 8


def shrink_tail(st: dict[str, torch.Tensor], keep: int, factor: float) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in st.items()}
    out[B][:, keep:] *= factor
    return out


def test_a_client_whose_tail_shrank_prunes_its_rank_and_the_others_keep_theirs():
    """Rank self-pruning: after local training, a client whose last ranks ‖B[:, k:]‖·‖A[k:, :]‖ (k = ⌊γ·r⌋) got
    smaller than in the adapter it started from drops them: its update is truncated to k and it trains at
    rank k from then on."""
    s = hetlora("4,4", gamma=0.5)
    current = GlobalAdapter(state(4, 0), LoraSpec(4, 8.0))
    plans = [s.plan(1, c, current) for c in (1, 2)]
    shrunk = shrink_tail(plans[0].adapter.state, 2, 0.1)
    grown = shrink_tail(plans[1].adapter.state, 2, 3.0)
    assert tail_norm(shrunk, 2) < tail_norm(current.state, 2) < tail_norm(grown, 2)
    out = s.aggregate(
        1, current, [ClientUpdate(shrunk, 2.0, 1, client=1), ClientUpdate(grown, 2.0, 1, client=2)]
    )
    assert out.record["pruned"] == {"1": 2} and out.adapter.lora.r == 4  # the global keeps r_max
    # the pruned client counted with its first two ranks only (zero-padded), the other with all four
    pruned = {k: v.clone() for k, v in shrunk.items()}
    pruned[B][:, 2:], pruned[A][2:] = 0.0, 0.0
    norms = [float(product(st, 2.0).norm()) for st in (pruned, grown)]
    w = [n / sum(norms) for n in norms]
    torch.testing.assert_close(out.adapter.state[B], w[0] * pruned[B] + w[1] * grown[B])
    assert [s.plan(2, c, out.adapter).adapter.lora.r for c in (1, 2)] == [2, 4]
    assert s.client_lora(1).scaling == pytest.approx(2.0)  # a pruned client keeps the scaling
    assert s.state_dict()["hetlora.ranks"].tolist() == [[1, 2]]
    # a second shrink prunes again, from 2 to 1; rank 1 is the floor
    again = s.aggregate(2, out.adapter, [ClientUpdate(shrink_tail(s.plan(2, 1, out.adapter).adapter.state, 1, 0.1),
                                                      2.0, 1, client=1)])  # fmt: skip
    assert again.record["pruned"] == {"1": 1} and s.client_lora(1).r == 1


def test_pruned_ranks_are_server_state_for_resume():
    s = hetlora("4,4", gamma=0.5)
    s.pruned = {2: 3}
    resumed = hetlora("4,4", gamma=0.5)
    resumed.load_state_dict(s.state_dict())
    assert resumed.pruned == {2: 3} and resumed.client_lora(2).r == 3
    assert hetlora("4,4").state_dict() == {}
    with pytest.raises(ValueError, match="keeps only its pruned ranks"):
        resumed.load_state_dict({"x": torch.zeros(1)})
    with pytest.raises(ValueError, match="int64 table"):
        resumed.load_state_dict({"hetlora.ranks": torch.zeros(2)})


def test_no_pruning_without_a_client_id_or_with_gamma_one():
    s = hetlora("4,4", gamma=0.5)
    current = GlobalAdapter(state(4, 0), LoraSpec(4, 8.0))
    shrunk = shrink_tail(current.state, 2, 0.1)
    out = s.aggregate(1, current, [ClientUpdate(shrunk, 2.0, 1)])  # a DP pseudo-update: no client id
    assert out.record["pruned"] == {} and s.pruned == {}
    t = hetlora("4,4", gamma=1.0)
    assert t.aggregate(1, current, [ClientUpdate(shrunk, 2.0, 1, client=1)]).record["pruned"] == {}


def test_the_plan_carries_the_rank_regulariser_when_lambda_is_set():
    current = GlobalAdapter(state(4, 0), LoraSpec(4, 8.0))
    plan = hetlora("4,4", gamma=0.5, penalty=0.3).plan(1, 1, current)
    assert (plan.tail_penalty, plan.tail_from) == (0.3, 2)
    assert hetlora("4,4", gamma=1.0, penalty=0.3).plan(1, 1, current).tail_penalty == 0.0
    assert hetlora("4,4", gamma=0.5).plan(1, 1, current).tail_penalty == 0.0


def test_the_rank_regulariser_is_lambda_times_the_tail_norms_and_pulls_the_tail_down():
    from fedlora_cli.training import tail_penalty

    class Layer(torch.nn.Module):  # PEFT's names: <module>.lora_A.<adapter slot>.weight; two slots here
        def __init__(self, seed: int) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(seed)
            slots = ("default", "other")
            self.lora_A = torch.nn.ModuleDict({k: torch.nn.Linear(10, 4, bias=False) for k in slots})
            self.lora_B = torch.nn.ModuleDict({k: torch.nn.Linear(4, 12, bias=False) for k in slots})
            with torch.no_grad():
                for k in slots:
                    self.lora_A[k].weight.copy_(torch.randn(4, 10, generator=g))
                    self.lora_B[k].weight.copy_(torch.randn(12, 4, generator=g))

    def tails(model) -> float:  # each slot's B with its own A
        return sum(0.5 * float(layer.lora_B[k].weight[:, 2:].detach().norm() * layer.lora_A[k].weight[2:].detach().norm())
                   for layer in model.values() for k in ("default", "other"))  # fmt: skip

    model = torch.nn.ModuleDict({"q": Layer(0), "v": Layer(1)})
    value = tail_penalty(model, 2, 0.5)()
    assert float(value.detach()) == pytest.approx(tails(model))
    value.backward()
    head_grad = model["q"].lora_B["default"].weight.grad
    assert torch.equal(head_grad[:, :2], torch.zeros(12, 2)) and head_grad[:, 2:].abs().sum() > 0


def test_a_plan_with_the_regulariser_crosses_the_flower_wire():
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord

    from fedlora_cli.flower.codec import plan_from_content, plan_to_content

    plan = hetlora("4,4", gamma=0.5, penalty=0.3, lora=LoraSpec(4, 8.0, use_rslora=True)).plan(
        1, 2, GlobalAdapter({k: v.float() for k, v in state(4, 0).items()}, LoraSpec(4, 8.0, use_rslora=True))
    )
    back = plan_from_content(plan_to_content(plan, 1, ConfigRecord({})))
    assert (back.tail_penalty, back.tail_from, back.adapter.lora) == (0.3, 2, plan.adapter.lora)
    assert back.adapter.lora.use_rslora


# --- FlexLoRA's conventions for svd ------------------------------------------------------------------------


def test_fixed_alpha_gives_every_rank_the_same_lora_alpha_as_flexloras_code():
    spec = AggregationSpec("svd", client_ranks="2,4,8", svd=SvdOptions(rank_scaling="fixed-alpha"))
    s = build_strategy(spec, LoraSpec(4, 16.0), seed=0, client_ids=[1, 2, 3])
    assert [(s.client_lora(c).r, s.client_lora(c).alpha) for c in (1, 2, 3)] == [
        (2, 16.0),
        (4, 16.0),
        (8, 16.0),
    ]
    assert [s.client_lora(c).scaling for c in (1, 2, 3)] == [8.0, 4.0, 2.0]  # alpha / r_i
    fixed_scale = build_strategy(AggregationSpec("svd", client_ranks="2,4,8"), LoraSpec(4, 16.0), seed=0,
                                 client_ids=[1, 2, 3])  # fmt: skip
    assert [fixed_scale.client_lora(c).alpha for c in (1, 2, 3)] == [
        8.0,
        16.0,
        32.0,
    ]  # today's: alpha_i = s·r_i
    updates = [
        ClientUpdate(state(r, r), 16.0 / r, n, client=c) for c, r, n in ((1, 2, 1), (2, 4, 2), (3, 8, 3))
    ]
    out = s.aggregate(1, None, updates)
    assert (out.adapter.lora.r, out.adapter.lora.alpha) == (8, 16.0) and out.record[
        "rank_scaling"
    ] == "fixed-alpha"
    mean = sum(n / 6 * product(u.state, u.scaling) for n, u in zip((1, 2, 3), updates, strict=True))
    u, sv, vh = torch.linalg.svd(mean)
    best = u[:, :8] @ torch.diag(sv[:8]) @ vh[:8]
    torch.testing.assert_close(product(out.adapter.state, 2.0), best, rtol=1e-6, atol=1e-8)
    plan = s.plan(2, 1, out.adapter)  # client 1 at rank 2, scaling 8: the best rank-2 part of the global
    assert (plan.adapter.lora.r, plan.adapter.lora.alpha) == (2, 16.0)
    torch.testing.assert_close(product(plan.adapter.state, 8.0), u[:, :2] @ torch.diag(sv[:2]) @ vh[:2],
                               rtol=1e-6, atol=1e-8)  # fmt: skip


def test_server_rank_full_keeps_the_untruncated_mean_and_reports_error_zero():
    spec = AggregationSpec("svd", client_ranks="2,3,4", svd=SvdOptions(server_rank="full"))
    s = build_strategy(spec, LoraSpec(4, 8.0), seed=0, client_ids=[1, 2, 3])
    updates = [ClientUpdate(state(r, r), 2.0, n, client=c) for c, r, n in ((1, 2, 1), (2, 3, 2), (3, 4, 3))]
    out = s.aggregate(1, None, updates)
    assert out.adapter.lora.r == 9 and out.adapter.lora.scaling == pytest.approx(2.0)  # Σ r_i = 2 + 3 + 4
    assert out.record["server_rank"] == "full" and out.record["error"] < 1e-12
    mean = sum(n / 6 * product(u.state, 2.0) for n, u in zip((1, 2, 3), updates, strict=True))
    torch.testing.assert_close(product(out.adapter.state, 2.0), mean, rtol=1e-9, atol=1e-12)
    assert s.export(out.adapter) is out.adapter  # final/ is the untruncated model
    capped = [ClientUpdate(state(8, c), 2.0, 1, client=c) for c in (1, 2)]  # Σ r_i = 16 > min(12, 10)
    assert s.aggregate(1, None, capped).adapter.lora.r == 10
    with pytest.raises(
        ValueError, match="--server-rank full keeps every rank the clients send: drop --svd-rank"
    ):
        SvdOptions(rank=4, server_rank="full")
    with pytest.raises(ValueError, match="--server-rank applies to --aggregation svd only"):
        AggregationSpec("naive", svd=SvdOptions(server_rank="full"))


# --- end to end --------------------------------------------------------------------------------------------

FAST = ["--local-epochs", "1", "--learning-rate", "2e-2", "--precision", "fp32", "--batch-size", "32",
        "--max-eval-samples", "50", "--rounds", "2"]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    order = np.random.default_rng(3).permutation(600).tolist()
    return write_manifests(tmp_path_factory.mktemp("shards") / "k2", [order[:80], order[80:200]])


def rounds(tiny_model, glue_dir, shards, out, *extra):
    result = run("rounds", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--shards", shards,
                 "--output-dir", out, *FAST, *extra)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()][1:]


@pytest.mark.slow
def test_flexlora_run_keeps_the_full_model_and_says_so_in_its_history(tiny_model, glue_dir, shards, tmp_path):
    history = rounds(tiny_model, glue_dir, shards, tmp_path / "flex", "--client-ranks", "2,4", "--server-rank",
                     "full", "--rank-scaling", "fixed-alpha")  # fmt: skip
    for row in history:
        agg = row["aggregation"]
        assert (agg["server_rank"], agg["rank_scaling"], agg["rank"]) == ("full", "fixed-alpha", 6)
        assert agg["error"] < 1e-6 and agg["alpha"] == 16.0
    final = json.loads((tmp_path / "flex" / "final" / "adapter" / "adapter_config.json").read_text())
    assert (final["r"], final["lora_alpha"]) == (6, 16.0)
    client = json.loads(
        (tmp_path / "flex" / "round_002" / "client_001" / "adapter" / "adapter_config.json").read_text()
    )
    assert (client["r"], client["lora_alpha"]) == (2, 16.0)


@pytest.mark.slow
def test_the_rank_regulariser_shrinks_the_clients_last_ranks(tiny_model, glue_dir, shards, tmp_path):
    def tails(name: str) -> list[float]:
        folder = tmp_path / name / "round_001"
        states = [
            load_file(str(folder / f"client_{c:03d}" / "adapter" / "adapter_model.safetensors"))
            for c in (1, 2)
        ]
        return [tail_norm(st, math.floor(0.5 * lora_rank(st))) for st in states]

    common = ["--aggregation", "hetlora", "--client-ranks", "4,8", "--hetlora-gamma", "0.5"]
    plain = rounds(tiny_model, glue_dir, shards, tmp_path / "plain", *common)
    pulled = rounds(tiny_model, glue_dir, shards, tmp_path / "pulled", *common, "--hetlora-lambda", "5")
    assert all(p < 0.5 * q for p, q in zip(tails("pulled"), tails("plain"), strict=True))
    assert plain[0]["aggregation"]["method"] == "hetlora" and len(pulled[0]["aggregation"]["weights"]) == 2
