"""The federated methods: each one's global model against a dense float64 reference, frozen parts
bit-identical, per-client ranks, FedProx, resume, and outputs that plain PEFT opens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import one_error_line, run
from safetensors.torch import load_file
from test_rounds import write_manifests

from fedlora_cli.aggregation import ClientUpdate, aggregate_svd, lora_modules
from fedlora_cli.config import AggregationSpec, LoraSpec, SvdOptions
from fedlora_cli.strategies import METHODS, build_strategy
from fedlora_cli.strategies.base import GlobalAdapter, fit

FAST = ["--local-epochs", "3", "--learning-rate", "2e-2", "--precision", "fp32", "--batch-size", "32"]
M = "m.query"
A, B, HEAD = f"{M}.lora_A.weight", f"{M}.lora_B.weight", "head.weight"
DIMS = (12, 10)  # d_out, d_in


def state(r: int, seed: int, zero_b: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = torch.zeros(DIMS[0], r) if zero_b else torch.randn(DIMS[0], r, generator=g)
    return {A: torch.randn(r, DIMS[1], generator=g), B: b, HEAD: torch.randn(3, generator=g)}


def product(st: dict[str, torch.Tensor], scaling: float) -> torch.Tensor:
    return scaling * st[B].double() @ st[A].double()


def strategy(method: str, r: int = 4, lora_alpha: float = 8.0, ids=(1, 2, 3), rank=None, alpha=None, **spec):
    svd = SvdOptions(rank=rank, alpha=alpha)  # svd's own options (refused for the other methods)
    return build_strategy(
        AggregationSpec(method, svd=svd, **spec), LoraSpec(r, lora_alpha), seed=0, client_ids=list(ids)
    )


def client_updates(plans, seed: int, weights=(1, 2, 3), train=("A", "B")):
    """What clients would send: the planned adapter with the trained factors replaced by random ones."""
    out = []
    for i, (plan, n) in enumerate(zip(plans, weights, strict=True)):
        fresh = state(plan.adapter.lora.r, seed * 10 + i)
        st = {k: (fresh[k] if (k == A and "A" in train) or (k == B and "B" in train) or k == HEAD else v)
              for k, v in plan.adapter.state.items()}  # fmt: skip
        out.append(ClientUpdate(st, plan.adapter.lora.scaling, n))
    return out


# --- pure: every method against a dense float64 reference ---------------------------------------


def test_exact_global_model_is_the_weighted_mean_of_client_updates_over_rounds():
    s = strategy("exact", ids=(1, 2, 3))
    current = GlobalAdapter(state(4, 0, zero_b=True), LoraSpec(4, 8.0))
    w = torch.tensor([1, 2, 3], dtype=torch.float64) / 6
    model_delta = torch.zeros(DIMS, dtype=torch.float64)  # what the global model adds to W0
    for rnd in (1, 2, 3):
        plans = [s.plan(rnd, c, current) for c in (1, 2, 3)]
        residual_before = {k: (p.double(), q.double()) for k, (p, q) in s.base_delta().items()}
        updates = client_updates(plans, rnd)
        out = s.aggregate(rnd, current, updates)
        # each client's model is W0 + R_before + s B_i A_i, so the mean model is that, weighted
        r_before = residual_before[M][0] @ residual_before[M][1] if residual_before else 0.0
        expected = r_before + sum(wi * product(u.state, 2.0) for wi, u in zip(w, updates, strict=True))
        p, q = s.base_delta()[M]
        got = p.double() @ q.double() + product(out.adapter.state, 2.0)
        assert float((got - expected).norm() / expected.norm()) < 1e-5
        assert out.record["error"] < 1e-6 and out.record["adapter_error"] > 0.05  # naive alone would miss
        assert out.record["residual_rank"] <= min(DIMS)
        model_delta = expected
        current = out.adapter
    # final/: ONE plain adapter, a lossless factorisation of R + s B̄ Ā, at the rank it needs
    final = s.export(current)
    assert final.lora.scaling == pytest.approx(2.0) and final.lora.r <= min(DIMS)
    assert float((product(final.state, 2.0) - model_delta).norm() / model_delta.norm()) < 1e-5
    torch.testing.assert_close(final.state[HEAD], current.state[HEAD])


def test_exact_server_state_round_trips_for_resume():
    s = strategy("exact")
    current = GlobalAdapter(state(4, 0, zero_b=True), LoraSpec(4, 8.0))
    out = s.aggregate(1, current, client_updates([s.plan(1, c, current) for c in (1, 2, 3)], 1))
    saved = s.state_dict()
    again = strategy("exact")
    again.load_state_dict(saved)
    assert again.base_delta_key() == s.base_delta_key() != ""
    assert all(
        torch.equal(x, y)
        for k in s.base_delta()
        for x, y in zip(again.base_delta()[k], s.base_delta()[k], strict=True)
    )
    with pytest.raises(ValueError, match="keeps no server state"):
        strategy("svd").load_state_dict(saved)
    assert out.adapter.lora.r == 4


@pytest.mark.parametrize("method, trained", [("ffa", ["B", "B", "B"]), ("rolora", ["B", "A", "B"])])
def test_one_factor_methods_keep_the_other_factor_bit_identical_and_average_exactly(method, trained):
    s = strategy(method, ids=(1, 2, 3))
    start = GlobalAdapter(state(4, 0, zero_b=True), LoraSpec(4, 8.0))
    current = start
    w = torch.tensor([1, 2, 3], dtype=torch.float64) / 6
    for rnd, factor in zip((1, 2, 3), trained, strict=True):
        plans = [s.plan(rnd, c, current) for c in (1, 2, 3)]
        assert all(p.train == frozenset({factor, "head"}) for p in plans)
        updates = client_updates(plans, rnd, train=(factor,))
        out = s.aggregate(rnd, current, updates)
        frozen = A if factor == "B" else B
        assert torch.equal(out.adapter.state[frozen], current.state[frozen])  # bit for bit
        expected = sum(wi * product(u.state, 2.0) for wi, u in zip(w, updates, strict=True))
        torch.testing.assert_close(product(out.adapter.state, 2.0), expected, rtol=1e-6, atol=1e-6)
        assert out.record["error"] < 1e-12 and out.record["trained"] == factor
        current = out.adapter
    if method == "ffa":
        assert torch.equal(current.state[A], start.state[A])  # A never changed


def test_a_client_that_changes_a_frozen_factor_is_rejected():
    s = strategy("ffa")
    current = GlobalAdapter(state(4, 0), LoraSpec(4, 8.0))
    plan = s.plan(1, 1, current)
    honest = client_updates([plan], 1, weights=(5,), train=("B",))[0]
    assert s.check_update(plan, honest) is None
    liar = ClientUpdate({**honest.state, A: honest.state[A] + 1e-3}, honest.scaling, 5)
    assert "frozen" in s.check_update(plan, liar)


def test_svd_sends_each_client_the_best_approximation_at_its_own_rank():
    s = strategy("svd", r=4, ids=(1, 2, 3), client_ranks="2,4,8")
    assert [s.client_lora(c).r for c in (1, 2, 3)] == [2, 4, 8] and s.global_rank == 8
    assert all(s.client_lora(c).scaling == pytest.approx(2.0) for c in (1, 2, 3))  # alpha_i = s·r_i
    clients = [ClientUpdate(state(r, r), 2.0, n) for r, n in ((2, 1), (4, 2), (8, 3))]
    glob = s.aggregate(1, None, clients).adapter
    assert glob.lora.r == 8 and glob.lora.alpha == pytest.approx(16.0)  # keeps the clients' scaling
    dense = product(glob.state, glob.lora.scaling)
    u, sv, vh = torch.linalg.svd(dense)
    for cid, r in ((1, 2), (2, 4)):
        plan = s.plan(2, cid, glob)
        assert plan.adapter.lora.r == r and plan.adapter.state[A].shape == (r, DIMS[1])
        best = u[:, :r] @ torch.diag(sv[:r]) @ vh[:r]
        torch.testing.assert_close(
            product(plan.adapter.state, plan.adapter.lora.scaling), best, rtol=1e-5, atol=1e-5
        )


def test_naive_sends_each_client_the_leading_slice_hetlora():
    s = strategy("naive", r=4, ids=(1, 2), client_ranks="2,4")
    glob = GlobalAdapter(state(4, 3), LoraSpec(4, 8.0))
    plan = s.plan(1, 1, glob)
    assert torch.equal(plan.adapter.state[A], glob.state[A][:2]) and torch.equal(
        plan.adapter.state[B], glob.state[B][:, :2]
    )


def test_fit_keeps_the_product_when_the_scaling_changes():
    # an svd run with --alpha 4 at rank 8 (scaling 0.5) broadcast to clients at lora_alpha 16, r 8 (scaling 2)
    glob = GlobalAdapter(state(8, 1), LoraSpec(8, 4.0))
    client = fit(glob, 8, 2.0, LoraSpec(8, 16.0))
    torch.testing.assert_close(product(client.state, 2.0), product(glob.state, 0.5))
    assert torch.equal(client.state[A], glob.state[A])


def test_svd_default_alpha_keeps_the_clients_scaling_not_alpha_equals_rank():
    # the cause of svd's slow learning at many clients: the reference's alpha = R halved the scaling
    s = strategy("svd", r=8, lora_alpha=16.0)
    out = s.aggregate(1, None, [ClientUpdate(state(8, i), 2.0, 1) for i in range(3)])
    assert out.adapter.lora.scaling == pytest.approx(2.0)
    reference = aggregate_svd([ClientUpdate(state(8, i), 2.0, 1) for i in range(3)], rank=8, alpha=8.0)
    torch.testing.assert_close(
        product(out.adapter.state, 2.0), product(reference.state, 1.0), rtol=1e-5, atol=1e-6
    )


def test_methods_refuse_options_they_would_ignore():
    for method in ("naive", "exact", "ffa", "rolora"):
        with pytest.raises(ValueError, match=f"--svd-rank applies to --aggregation svd only: {method}"):
            strategy(method, rank=4)
        with pytest.raises(ValueError, match="--alpha applies to --aggregation svd only"):
            strategy(method, alpha=4.0)


def test_client_ranks_from_a_json_file(tmp_path):
    path = tmp_path / "ranks.json"
    path.write_text(json.dumps({"1": 2, "2": 16}))
    spec = AggregationSpec("svd", client_ranks=str(path))
    assert spec.ranks_for([1, 2], 8) == {1: 2, 2: 16}
    with pytest.raises(ValueError, match="no rank for client"):
        spec.ranks_for([1, 2, 3], 8)
    with pytest.raises(ValueError, match="whole numbers"):
        AggregationSpec("svd", client_ranks="4,x")


# --- end to end on the fixture model ----------------------------------------------------------------


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    order = np.random.default_rng(0).permutation(600).tolist()
    return write_manifests(
        tmp_path_factory.mktemp("shards") / "k3", [order[:100], order[100:300], order[300:]]
    )


def rounds_args(model, glue, shards, root, name, method, *extra):
    return ["rounds", "--task", "sst2", "--model", model, "--data-dir", glue, "--shards", shards,
            "--output-root", root, "--run-name", name, "--aggregation", method, "--rounds", "3",
            "--max-eval-samples", "100", *FAST, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tiny_model, glue_dir, shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for method, extra in (("exact", ["--client-ranks", "4,8,8"]), ("ffa", ["--lora-r", "32", "--lora-alpha", "64"]),
                          ("rolora", []), ("svd", ["--client-ranks", "4,8,8"])):  # fmt: skip
        result = run(*rounds_args(tiny_model, glue_dir, shards, root, method, method, *extra))
        assert result.exit_code == 0, result.stderr
        out[method] = root / "sst2_tiny-roberta" / method
    return out


def adapter_of(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def rows(run_dir: Path) -> list[dict]:
    """The rounds' rows (round 0, the starting adapter's evaluation, left out)."""
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return [r for r in rows if r["round"] > 0]


@pytest.mark.slow
def test_every_method_learns_and_records_ranks(runs):
    # ffa runs at r=32: on this random-weight fixture model a frozen random A of rank 8 leaves B too
    # little to work with (measured: B-only training stays at chance even centralised; rank 32 learns)
    for method, run_dir in runs.items():
        history = rows(run_dir)
        final = json.loads((run_dir / "final" / "metrics.json").read_text())
        assert final["metrics"]["accuracy"] >= 0.8, (method, [h["eval"] for h in history])
        assert [h["aggregation"]["method"] for h in history] == [method] * 3
    for method in ("exact", "svd"):  # --client-ranks 4,8,8: each client trains and saves its own rank
        for h in rows(runs[method]):
            assert [c["rank"] for c in h["client_metrics"]] == [4, 8, 8]
        cfg = json.loads(
            (runs[method] / "round_002" / "client_001" / "adapter" / "adapter_config.json").read_text()
        )
        assert (cfg["r"], cfg["lora_alpha"]) == (4, 8)  # alpha_i = (16 / 8) · 4


@pytest.mark.slow
def test_frozen_parts_stay_bit_identical_in_every_client_and_round(runs):
    start = None
    for rnd in (1, 2, 3):
        broadcast = adapter_of(runs["ffa"] / f"round_{rnd - 1:03d}" / "global") if rnd > 1 else None
        for c in (1, 2, 3):
            client = adapter_of(runs["ffa"] / f"round_{rnd:03d}" / f"client_{c:03d}")
            a = {k: v for k, v in client.items() if "lora_A" in k}
            start = start or a
            assert all(torch.equal(a[k], start[k]) for k in a)  # A: the same in every client and round
            if broadcast is not None:
                assert all(not torch.equal(client[k], broadcast[k]) for k in client if "lora_B" in k)
    for rnd in (2, 3):  # rolora: round 2 trains A (B frozen), round 3 trains B (A frozen)
        frozen = "lora_B" if rnd == 2 else "lora_A"
        broadcast = adapter_of(runs["rolora"] / f"round_{rnd - 1:03d}" / "global")
        for c in (1, 2, 3):
            client = adapter_of(runs["rolora"] / f"round_{rnd:03d}" / f"client_{c:03d}")
            assert all(torch.equal(client[k], broadcast[k]) for k in client if frozen in k)
            assert all(
                not torch.equal(client[k], broadcast[k]) for k in client if "lora_" in k and frozen not in k
            )


@pytest.mark.slow
def test_exact_ships_its_residual_and_its_final_adapter_reproduces_the_global_model(
    runs, tiny_model, glue_dir
):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedlora_cli.config import DataSpec, ModelSpec
    from fedlora_cli.evaluation import predict
    from fedlora_cli.features import load_task_data
    from fedlora_cli.modeling import LoraModel, load_base_model, load_tokenizer, read_adapter
    from fedlora_cli.progress import NullProgress

    run_dir = runs["exact"]
    history = rows(run_dir)
    assert history[1]["bytes_down"] > history[0]["bytes_down"]  # round 2 ships the residual's factors
    assert all(h["aggregation"]["error"] < 1e-6 for h in history)
    state = load_file(str(run_dir / "round_003" / "global" / "state.safetensors"))
    assert state and all(k.endswith(("|P", "|Q")) for k in state)

    # fedlora's own evaluation of the global model (adapter + residual) …
    spec = ModelSpec(str(tiny_model))
    data = load_task_data(DataSpec("sst2", str(glue_dir), max_eval_samples=100), load_tokenizer(spec), train=False,
                          progress=NullProgress())  # fmt: skip
    glob = read_adapter(run_dir / "round_003" / "global" / "adapter")
    task = DataSpec("sst2").glue_task
    ours = LoraModel(load_base_model(spec, task, 0), glob.lora, torch.device("cpu"))
    residual = {k[:-2]: (state[k], state[k[:-2] + "|Q"]) for k in state if k.endswith("|P")}
    ours.load_state(glob.state, glob.lora)
    ours.set_base_delta(residual, "x")
    # … and plain PEFT on final/adapter, nothing of fedlora: the same predictions
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=2)
    plain = PeftModel.from_pretrained(base, str(run_dir / "final" / "adapter")).eval()
    split = next(iter(data.evals.values()))
    logits_ours, _, _ = predict(ours.module, split, 50, torch.device("cpu"), "fp32")
    logits_plain, _, _ = predict(plain, split, 50, torch.device("cpu"), "fp32")
    torch.testing.assert_close(
        torch.as_tensor(logits_plain), torch.as_tensor(logits_ours), rtol=1e-4, atol=1e-4
    )
    final_cfg = json.loads((run_dir / "final" / "adapter" / "adapter_config.json").read_text())
    assert final_cfg["r"] > 8 and final_cfg["lora_alpha"] / final_cfg["r"] == pytest.approx(2.0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["exact", "rolora"])
def test_resume_after_an_interruption_is_bit_identical(
    method, runs, tiny_model, glue_dir, shards, tmp_path, monkeypatch
):
    from fedlora_cli.federation import local

    real = local.train_client

    def interrupt(model, data, indices, plan, *args, **kwargs):
        if (kwargs["round_no"], plan.client_id) == (3, 2):
            raise KeyboardInterrupt
        return real(model, data, indices, plan, *args, **kwargs)

    extra = ["--client-ranks", "4,8,8"] if method == "exact" else []
    args = rounds_args(tiny_model, glue_dir, shards, tmp_path, method, method, *extra)
    with monkeypatch.context() as m:
        m.setattr(local, "train_client", interrupt)
        one_error_line(run(*args), 130, "--resume")
    again = run(*args, "--resume")
    assert again.exit_code == 0, again.stderr
    resumed, reference = tmp_path / "sst2_tiny-roberta" / method, runs[method]
    for path in sorted(reference.rglob("*.safetensors")):
        assert path.read_bytes() == (resumed / path.relative_to(reference)).read_bytes(), path


@pytest.mark.slow
def test_fedprox_pulls_clients_toward_the_global_adapter_and_zero_changes_nothing(
    tiny_model, glue_dir, shards, tmp_path
):
    def distance(name: str) -> float:
        run_dir = tmp_path / "sst2_tiny-roberta" / name
        broadcast = adapter_of(run_dir / "round_001" / "global")
        client = adapter_of(run_dir / "round_002" / "client_003")
        return sum(float((client[k] - broadcast[k]).square().sum()) for k in client) ** 0.5

    for name, mu in (("mu0", "0"), ("plain", None), ("mu10", "10")):
        extra = ["--prox-mu", mu] if mu is not None else []
        result = run(*rounds_args(tiny_model, glue_dir, shards, tmp_path, name, "svd", *extra),
                     "--rounds", "2", "--no-eval-each-round")  # fmt: skip
        assert result.exit_code == 0, result.stderr
    same = tmp_path / "sst2_tiny-roberta"
    for path in sorted((same / "plain").rglob("*.safetensors")):
        assert path.read_bytes() == (same / "mu0" / path.relative_to(same / "plain")).read_bytes()
    assert distance("mu10") < 0.8 * distance("plain")


@pytest.mark.slow
def test_merge_takes_the_method_names_that_apply(runs, tmp_path):
    ffa_clients = [runs["ffa"] / "round_002" / f"client_{c:03d}" / "adapter" for c in (1, 2, 3)]
    result = run(
        "merge", "--adapters", *ffa_clients, "--aggregation", "ffa", "--save-adapter", tmp_path / "ffa"
    )
    assert result.exit_code == 0, result.stderr
    merged = load_file(str(tmp_path / "ffa" / "adapter_model.safetensors"))
    first = adapter_of(ffa_clients[0].parent)
    assert all(torch.equal(merged[k], first[k]) for k in merged if "lora_A" in k)  # the shared A, kept
    exact_clients = [runs["exact"] / "round_001" / f"client_{c:03d}" / "adapter" for c in (1, 2, 3)]
    result = run(
        "merge", "--adapters", *exact_clients, "--aggregation", "exact", "--save-adapter", tmp_path / "ex"
    )
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((tmp_path / "ex" / "fuse_manifest.json").read_text())
    assert (
        manifest["aggregation_error"] < 1e-6 and manifest["svd_rank"] >= 8
    )  # lossless, at the rank it needs
    one_error_line(run("merge", "--adapters", *exact_clients, "--aggregation", "rolora", "--save-adapter",
                       tmp_path / "r"), 2, "rolora cannot merge existing adapters")  # fmt: skip
    one_error_line(run("merge", "--adapters", *exact_clients, "--aggregation", "ffa", "--save-adapter", tmp_path / "f"),
                   2, "not the frozen factor")  # fmt: skip


def test_the_registry_is_the_cli_choices_and_the_docs_methods_table():
    from typer.main import get_command

    from fedlora_cli.app import app

    rounds = get_command(app).commands["rounds"]
    choice = next(p for p in rounds.params if "--aggregation" in getattr(p, "opts", ())).type
    assert list(choice.choices) == list(METHODS)
    # the methods table moved from the README to the docs site
    readme = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    for name in METHODS:
        assert f"| `{name}` |" in readme, name
    for name in METHODS:
        lora_modules(build_strategy(AggregationSpec(name), LoraSpec(), seed=0).initial(
            GlobalAdapter(state(8, 0), LoraSpec())).state)  # fmt: skip


def test_exact_under_dp_without_noise_keeps_the_global_model_exact():
    """DP noises exact's dense ΔW (update_space product); at z = 0 and C = ∞ the global model is still
    exactly the (unweighted, DP-FedAvg) mean of the client updates, residual included."""
    pytest.importorskip("dp_accounting", reason="the `privacy` extra is not installed")
    from fedlora_cli.config import PrivacySpec
    from fedlora_cli.strategies.privacy import with_privacy

    inner = strategy("exact")
    assert inner.update_space == "product"
    dp = with_privacy(
        inner, PrivacySpec(clip=float("inf"), noise_multiplier=0.0), clients=3, per_round=3, seed=0
    )
    current = GlobalAdapter(state(4, 0, zero_b=True), LoraSpec(4, 8.0))
    for rnd in (1, 2):
        plans = [dp.plan(rnd, c, current) for c in (1, 2, 3)]
        updates = client_updates(plans, rnd)
        before = inner.base_delta().get(M)
        r_before = before[0].double() @ before[1].double() if before else 0.0
        out = dp.aggregate(rnd, current, updates, sampled=3)
        # each client moved from the broadcast; DP-FedAvg averages those moves with equal weights
        moves = [product(u.state, 2.0) - product(current.state, 2.0) for u in updates]
        expected = r_before + product(current.state, 2.0) + sum(moves) / 3
        p, q = inner.base_delta()[M]
        got = p.double() @ q.double() + product(out.adapter.state, 2.0)
        assert float((got - expected).norm() / expected.norm()) < 1e-5
        current = out.adapter
