"""Server optimisers (--server-optimizer): every optimiser against a float64 reference of Reddi et al.'s
Algorithm 2 written here, in both update spaces; the moments as server state (resume bit-identical after a
kill); DP noises first, then the server steps."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import one_error_line, run
from safetensors.torch import load_file
from test_rounds import write_manifests

from fedlora_cli.aggregation import ClientUpdate
from fedlora_cli.config import AggregationSpec, LoraSpec, PrivacySpec, RoundsConfig, ServerOptSpec
from fedlora_cli.strategies import build_strategy
from fedlora_cli.strategies.base import GlobalAdapter
from fedlora_cli.strategies.server_opt import ServerOptStrategy, with_server_optimizer

M = "m.query"
A, B, HEAD = f"{M}.lora_A.weight", f"{M}.lora_B.weight", "head.weight"
DIMS = (12, 10)  # d_out, d_in
W = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) / 6  # the clients' example weights, normalised


def state(r: int, seed: int, zero_b: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b = (
        torch.zeros(DIMS[0], r, dtype=torch.float64)
        if zero_b
        else torch.randn(DIMS[0], r, generator=g).double()
    )
    return {
        A: torch.randn(r, DIMS[1], generator=g).double(),
        B: b,
        HEAD: torch.randn(3, generator=g).double(),
    }


def product(st: dict[str, torch.Tensor], scaling: float) -> torch.Tensor:
    return scaling * st[B].double() @ st[A].double()


def opt_strategy(method: str, spec: ServerOptSpec, ranks: str | None = None):
    inner = build_strategy(
        AggregationSpec(method, client_ranks=ranks), LoraSpec(4, 8.0), seed=0, client_ids=[1, 2, 3]
    )
    return with_server_optimizer(inner, spec)


def client_updates(plans, seed: int) -> list[ClientUpdate]:
    """What clients send: fresh random factors (the trained ones) and head, at each plan's shape."""
    out = []
    for i, plan in enumerate(plans):
        fresh = state(plan.adapter.lora.r, seed * 10 + i)
        trained = {A: "A", B: "B"}
        st = {
            k: fresh[k] if trained.get(k, "head") in plan.train else v for k, v in plan.adapter.state.items()
        }
        out.append(ClientUpdate(st, plan.adapter.lora.scaling, i + 1, client=plan.client_id))
    return out


class Algorithm2:
    """Reddi et al. (ICLR 2021), Algorithm 2, and FedAvgM, on one dense float64 tensor per name, written out
    independently of fedlora_cli/server_optim.py: m_{-1} = 0, v_{-1} = τ², no bias correction."""

    def __init__(self, name: str, lr: float, beta1=0.9, beta2=0.99, tau=1e-3, momentum=0.9) -> None:
        self.name, self.lr, self.b1, self.b2, self.tau, self.beta = name, lr, beta1, beta2, tau, momentum
        self.m: dict[str, torch.Tensor] = {}
        self.v: dict[str, torch.Tensor] = {}

    def __call__(self, key: str, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        if self.name == "avg":
            return x + self.lr * delta
        if self.name == "momentum":
            self.m[key] = delta if key not in self.m else self.beta * self.m[key] + delta
            return x + self.lr * self.m[key]
        m = self.m.get(key, torch.zeros_like(delta))
        self.m[key] = self.b1 * m + (1 - self.b1) * delta
        v = self.v.get(key, torch.full_like(delta, self.tau**2))
        if self.name == "adagrad":
            v = v + delta**2
        elif self.name == "yogi":
            v = v - (1 - self.b2) * delta**2 * torch.sign(v - delta**2)
        else:
            v = self.b2 * v + (1 - self.b2) * delta**2
        self.v[key] = v
        return x + self.lr * self.m[key] / (v.sqrt() + self.tau)


OPTIMIZERS = [("adam", 0.05), ("yogi", 0.05), ("adagrad", 0.05), ("momentum", 0.5), ("avg", 0.5)]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name, lr", OPTIMIZERS)
def test_factor_space_matches_algorithm_2_over_three_rounds(name, lr):
    """naive (factor space): Δ = the mean of the clients' factors − the broadcast, per key."""
    s = opt_strategy("naive", ServerOptSpec(name, lr=lr))
    assert isinstance(s, ServerOptStrategy) and s.update_space == "factors"
    current = GlobalAdapter(state(4, 0), LoraSpec(4, 8.0))
    ref, x = Algorithm2(name, lr), dict(current.state)
    for rnd in (1, 2, 3):
        updates = client_updates([s.plan(rnd, c, current) for c in (1, 2, 3)], rnd)
        out = s.aggregate(rnd, current, updates, sampled=3)
        x = {k: ref(k, x[k], sum(w * u.state[k] for w, u in zip(W, updates, strict=True)) - x[k]) for k in x}
        for k in x:
            assert relative(out.adapter.state[k].double(), x[k]) < 1e-6, (rnd, k)
        assert out.record["server_optimizer"]["name"] == name and out.record["method"] == "naive"
        current = out.adapter


@pytest.mark.parametrize("name, lr", OPTIMIZERS)
@pytest.mark.parametrize("method", ["exact", "svd"])
def test_product_space_matches_algorithm_2_over_three_rounds(method, name, lr):
    """svd and exact (product space): Δ = Σ w_i s B_i A_i − s B_0 A_0 per module (the head per key); the method
    then writes the stepped model as it always does: exact exactly (adapter + residual), svd truncated to r."""
    s = opt_strategy(method, ServerOptSpec(name, lr=lr))
    assert s.update_space == "product"
    current = GlobalAdapter(state(4, 0, zero_b=True), LoraSpec(4, 8.0))
    ref = Algorithm2(name, lr)
    model, head = product(current.state, 2.0), current.state[HEAD]
    for rnd in (1, 2, 3):
        residual = s.base_delta().get(M)
        r_before = residual[0].double() @ residual[1].double() if residual is not None else 0.0
        updates = client_updates([s.plan(rnd, c, current) for c in (1, 2, 3)], rnd)
        out = s.aggregate(rnd, current, updates, sampled=3)
        mean = sum(w * (r_before + product(u.state, 2.0)) for w, u in zip(W, updates, strict=True))
        model = ref(M, model, mean - model)
        if method == "svd":  # the method's own truncation of the stepped model, to its rank 4
            u, sv, vh = torch.linalg.svd(model)
            model = u[:, :4] @ torch.diag(sv[:4]) @ vh[:4]
        head = ref(HEAD, head, sum(w * u.state[HEAD] for w, u in zip(W, updates, strict=True)) - head)
        residual = s.base_delta().get(M)
        got = product(out.adapter.state, 2.0) + (
            residual[0].double() @ residual[1].double() if residual else 0.0
        )
        assert relative(got, model) < 1e-6, rnd
        assert relative(out.adapter.state[HEAD], head) < 1e-6
        current = out.adapter
    moments = s.state_dict()
    if name in ("adam", "yogi", "adagrad"):  # the second moment is dense per module
        assert moments[f"server_opt.v.{M}"].shape == DIMS
    assert all(t.dtype == torch.float32 for k, t in moments.items() if k.startswith("server_opt."))


def test_the_first_moment_stays_factored_while_that_is_cheaper_then_turns_dense():
    """Momentum in product space: m = P·Q grows by at most Σ r_i + R ranks a round; once P and Q would hold more
    numbers than the d_out x d_in matrix (k·(d_out + d_in) >= d_out·d_in) it is kept dense. Same model either way."""
    dims, r = (40, 30), 2
    big = {A: torch.zeros(r, dims[1]), B: torch.zeros(dims[0], r), HEAD: torch.zeros(3)}
    s = opt_strategy("exact", ServerOptSpec("momentum", lr=0.5, momentum=0.9))
    current = GlobalAdapter({k: v.double() for k, v in big.items()}, LoraSpec(r, 4.0))
    ref, model, forms = Algorithm2("momentum", 0.5, momentum=0.9), torch.zeros(dims, dtype=torch.float64), []
    for rnd in (1, 2, 3):
        residual = s.base_delta().get(M)
        r_before = residual[0].double() @ residual[1].double() if residual is not None else 0.0
        updates = []
        for i, plan in enumerate(s.plan(rnd, c, current) for c in (1, 2, 3)):
            g = torch.Generator().manual_seed(100 * rnd + i)
            st = {A: torch.randn(r, dims[1], generator=g).double(), B: torch.randn(dims[0], r, generator=g).double(),
                  HEAD: torch.randn(3, generator=g).double()}  # fmt: skip
            updates.append(ClientUpdate(st, plan.adapter.lora.scaling, i + 1))
        current = s.aggregate(rnd, current, updates, sampled=3).adapter
        model = ref(
            M,
            model,
            sum(w * (r_before + product(u.state, 2.0)) for w, u in zip(W, updates, strict=True)) - model,
        )
        p, q = s.base_delta()[M]
        assert relative(p.double() @ q.double() + product(current.state, 2.0), model) < 1e-6
        state_ = s.state_dict()
        forms.append("dense" if f"server_opt.m.{M}" in state_ else state_[f"server_opt.m.{M}|P"].shape[1])
    assert (
        forms[0] == 6 and forms[-1] == "dense"
    )  # rank 3·2 after round 1 (B_0 = 0); > 1200 / 70 = 17 by round 3


def test_a_frozen_factor_stays_bit_identical_under_an_adaptive_optimiser():
    s = opt_strategy("ffa", ServerOptSpec("adam", lr=0.05))
    start = GlobalAdapter({k: v.float() for k, v in state(4, 0).items()}, LoraSpec(4, 8.0))
    current = start
    for rnd in (1, 2, 3):
        plans = [s.plan(rnd, c, current) for c in (1, 2, 3)]
        updates = [ClientUpdate({k: v.float() for k, v in u.state.items()}, u.scaling, u.weight)
                   for u in client_updates(plans, rnd)]  # fmt: skip
        current = s.aggregate(rnd, current, updates, sampled=3).adapter
        assert current.state[A].dtype == torch.float32
    assert torch.equal(current.state[A], start.state[A]) and not torch.equal(current.state[B], start.state[B])


@pytest.mark.parametrize("method", ["naive", "svd", "hetlora"])
def test_the_moments_round_trip_through_state_dict_and_a_resumed_round_is_bit_identical(method):
    spec = ServerOptSpec("yogi", lr=0.05)
    s, current = opt_strategy(method, spec, ranks="2,4,4"), GlobalAdapter(state(4, 0), LoraSpec(4, 8.0))
    for rnd in (1, 2):
        current = s.aggregate(rnd, current, client_updates([s.plan(rnd, c, current) for c in (1, 2, 3)], rnd),
                              sampled=3).adapter  # fmt: skip
    resumed = opt_strategy(method, spec, ranks="2,4,4")
    resumed.load_state_dict({k: v.clone() for k, v in s.state_dict().items()})
    plans = [s.plan(3, c, current) for c in (1, 2, 3)]
    assert [p.adapter.lora.r for p in plans] == [
        resumed.plan(3, c, current).adapter.lora.r for c in (1, 2, 3)
    ]
    a = s.aggregate(3, current, client_updates(plans, 3), sampled=3)
    b = resumed.aggregate(3, current, client_updates(plans, 3), sampled=3)
    assert all(torch.equal(a.adapter.state[k], b.adapter.state[k]) for k in a.adapter.state)
    after, again = s.state_dict(), resumed.state_dict()
    assert after.keys() == again.keys() and all(torch.equal(x, again[k]) for k, x in after.items())


def test_a_run_without_moments_refuses_them_and_unknown_keys():
    with pytest.raises(ValueError, match="unknown server optimiser state"):
        opt_strategy("naive", ServerOptSpec("adam")).load_state_dict({"server_opt.x": torch.zeros(1)})
    with pytest.raises(ValueError, match="--server-optimizer is avg"):
        opt_strategy("naive", ServerOptSpec("avg", lr=0.5)).load_state_dict(
            {f"server_opt.m.{A}": torch.zeros(1)}
        )


def test_plain_avg_is_the_method_itself():
    inner = build_strategy(AggregationSpec("svd"), LoraSpec(), seed=0)
    assert with_server_optimizer(inner, ServerOptSpec()) is inner
    assert with_server_optimizer(inner, ServerOptSpec(lr=1.0)) is inner
    assert isinstance(with_server_optimizer(inner, ServerOptSpec(lr=0.5)), ServerOptStrategy)


def test_dp_noises_first_then_the_server_steps():
    """DP-FedAdam: with z = 0 and C = ∞ the DP pseudo-update is the clients' equal-weight mean, and the server's
    Adam step is taken on it, so the global model follows Algorithm 2 with weights 1/m."""
    pytest.importorskip("dp_accounting", reason="the `privacy` extra is not installed")
    from fedlora_cli.strategies.privacy import with_privacy

    inner = opt_strategy("exact", ServerOptSpec("adam", lr=0.05))
    dp = with_privacy(
        inner, PrivacySpec(clip=float("inf"), noise_multiplier=0.0), clients=3, per_round=3, seed=0
    )
    assert dp.inner is inner and dp.update_space == "product"
    current = GlobalAdapter(state(4, 0, zero_b=True), LoraSpec(4, 8.0))
    ref, model = Algorithm2("adam", 0.05), torch.zeros(DIMS, dtype=torch.float64)
    for rnd in (1, 2):
        residual = inner.base_delta().get(M)
        r_before = residual[0] @ residual[1] if residual is not None else 0.0
        updates = client_updates([dp.plan(rnd, c, current) for c in (1, 2, 3)], rnd)
        out = dp.aggregate(rnd, current, updates, sampled=3)
        model = ref(M, model, sum(r_before + product(u.state, 2.0) for u in updates) / 3 - model)
        p, q = inner.base_delta()[M]
        assert relative(p.double() @ q.double() + product(out.adapter.state, 2.0), model) < 1e-6
        assert "privacy" in out.record and out.record["server_optimizer"]["name"] == "adam"
        current = out.adapter


def test_options_of_another_optimiser_are_refused():
    for spec, says in ((dict(optimizer="adam", momentum=0.5), "--server-momentum applies to --server-optimizer momentum"),
                       (dict(optimizer="momentum", tau=1e-2), "--server-tau applies to"),
                       (dict(optimizer="avg", betas=(0.5, 0.9)), "--server-betas applies to"),
                       (dict(optimizer="adam", betas=(0.9,)), "two numbers in [0, 1)"),
                       (dict(optimizer="adam", betas=(0.9, 1.0)), "two numbers in [0, 1)"),
                       (dict(optimizer="sgd"), "--server-optimizer must be one of")):  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(says)):
            ServerOptSpec(**spec)
    assert ServerOptSpec("yogi", betas="0.5,0.9").betas == (0.5, 0.9)  # Flower's run config: a string
    assert ServerOptSpec("adam").effective_lr == 1e-2 and ServerOptSpec("momentum").effective_lr == 1.0
    assert not ServerOptSpec().enabled and ServerOptSpec("adagrad").enabled


def test_the_cli_takes_the_optimiser_and_refuses_what_does_not_apply(tiny_model, glue_dir, tmp_path):
    from fedlora_cli.flower.codec import from_run_config, to_run_config

    base = ["rounds", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--clients", "2",
            "--output-dir", tmp_path / "x"]  # fmt: skip
    one_error_line(
        run(*base, "--server-momentum", "0.5"), 2, "--server-momentum applies to --server-optimizer momentum"
    )
    one_error_line(
        run(*base, "--server-optimizer", "adam", "--server-betas", "0.9", "1.5"), 2, "--server-betas must be"
    )
    spec = ServerOptSpec("yogi", lr=0.1, betas=(0.5, 0.9), tau=1e-2)
    from fedlora_cli.config import DataSpec

    cfg = RoundsConfig(data=DataSpec("sst2"), server_opt=spec)
    assert from_run_config(to_run_config(cfg)).server_opt == spec  # Flower's flat run config


# --- end to end: the moments are saved each round and a killed run resumes bit-identically ----------

QUICK = ["--local-epochs", "1", "--learning-rate", "2e-2", "--precision", "fp32", "--batch-size", "32",
         "--max-eval-samples", "50", "--rounds", "3", "--server-optimizer", "adam", "--server-lr", "0.01"]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    order = np.random.default_rng(2).permutation(600).tolist()
    return write_manifests(tmp_path_factory.mktemp("shards") / "k2", [order[:60], order[60:140]])


def args(model, glue, shards, out, *extra):
    return ["rounds", "--task", "sst2", "--model", model, "--data-dir", glue, "--shards", shards,
            "--output-dir", out, *QUICK, *extra]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("method", ["svd", "naive"])
def test_a_killed_run_resumes_bit_identically_with_its_moments(method, tiny_model, glue_dir, shards, tmp_path,
                                                              monkeypatch):  # fmt: skip
    from fedlora_cli.federation import local

    reference = tmp_path / "whole"
    result = run(*args(tiny_model, glue_dir, shards, reference, "--aggregation", method))
    assert result.exit_code == 0, result.stderr
    for r in (1, 2, 3):  # the moments are in every round's server state
        saved = load_file(str(reference / f"round_{r:03d}" / "global" / "state.safetensors"))
        assert any(k.startswith("server_opt.v.") for k in saved) and any(
            k.startswith("server_opt.m.") for k in saved
        )

    real = local.train_client

    def killed_in_round_three(model, data, indices, plan, *a, **kw):
        if (kw["round_no"], plan.client_id) == (3, 2):
            raise KeyboardInterrupt
        return real(model, data, indices, plan, *a, **kw)

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as m:
        m.setattr(local, "train_client", killed_in_round_three)
        one_error_line(
            run(*args(tiny_model, glue_dir, shards, resumed, "--aggregation", method)), 130, "--resume"
        )
    again = run(*args(tiny_model, glue_dir, shards, resumed, "--aggregation", method, "--resume"))
    assert again.exit_code == 0, again.stderr
    for path in sorted(reference.rglob("*.safetensors")):  # adapters, moments, final: bit-identical
        assert path.read_bytes() == (resumed / path.relative_to(reference)).read_bytes(), path
