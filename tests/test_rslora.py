"""rsLoRA (--use-rslora, scaling alpha / √r): every method keeps the clients' convention at every rank, and an
rsLoRA adapter round-trips through train, rounds, merge, eval and plain PEFT."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from clitools import run
from safetensors.torch import load_file

from fedlora_cli.aggregation import ClientUpdate
from fedlora_cli.config import AggregationSpec, HetloraOptions, LoraSpec, SvdOptions
from fedlora_cli.strategies import METHODS, build_strategy
from fedlora_cli.strategies.base import GlobalAdapter, fit

M = "m.query"
A, B, HEAD = f"{M}.lora_A.weight", f"{M}.lora_B.weight", "head.weight"
DIMS = (12, 10)
RS = LoraSpec(4, 8.0, use_rslora=True)  # scaling 8 / √4 = 4 at every rank
W = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) / 6


def state(r: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(r, DIMS[1], generator=g).double(), B: torch.randn(DIMS[0], r, generator=g).double(),
            HEAD: torch.randn(3, generator=g).double()}  # fmt: skip


def product(st: dict[str, torch.Tensor], scaling: float) -> torch.Tensor:
    return scaling * st[B].double() @ st[A].double()


def pad(st: dict[str, torch.Tensor], r: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, a = st[B], st[A]
    return (torch.cat([b, b.new_zeros(DIMS[0], r - b.shape[1])], dim=1),
            torch.cat([a, a.new_zeros(r - a.shape[0], DIMS[1])], dim=0))  # fmt: skip


def test_the_rslora_scaling_and_alpha_at_another_rank():
    assert RS.scaling == pytest.approx(4.0) and LoraSpec(4, 8.0).scaling == pytest.approx(2.0)
    at8 = RS.at_rank(8)
    assert (
        at8.use_rslora
        and at8.alpha == pytest.approx(4.0 * math.sqrt(8))
        and at8.scaling == pytest.approx(4.0)
    )
    assert RS.at_rank(2, scaling=1.0).alpha == pytest.approx(math.sqrt(2))
    assert LoraSpec(4, 8.0).at_rank(8).alpha == pytest.approx(16.0)  # plain LoRA: alpha = s·r


def test_fit_moves_an_rslora_adapter_between_ranks_keeping_the_product():
    glob = GlobalAdapter(state(8, 1), RS.at_rank(8, scaling=0.5))
    client = fit(glob, 8, 4.0)
    assert client.lora.use_rslora and client.lora.alpha == pytest.approx(4.0 * math.sqrt(8))
    torch.testing.assert_close(product(client.state, 4.0), product(glob.state, 0.5))


# Methods whose clients send B and A (fedsa keeps B at home and local sends nothing: they aggregate no product)
SENDING = [name for name, m in METHODS.items() if not m.personal]


@pytest.mark.parametrize("method", SENDING)
def test_every_method_keeps_the_clients_rslora_scaling_with_mixed_ranks(method):
    options = {"hetlora": HetloraOptions(gamma=1.0)} if method == "hetlora" else {}
    s = build_strategy(
        AggregationSpec(method, client_ranks="2,4,8", **options), RS, seed=0, client_ids=[1, 2, 3]
    )
    for cid, r in ((1, 2), (2, 4), (3, 8)):
        lora = s.client_lora(cid)
        assert (lora.r, lora.use_rslora) == (r, True) and lora.scaling == pytest.approx(4.0)
        assert lora.alpha == pytest.approx(4.0 * math.sqrt(r))  # alpha_i = s·√r_i
    current = GlobalAdapter(state(8, 0), RS.at_rank(8))
    plans = [s.plan(1, c, current) for c in (1, 2, 3)]
    assert all(p.adapter.lora.scaling == pytest.approx(4.0) and p.adapter.lora.use_rslora for p in plans)
    updates = []
    for i, plan in enumerate(plans):
        fresh = state(plan.adapter.lora.r, 10 + i)
        trained = {A: "A", B: "B"}
        st = {
            k: fresh[k] if trained.get(k, "head") in plan.train else v for k, v in plan.adapter.state.items()
        }
        updates.append(ClientUpdate(st, plan.adapter.lora.scaling, i + 1, client=plan.client_id))
    out = s.aggregate(1, current, updates)
    lora = out.adapter.lora
    assert lora.use_rslora and lora.r == 8 and lora.scaling == pytest.approx(4.0), lora
    assert out.record["alpha"] == pytest.approx(lora.alpha)
    mean = sum(w * product(u.state, 4.0) for w, u in zip(W, updates, strict=True))
    got = product(out.adapter.state, lora.scaling)
    if method == "exact":
        p, q = s.base_delta()[M]
        got = got + p.double() @ q.double()
    if method in ("naive", "hetlora"):  # zero-padded means of the factors (hetlora: sparsity weights)
        weights = W
        if method == "hetlora":
            norms = torch.tensor([float(product(u.state, 4.0).norm()) for u in updates], dtype=torch.float64)
            weights = norms / norms.sum()
        padded = [pad(u.state, 8) for u in updates]
        expected = (
            4.0
            * sum(w * b for w, (b, _) in zip(weights, padded, strict=True))
            @ sum(w * a for w, (_, a) in zip(weights, padded, strict=True))
        )
    elif method == "svd":  # the best rank-8 approximation of the mean (Σ r_i = 14 > 8)
        u, sv, vh = torch.linalg.svd(mean)
        expected = u[:, :8] @ torch.diag(sv[:8]) @ vh[:8]
    else:  # exact, ffa, rolora: the mean itself
        expected = mean
    assert float((got - expected).norm() / expected.norm()) < 1e-6
    final = s.export(out.adapter)  # exact: one plain adapter at the rank it needs, same convention
    assert final.lora.use_rslora and final.lora.scaling == pytest.approx(4.0)


def test_svd_fixed_alpha_keeps_lora_alpha_at_every_rank_with_rslora():
    s = build_strategy(AggregationSpec("svd", client_ranks="2,8", svd=SvdOptions(rank_scaling="fixed-alpha")),
                       RS, seed=0, client_ids=[1, 2])  # fmt: skip
    assert [s.client_lora(c).alpha for c in (1, 2)] == [8.0, 8.0]
    assert [s.client_lora(c).scaling for c in (1, 2)] == pytest.approx([8 / math.sqrt(2), 8 / math.sqrt(8)])
    assert s.global_alpha == 8.0


def test_an_rslora_adapter_config_is_read_and_a_wrong_one_refused(tmp_path):
    from fedlora_cli.errors import InputError
    from fedlora_cli.modeling import _lora_from_config

    cfg = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["query"], "use_rslora": True}
    assert _lora_from_config(cfg, "x") == LoraSpec(4, 8.0, 0.0, ("query",), use_rslora=True)
    with pytest.raises(InputError, match="'use_rslora' must be true or false"):
        _lora_from_config({**cfg, "use_rslora": "yes"}, "x")
    with pytest.raises(InputError, match="use_dora"):
        _lora_from_config({**cfg, "use_dora": True}, "x")


# --- end to end: train, rounds, merge, eval and plain PEFT ----------------------------------------------

FAST = ["--learning-rate", "2e-2", "--precision", "fp32", "--batch-size", "32", "--max-train-samples", "200",
        "--max-eval-samples", "60", "--lora-r", "4", "--lora-alpha", "8", "--use-rslora"]  # fmt: skip


def logits(tiny_model: Path, glue_dir: Path, adapter: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The dev logits of an adapter as fedlora computes them, and as plain PEFT does (nothing of fedlora)."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedlora_cli.config import DataSpec, ModelSpec
    from fedlora_cli.evaluation import predict
    from fedlora_cli.features import load_task_data
    from fedlora_cli.modeling import LoraModel, load_base_model, load_tokenizer, read_adapter
    from fedlora_cli.progress import NullProgress

    spec, data_spec = ModelSpec(str(tiny_model)), DataSpec("sst2", str(glue_dir), max_eval_samples=60)
    data = load_task_data(data_spec, load_tokenizer(spec), train=False, progress=NullProgress())
    split = next(iter(data.evals.values()))
    ours = read_adapter(adapter)
    model = LoraModel(load_base_model(spec, data_spec.glue_task, 0), ours.lora, torch.device("cpu"))
    model.load_state(ours.state, ours.lora)
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=2)
    plain = PeftModel.from_pretrained(base, str(adapter)).eval()
    a, _, _ = predict(model.module, split, 30, torch.device("cpu"), "fp32")
    b, _, _ = predict(plain, split, 30, torch.device("cpu"), "fp32")
    return torch.as_tensor(a), torch.as_tensor(b)


@pytest.mark.slow
def test_an_rslora_adapter_round_trips_through_train_rounds_merge_eval_and_plain_peft(tiny_model, glue_dir,
                                                                                     tmp_path):  # fmt: skip
    common = ["--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, *FAST]
    trained = tmp_path / "train"
    result = run("train", *common, "--epochs", "1", "--output-dir", trained)
    assert result.exit_code == 0, result.stderr
    adapter = trained / "adapter"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and (cfg["r"], cfg["lora_alpha"]) == (4, 8)
    ours, plain = logits(tiny_model, glue_dir, adapter)
    torch.testing.assert_close(plain, ours, rtol=1e-4, atol=1e-4)

    # rounds from that adapter (its convention read from its config), clients of ranks 2 and 4 at its scaling 4
    fed = tmp_path / "rounds"
    result = run("rounds", *common, "--clients", "2", "--client-ranks", "2,4", "--rounds", "2", "--local-epochs", "1",
                 "--init-adapter", adapter, "--output-dir", fed)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    for c, r in ((1, 2), (2, 4)):
        client = json.loads(
            (fed / "round_001" / f"client_{c:03d}" / "adapter" / "adapter_config.json").read_text()
        )
        assert client["use_rslora"] is True and client["r"] == r
        assert client["lora_alpha"] == pytest.approx(4.0 * math.sqrt(r))
    final = fed / "final" / "adapter"
    assert json.loads((final / "adapter_config.json").read_text())["use_rslora"] is True
    ours, plain = logits(tiny_model, glue_dir, final)
    torch.testing.assert_close(plain, ours, rtol=1e-4, atol=1e-4)

    # merge: round 1's clients (mixed ranks) give round 1's global adapter
    sizes = json.loads((fed / "run.json").read_text())["client_sizes"]
    merged = tmp_path / "merged"
    clients = [fed / "round_001" / f"client_{c:03d}" / "adapter" for c in (1, 2)]
    result = run(
        "merge", "--adapters", *clients, "--weights", sizes["1"], sizes["2"], "--save-adapter", merged
    )
    assert result.exit_code == 0, result.stderr
    expected = load_file(str(fed / "round_001" / "global" / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(merged / "adapter_model.safetensors"))
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6)
    assert json.loads((merged / "adapter_config.json").read_text())["use_rslora"] is True

    # eval of the final adapter: fedlora's numbers are the run's own
    result = run("eval", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--max-eval-samples", "60",
                 "--precision", "fp32", "--adapter", final, "--output-json", tmp_path / "eval.json")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    evaluated = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    final_metrics = json.loads((fed / "final" / "metrics.json").read_text())["metrics"]
    assert evaluated["accuracy"] == pytest.approx(final_metrics["accuracy"])
