"""Per-method settings that make comparisons fair: how LoRA starts, one-factor methods at equal trainable
parameters, a method's recommended defaults, and what exact aggregation's clients download."""

from __future__ import annotations

import pytest
import torch
from clitools import one_error_line, run

from fedlora_cli.config import AggregationSpec, LoraSpec
from fedlora_cli.strategies import build_strategy


@pytest.mark.parametrize("init", ["default", "gaussian", "orthogonal"])
def test_lora_init_reaches_peft(tiny_model, init):
    from fedlora_cli.config import ModelSpec
    from fedlora_cli.modeling import LoraModel, load_base_model
    from fedlora_cli.tasks import get_task

    base = load_base_model(ModelSpec(str(tiny_model)), get_task("sst2"), seed=0)
    model = LoraModel(base, LoraSpec(r=4, init=init), torch.device("cpu"))
    state = model.state()
    a = next(v for k, v in state.items() if "lora_A" in k)
    b = next(v for k, v in state.items() if "lora_B" in k)
    if init == "orthogonal":
        assert b.abs().sum() > 0  # not a no-op: A and B come from one orthogonal basis
    else:
        assert torch.count_nonzero(b) == 0  # a no-op until it trains
    if init == "gaussian":
        assert abs(float(a.std()) - 1 / 4) < 0.05  # N(0, 1/r²)


def test_lora_init_is_checked_and_does_not_change_the_adapters_shape():
    with pytest.raises(ValueError, match="even --lora-r"):
        LoraSpec(r=3, init="orthogonal")
    assert LoraSpec(init="gaussian") == LoraSpec()  # a shape: clients' reports still match their plan


def test_equal_trainable_doubles_one_factor_ranks_to_match_lora():
    """FFA trains B only: at 2r it trains as many parameters per module as LoRA (A and B) at r, d_in = d_out."""
    lora = LoraSpec(r=4, alpha=8.0)
    ffa = build_strategy(AggregationSpec("ffa", equal_trainable=True), lora, seed=0, client_ids=[1, 2])
    assert ffa.client_lora(1).r == 8 and ffa.client_lora(1).scaling == lora.scaling
    d = 64
    assert d * ffa.client_lora(1).r == 2 * d * lora.r  # B of 2r == A and B of r
    with pytest.raises(ValueError, match="--equal-trainable applies to the one-factor methods"):
        AggregationSpec("svd", equal_trainable=True)


def test_a_methods_recommended_default_applies_only_where_the_user_gave_none(monkeypatch, tmp_path):
    import fedlora_cli.engines as engines
    from fedlora_cli.strategies import registry

    assert registry.METHODS["ffa"].defaults == {"lora.alpha": 64.0}  # chosen by the regime's tuning
    seen = []

    def fake_run(config, **_):
        seen.append(config)
        raise KeyboardInterrupt

    monkeypatch.setattr(engines, "run_rounds", fake_run)
    base = ["rounds", "--task", "sst2", "--shards", tmp_path, "--aggregation", "ffa"]
    result = run(*base)
    assert seen[-1].lora.alpha == 64.0
    assert "ffa recommends --lora-alpha 64.0" in result.stderr
    run(*base, "--lora-alpha", "16")
    assert seen[-1].lora.alpha == 16.0  # the user's value wins
    run("rounds", "--task", "sst2", "--shards", tmp_path, "--aggregation", "naive")
    assert seen[-1].lora.alpha == 16.0  # another method: nothing applied


def test_exact_reports_what_stateless_and_stateful_clients_download():
    from fedlora_cli.aggregation import ClientUpdate
    from fedlora_cli.strategies.base import GlobalAdapter
    from fedlora_cli.strategies.exact import increment_bytes

    g = torch.Generator().manual_seed(0)
    a_key, b_key = "m.lora_A.weight", "m.lora_B.weight"
    lora = LoraSpec(r=2, alpha=4.0, target_modules=("m",))
    exact = build_strategy(AggregationSpec("exact"), lora, seed=0, client_ids=[1, 2, 3])
    current = GlobalAdapter({a_key: torch.randn(2, 16, generator=g), b_key: torch.zeros(12, 2)}, lora)
    records = []
    for rnd in (1, 2, 3):
        before = dict(exact.residual)
        updates = [ClientUpdate({a_key: torch.randn(2, 16, generator=g), b_key: torch.randn(12, 2, generator=g)},
                                2.0, float(i + 1)) for i in range(3)]  # fmt: skip
        out = exact.aggregate(rnd, current, updates)
        rec = out.record
        records.append(rec)
        assert rec["increment_bytes"] == increment_bytes(before, exact.residual)
        # the residual shipped statelessly: float32 P (12 x k) and Q (k x 16)
        k = exact.residual["m"][0].shape[1]
        assert rec["residual_bytes"] == 4 * k * (12 + 16)
        # the increment really is the change: old + increment reconstructs the new residual
        p_new, q_new = exact.residual["m"]
        old = before["m"][0].double() @ before["m"][1].double() if "m" in before else 0
        assert torch.allclose(old + (p_new.double() @ q_new.double() - old), p_new.double() @ q_new.double())
        current = out.adapter
    assert (
        records[0]["increment_bytes"] == records[0]["residual_bytes"]
    )  # round 1: the increment is all of it
    assert records[2]["residual_bytes"] >= records[2]["increment_bytes"] > 0


def test_lora_init_and_equal_trainable_are_options_of_rounds(tmp_path):
    one_error_line(run("rounds", "--task", "sst2", "--shards", tmp_path, "--lora-init", "pissa"), 2,
                   "--lora-init must be one of default, gaussian, orthogonal")  # fmt: skip
    one_error_line(run("rounds", "--task", "sst2", "--shards", tmp_path, "--equal-trainable"), 2,
                   "--equal-trainable applies to the one-factor methods (ffa, rolora), not svd")  # fmt: skip
