"""Personalised federated LoRA: FedSA-LoRA (`fedsa`), local-only training (`local`), FedAvg + local fine-tuning
(`--personalize-epochs`), each client's shard split into local train / local test (`--client-test-fraction`),
and per-client results in the history, the summary, `runs show` and `runs compare`."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import one_error_line, run
from safetensors.torch import load_file
from test_rounds import write_manifests

from fedlora_cli.aggregation import ClientUpdate
from fedlora_cli.config import AggregationSpec, DataSpec, LoraSpec, OutputSpec, PrivacySpec, RoundsConfig
from fedlora_cli.federation.personal import PersonalTurns, with_personal
from fedlora_cli.personal.spec import PersonalSpec
from fedlora_cli.personal.split import split_client, split_clients
from fedlora_cli.personal.stats import client_stats
from fedlora_cli.strategies import build_strategy
from fedlora_cli.strategies.base import ClientPlan, GlobalAdapter, part_of
from fedlora_cli.strategies.fedsa import mean_rows

FAST = ["--local-epochs", "1", "--learning-rate", "2e-2", "--precision", "fp32", "--max-eval-samples", "50"]
# 10 Dirichlet(0.5) clients made in memory from the 600 SST-2 examples, 6 of them per round: partial participation
FEDSA = ["--clients", "10", "--partition", "dirichlet", "--dirichlet-alpha", "0.5", "--clients-per-round", "6",
         "--rounds", "2", "--aggregation", "fedsa", *FAST]  # fmt: skip
M = "base_model.model.roberta.encoder.layer.0.attention.self.query"
HEAD = "base_model.model.classifier.out_proj.weight"


def rounds_args(model, glue, root, name, *extra):
    return ["rounds", "--task", "sst2", "--model", model, "--data-dir", glue, "--output-root", root,
            "--run-name", name, *extra]  # fmt: skip


def adapter_state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def only(state: dict[str, torch.Tensor], *parts: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if part_of(k) in parts}


def history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def safetensors_bytes(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*.safetensors"))}


# ---------------------------------------------------------------------------------------------------
# the pieces, by hand


def test_each_shard_splits_into_local_train_and_test_seeded_stratified_and_disjoint():
    labels = np.array([0] * 300 + [1] * 300)
    shard = np.concatenate([np.arange(0, 80), np.arange(300, 320)])  # 80 of label 0, 20 of label 1
    split = split_client(3, shard, labels, 0.25, seed=7, regression=False)
    assert len(split.test) == 25 and len(split.train) == 75
    assert sorted(np.concatenate([split.train, split.test]).tolist()) == sorted(shard.tolist())
    assert np.bincount(labels[split.test]).tolist() == [20, 5]  # each label in proportion
    again = split_client(3, shard, labels, 0.25, seed=7, regression=False)
    assert np.array_equal(again.test, split.test)  # seeded: the server and a Flower client carve the same
    assert not np.array_equal(split_client(4, shard, labels, 0.25, seed=7, regression=False).test, split.test)
    assert not np.array_equal(split_client(3, shard, labels, 0.25, seed=8, regression=False).test, split.test)
    assert len(split_client(3, shard, labels, 0.0, seed=7, regression=False).test) == 0
    assert (
        len(split_client(3, shard[:1], labels, 0.5, seed=7, regression=False).test) == 0
    )  # one example: trains
    scores = np.linspace(0, 5, 600)
    binned = split_client(1, np.arange(600), scores, 0.1, seed=0, regression=True)
    assert len(binned.test) == 60 and np.ptp(scores[binned.test]) > 4  # spread over the score bins
    record = split_clients([1, 2], [shard, shard[:12]], labels, 0.25, 7, regression=False).record()
    assert record["sizes"] == {"1": [75, 25], "2": [9, 3]} and record["fraction"] == 0.25 and record["sha256"]


def test_a_local_validation_split_is_carved_from_what_the_test_left_and_leaves_the_test_as_it_was():
    labels = np.array([0] * 300 + [1] * 300)
    shard = np.concatenate([np.arange(0, 80), np.arange(300, 320)])
    plain = split_client(3, shard, labels, 0.25, seed=7, regression=False)
    split = split_client(3, shard, labels, 0.25, seed=7, regression=False, validation_fraction=0.2)
    assert plain.validation is None and len(plain.held) == 0
    assert np.array_equal(split.test, plain.test)  # the same local tests, with or without validation
    assert (len(split.train), len(split.test), len(split.validation)) == (55, 25, 20)
    parts = [split.train, split.test, split.validation]
    assert sorted(np.concatenate(parts).tolist()) == sorted(shard.tolist())  # disjoint, nothing lost
    assert np.bincount(labels[split.validation]).tolist() == [16, 4]  # stratified
    again = split_client(3, shard, labels, 0.25, seed=7, regression=False, validation_fraction=0.2)
    assert np.array_equal(again.validation, split.validation)
    tiny = split_client(1, shard[:3], labels, 0.34, seed=7, regression=False, validation_fraction=0.5)
    assert (len(tiny.train), len(tiny.test), len(tiny.validation)) == (1, 1, 1)  # a training example stays
    two = split_clients(
        [1, 2], [shard, shard[:12]], labels, 0.25, 7, regression=False, validation_fraction=0.2
    )
    record = two.record()
    assert record["sizes"] == {"1": [55, 25, 20], "2": [7, 3, 2]} and record["validation_fraction"] == 0.2
    assert record["sha256"] == split_clients([1, 2], [shard, shard[:12]], labels, 0.25, 7,
                                             regression=False).record()["sha256"]  # fmt: skip
    with pytest.raises(ValueError, match="set --client-test-fraction too"):
        PersonalSpec(client_validation_fraction=0.1)
    with pytest.raises(ValueError, match="keep their sum below 1"):
        PersonalSpec(client_test_fraction=0.5, client_validation_fraction=0.5)


def test_per_client_statistics_by_hand():
    values = {
        c: v for c, v in enumerate([0.9, 0.5, 0.7, 1.0, 0.6, 0.8, 0.75, 0.85, 0.95, 0.65, 0.55, 0.7], 1)
    }
    stats = client_stats({**values, 13: float("nan")}, "accuracy", model="personal", failed={14: "no reply"})
    assert stats["n"] == 12 and stats["metric"] == "accuracy" and stats["model"] == "personal"
    assert stats["mean"] == pytest.approx(sum(values.values()) / 12)
    assert stats["std"] == pytest.approx(float(np.std(list(values.values()))))  # over clients, ddof 0
    assert (stats["worst"], stats["worst_client"], stats["best"], stats["best_client"]) == (0.5, 2, 1.0, 4)
    assert stats["worst10"] == pytest.approx((0.5 + 0.55) / 2)  # ceil(10 % of 12) = 2 clients
    assert (
        stats["undefined"] == [13] and stats["failed"] == {"14": "no reply"} and "13" not in stats["values"]
    )
    one = client_stats({5: 0.25}, "accuracy", model="global")
    assert (one["mean"], one["std"], one["worst10"], one["best"]) == (0.25, 0.0, 0.25, 0.25)
    assert client_stats({}, "f1", model="global") == {"metric": "f1", "model": "global", "n": 0, "values": {}}


def _adapter(rank: int, seed: int, d: int = 6) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"{M}.lora_A.weight": torch.randn(rank, d, generator=g),
            f"{M}.lora_B.weight": torch.randn(d, rank, generator=g),
            HEAD: torch.randn(2, d, generator=g)}  # fmt: skip


def test_fedsa_sends_a_only_averages_it_row_by_row_and_keeps_b_and_head():
    strategy = build_strategy(AggregationSpec("fedsa", client_ranks="2,4"), LoraSpec(4, 8.0), seed=0,
                              client_ids=[1, 2])  # fmt: skip
    assert strategy.personal_parts == {"B", "head"}
    current = GlobalAdapter(_adapter(4, 0), LoraSpec(4, 8.0))
    plan = strategy.plan(1, 1, current)  # client 1 has rank 2
    assert plan.personal == {"B", "head"} and set(plan.adapter.state) == {f"{M}.lora_A.weight"}
    assert torch.equal(plan.adapter.state[f"{M}.lora_A.weight"], current.state[f"{M}.lora_A.weight"][:2])
    a1, a2 = torch.ones(2, 6), torch.full((4, 6), 4.0)
    updates = [ClientUpdate({f"{M}.lora_A.weight": a1}, scaling=2.0, weight=30, name="client 1"),
               ClientUpdate({f"{M}.lora_A.weight": a2}, scaling=2.0, weight=10, name="client 2")]  # fmt: skip
    out = strategy.aggregate(1, current, updates)
    a = out.adapter.state[f"{M}.lora_A.weight"]
    assert torch.allclose(a[:2], torch.full((2, 6), 0.75 * 1 + 0.25 * 4))  # both hold rows 0-1: weighted mean
    assert torch.equal(a[2:], a2[2:])  # only client 2 holds rows 2-3: its rows
    for key in (f"{M}.lora_B.weight", HEAD):  # never sent, never changed on the server
        assert torch.equal(out.adapter.state[key], current.state[key])
    assert out.record["method"] == "fedsa" and out.record["error"] is None and out.record["shared"] == ["A"]
    # a row no client of the round holds keeps its value
    kept = mean_rows([updates[0]], current.state)[f"{M}.lora_A.weight"]
    assert torch.equal(kept[2:], current.state[f"{M}.lora_A.weight"][2:]) and torch.equal(kept[:2], a1)
    with pytest.raises(ValueError, match="has shape"):
        mean_rows(
            [ClientUpdate({f"{M}.lora_A.weight": torch.ones(2, 5)}, scaling=2.0, weight=1)], current.state
        )


def test_local_strategy_shares_nothing_and_keeps_the_global_state():
    strategy = build_strategy(AggregationSpec("local"), LoraSpec(4, 8.0), seed=0, client_ids=[1])
    current = GlobalAdapter(_adapter(4, 1), LoraSpec(4, 8.0))
    plan = strategy.plan(3, 1, current)
    assert plan.adapter.state == {} and plan.personal == {"A", "B", "head"} and plan.num_bytes == 0
    out = strategy.aggregate(3, current, [ClientUpdate({}, scaling=2.0, weight=5)])
    assert out.adapter is current and out.record["error"] is None


def test_a_plan_carries_the_initial_personal_parts_for_a_first_turn_only():
    initial = GlobalAdapter(_adapter(4, 2), LoraSpec(4, 8.0))
    strategy = build_strategy(AggregationSpec("fedsa"), LoraSpec(4, 8.0), seed=0, client_ids=[1, 2])
    turns = PersonalTurns(initial)
    first = turns.plan(strategy.plan(1, 2, initial))
    assert first.personal_round == 0 and set(first.personal_start) == {f"{M}.lora_B.weight", HEAD}
    assert all(torch.equal(first.personal_start[k], initial.state[k]) for k in first.personal_start)
    assert first.num_bytes == sum(t.numel() * 4 for t in initial.state.values())  # A sent, B and head started
    merged = with_personal(first, None).adapter.state
    assert all(torch.equal(merged[k], initial.state[k]) for k in initial.state)
    turns.completed(1, [2])
    later = turns.plan(strategy.plan(2, 2, initial))
    assert later.personal_round == 1 and later.personal_start == {} and later.num_bytes < first.num_bytes
    own = {f"{M}.lora_B.weight": torch.zeros(6, 4), HEAD: torch.ones(2, 6)}
    assert torch.equal(with_personal(later, own).adapter.state[HEAD], torch.ones(2, 6))
    with pytest.raises(Exception, match="no personal parts from round 1"):
        with_personal(later, None)
    assert turns.plan(strategy.plan(2, 1, initial)).personal_round == 0  # client 1 never trained
    global_plan = ClientPlan(1, initial)
    assert turns.plan(global_plan) is global_plan  # a global method's plan is left alone


def test_what_a_personalised_method_cannot_do_is_one_line_each():
    def config(**kw):
        return RoundsConfig(data=DataSpec("sst2", validation_fraction=0.1), shards="s", **kw)

    fedsa = AggregationSpec("fedsa")
    with pytest.raises(ValueError, match="--select best chooses a round by the global adapter"):
        config(aggregation=fedsa, select="best")
    with pytest.raises(ValueError, match="--early-stop 2 chooses"):
        config(aggregation=AggregationSpec("local"), early_stop=2)
    with pytest.raises(ValueError, match="differential privacy is implemented for global methods only"):
        config(aggregation=fedsa, privacy=PrivacySpec(clip=1.0, noise_multiplier=0.5))
    with pytest.raises(ValueError, match="--resume of a fedsa run on --engine flower"):
        config(aggregation=fedsa, engine="flower", resume=True, output=OutputSpec(run_name="x"))
    config(
        aggregation=fedsa, engine="flower", resume_from_round=0, output=OutputSpec(run_name="x")
    )  # starts again
    config(
        aggregation=AggregationSpec("naive"),
        engine="flower",
        resume=True,
        output=OutputSpec(run_name="x"),
        personal=PersonalSpec(0.2, 1.0),
    )  # fmt: skip  (fine-tuning happens after the rounds: resumable)
    with pytest.raises(ValueError, match="--client-test-fraction must be in"):
        PersonalSpec(client_test_fraction=1.0)
    with pytest.raises(ValueError, match="--personalize-epochs must be"):
        PersonalSpec(personalize_epochs=-1)


# ---------------------------------------------------------------------------------------------------
# fedsa on engine local


@pytest.fixture(scope="module")
def fedsa_run(tiny_model, glue_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("personal")
    result = run(*rounds_args(tiny_model, glue_dir, root, "fedsa", *FEDSA))
    assert result.exit_code == 0, result.stderr
    return root / "sst2_tiny-roberta" / "fedsa", result


def test_fedsa_keeps_b_and_head_on_each_client_and_shares_a(fedsa_run):
    run_dir, result = fedsa_run
    assert "fedsa recommends --client-test-fraction 0.2" in " ".join(result.stderr.split())
    rows = history(run_dir)
    trained = sorted({c for row in rows[1:] for c in row["clients"]})
    assert 0 < len(trained) < 10 or len(trained) == 10
    finals = {c: adapter_state(run_dir / "final" / "clients" / f"client_{c:03d}") for c in range(1, 11)}
    a_keys = [k for k in finals[1] if ".lora_A." in k]
    assert a_keys and all(
        torch.equal(finals[c][k], finals[1][k]) for c in finals for k in a_keys
    )  # A: shared
    start = adapter_state(run_dir / "round_001" / "global")  # fedsa's server never changes B and the head
    for c in trained:  # B and the head: each trained client's own, none equal to another's or to the start
        last = max(row["round"] for row in rows[1:] if c in row["clients"])
        personal = load_file(str(run_dir / f"round_{last:03d}" / f"client_{c:03d}" / "personal.safetensors"))
        assert set(personal) == set(only(finals[c], "B", "head"))
        assert all(torch.equal(finals[c][k], personal[k]) for k in personal)
        assert not torch.equal(finals[c][HEAD], start[HEAD])
    for c, d in zip(trained, trained[1:], strict=False):
        assert not torch.equal(only(finals[c], "B")[f"{M}.lora_B.weight"], finals[d][f"{M}.lora_B.weight"])
    for c in set(range(1, 11)) - set(trained):  # never selected: the run's initial B (zero) and head
        assert all(torch.equal(finals[c][k], start[k]) for k in only(start, "B", "head"))
    for sent in run_dir.glob("round_*/client_*/adapter"):  # what clients sent: A only
        assert {part_of(k) for k in load_file(str(sent / "adapter_model.safetensors"))} == {"A"}
    g1, g2 = adapter_state(run_dir / "round_001" / "global"), adapter_state(run_dir / "round_002" / "global")
    assert all(torch.equal(g1[k], g2[k]) for k in only(g1, "B", "head"))
    assert not torch.equal(g1[f"{M}.lora_A.weight"], g2[f"{M}.lora_A.weight"])
    assert all(row["aggregation"]["error"] is None for row in rows[1:])  # no product to compare with
    assert all(row["eval"] is None for row in rows)  # and no global model to score on the dev split


def test_clients_never_train_on_their_local_test_split(fedsa_run):
    run_dir, _ = fedsa_run
    record = json.loads((run_dir / "run.json").read_text())
    split = record["client_test"]
    assert split["fraction"] == 0.2 and split["seed"] == 42
    shards = {int(p.stem.split("_")[1]): json.loads(p.read_text())["indices"] for p in (run_dir / "shards").glob(
        "client_*.json")}  # fmt: skip
    for c, (train, test) in split["sizes"].items():
        assert train + test == len(shards[int(c)]) and test == max(1, round(0.2 * len(shards[int(c)])))
    for row in history(run_dir)[1:]:
        for client in row["client_metrics"]:
            assert client["examples"] == split["sizes"][str(client["client"])][0]


def test_per_client_results_in_history_summary_show_and_compare(fedsa_run, tmp_path):
    run_dir, result = fedsa_run
    keys = {
        "metric",
        "model",
        "n",
        "mean",
        "std",
        "worst",
        "worst_client",
        "worst10",
        "best",
        "best_client",
        "values",
    }
    rows = history(run_dir)
    assert [r["per_client"]["model"] for r in rows] == ["start", "personal", "personal"]
    for row in rows:
        stats = row["per_client"]
        assert keys <= set(stats) and stats["n"] == 10 and stats["metric"] == "accuracy"
        assert stats["worst"] <= stats["worst10"] <= stats["mean"] <= stats["best"]
    final = json.loads((run_dir / "final" / "metrics.json").read_text())
    assert final["metrics"] == {} and final["per_client"]["model"] == "personal"
    assert final["per_client"]["values"] == rows[-1]["per_client"]["values"]  # the same models, scored again
    flat = " ".join(result.stdout.split())
    assert (
        "clients mean" in flat
        and "worst 10 %" in flat
        and "local test, final models: accuracy over 10 clients" in flat
    )
    assert f"{final['per_client']['mean']:.4f}" in flat and "client adapters" in flat
    shown = run("runs", "show", run_dir)
    assert shown.exit_code == 0, shown.stderr
    assert "each client's own final model: accuracy over 10 clients" in " ".join(shown.stdout.split())
    compared = run("runs", "compare", run_dir, run_dir, "--json")
    assert json.loads(compared.stdout)["per_client"][0]["mean"] == final["per_client"]["mean"]
    table = run("runs", "compare", run_dir, run_dir)
    assert "clients accuracy worst 10 %" in " ".join(table.stdout.split())
    listed = run("runs", "list", run_dir)
    assert f"accuracy {final['per_client']['mean']:.4f} (clients)" in listed.stdout


def test_compare_plots_the_clients_distribution(fedsa_run, tmp_path):
    pytest.importorskip("matplotlib")
    run_dir, _ = fedsa_run
    result = run("runs", "compare", run_dir, run_dir, "--plot-clients", tmp_path / "clients.png")
    assert result.exit_code == 0, result.stderr
    assert (tmp_path / "clients.png").read_bytes()[:4] == b"\x89PNG"


def test_a_client_adapter_opens_with_plain_peft_and_fedlora_eval(fedsa_run, tiny_model, glue_dir):
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForSequenceClassification

    run_dir, _ = fedsa_run
    folder = run_dir / "final" / "clients" / "client_003" / "adapter"
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=2)
    model = PeftModel.from_pretrained(base, folder)
    saved = load_file(str(folder / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    result = run("eval", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--adapter", folder,
                 "--max-eval-samples", "50", "--precision", "fp32")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert json.loads((folder / "fedlora_adapter.json").read_text())["client"] == 3


@pytest.mark.slow
def test_fedsa_resume_after_an_interruption_is_bit_identical(
    fedsa_run, tiny_model, glue_dir, tmp_path, monkeypatch
):
    from fedlora_cli.federation import local

    reference, _ = fedsa_run
    real = local.train_client
    second = history(reference)[2]["clients"]

    def interrupt(model, data, indices, plan, *args, **kwargs):
        if (kwargs["round_no"], plan.client_id) == (2, second[-1]):
            raise KeyboardInterrupt
        return real(model, data, indices, plan, *args, **kwargs)

    args = rounds_args(tiny_model, glue_dir, tmp_path, "fedsa", *FEDSA)
    with monkeypatch.context() as m:
        m.setattr(local, "train_client", interrupt)
        first = run(*args)
    one_error_line(first, 130, "--resume")
    run_dir = tmp_path / "sst2_tiny-roberta" / "fedsa"
    assert (run_dir / "round_001" / "global" / "metrics.json").is_file() and not (run_dir / "final").exists()
    again = run(*args, "--resume")
    assert again.exit_code == 0, again.stderr
    assert safetensors_bytes(run_dir) == safetensors_bytes(reference)  # personal parts and final/clients too
    ours = json.loads((run_dir / "final" / "metrics.json").read_text())["per_client"]
    assert ours == json.loads((reference / "final" / "metrics.json").read_text())["per_client"]


def test_fedsa_with_mixed_ranks_gives_each_client_the_shared_a_at_its_rank(tiny_model, glue_dir, tmp_path):
    args = ["--clients", "4", "--partition", "dirichlet", "--rounds", "2", "--aggregation", "fedsa",
            "--client-ranks", "2,4", *FAST]  # fmt: skip
    result = run(*rounds_args(tiny_model, glue_dir, tmp_path, "mixed", *args))
    assert result.exit_code == 0, result.stderr
    run_dir = tmp_path / "sst2_tiny-roberta" / "mixed"
    shared = adapter_state(run_dir / "final")[f"{M}.lora_A.weight"]
    assert shared.shape[0] == 4  # the largest rank
    for c, rank in ((1, 2), (2, 4), (3, 2), (4, 4)):
        mine = adapter_state(run_dir / "final" / "clients" / f"client_{c:03d}")
        assert mine[f"{M}.lora_B.weight"].shape[1] == rank and torch.equal(
            mine[f"{M}.lora_A.weight"], shared[:rank]
        )


def test_a_resume_that_lost_a_clients_personal_parts_says_so(fedsa_run, tiny_model, glue_dir, tmp_path):
    reference, _ = fedsa_run
    run_dir = Path(shutil.copytree(reference, tmp_path / "copy"))
    trained = history(run_dir)[1]["clients"][0]
    (run_dir / "round_001" / f"client_{trained:03d}" / "personal.safetensors").unlink()
    args = ["rounds", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--output-dir", run_dir,
            *FEDSA[:-len(FAST)], *FAST, "--rounds", "3", "--resume-from-round", "1"]  # fmt: skip
    one_error_line(run(*args), 2, "personal.safetensors is missing")


# ---------------------------------------------------------------------------------------------------
# local-only training, FedAvg + local fine-tuning


@pytest.mark.slow
def test_local_only_training_is_each_client_training_alone(tiny_model, glue_dir, tmp_path):
    order = np.random.default_rng(3).permutation(600).tolist()
    three = write_manifests(tmp_path / "k3", [order[:60], order[60:140], order[140:240]])
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(three / "client_2.json", alone / "client_2.json")
    common = ["--aggregation", "local", "--rounds", "2", "--client-test-fraction", "0.25", *FAST]
    for name, shards in (("three", three), ("alone", alone)):
        result = run(*rounds_args(tiny_model, glue_dir, tmp_path, name, "--shards", shards, *common))
        assert result.exit_code == 0, result.stderr
    runs = tmp_path / "sst2_tiny-roberta"
    together = adapter_state(runs / "three" / "final" / "clients" / "client_002")
    assert set(together) == set(adapter_state(runs / "three" / "final"))
    ref = adapter_state(runs / "alone" / "final" / "clients" / "client_002")
    assert all(torch.equal(together[k], ref[k]) for k in ref)  # no other client changed it, by one bit
    start = adapter_state(runs / "three" / "round_001" / "global")
    assert not torch.equal(together[f"{M}.lora_A.weight"], start[f"{M}.lora_A.weight"])  # it trained
    for row in history(runs / "three")[1:]:
        assert row["bytes_up"] == 0 and row["aggregation"]["method"] == "local"
        assert all(torch.equal(v, start[k]) for k, v in adapter_state(
            runs / "three" / f"round_{row['round']:03d}" / "global").items())  # fmt: skip
    assert not list((runs / "three").glob("round_*/client_*/adapter"))  # nothing was sent
    three_stats = json.loads((runs / "three" / "final" / "metrics.json").read_text())["per_client"]
    alone_stats = json.loads((runs / "alone" / "final" / "metrics.json").read_text())["per_client"]
    assert three_stats["values"]["2"] == alone_stats["values"]["2"] and three_stats["n"] == 3


def test_local_validation_splits_are_scored_per_client_and_never_trained_on(tiny_model, glue_dir, tmp_path):
    order = np.random.default_rng(5).permutation(600).tolist()
    shards = write_manifests(tmp_path / "k3", [order[:60], order[60:140], order[140:240]])
    held = ["--client-test-fraction", "0.25", "--client-validation-fraction", "0.2"]
    for method in ("naive", "local"):  # the global model scored by the server; each client's own model
        args = rounds_args(tiny_model, glue_dir, tmp_path, method, "--shards", shards, "--aggregation", method,
                           "--rounds", "1", *held, *FAST)  # fmt: skip
        result = run(*args)
        assert result.exit_code == 0, result.stderr
        run_dir = tmp_path / "sst2_tiny-roberta" / method
        split = json.loads((run_dir / "run.json").read_text())["client_test"]
        assert split["validation_fraction"] == 0.2
        for c, (train, test, validation) in split["sizes"].items():
            n = {"1": 60, "2": 80, "3": 100}[c]
            assert (test, validation, train) == (round(0.25 * n), round(0.2 * n), n - test - validation)
        for row in history(run_dir)[1:]:
            for client in row["client_metrics"]:  # trained on its local train split only
                assert client["examples"] == split["sizes"][str(client["client"])][0]
        final = json.loads((run_dir / "final" / "metrics.json").read_text())["per_client"]
        model = "global" if method == "naive" else "personal"
        assert final["model"] == model and final["validation"]["model"] == model
        assert final["validation"]["n"] == 3 and final["validation"]["metric"] == "accuracy"
        assert final["validation"]["values"] != final["values"]  # other examples
        assert "local validation, " in " ".join(result.stdout.split())


@pytest.mark.slow
def test_personalize_epochs_changes_only_each_clients_final_model(tiny_model, glue_dir, tmp_path):
    args = rounds_args(tiny_model, glue_dir, tmp_path, "naive", "--clients", "4", "--partition", "dirichlet",
                       "--rounds", "2", "--aggregation", "naive", "--client-test-fraction", "0.25", *FAST)  # fmt: skip
    plain = run(*args)
    assert plain.exit_code == 0, plain.stderr
    run_dir = tmp_path / "sst2_tiny-roberta" / "naive"
    before = safetensors_bytes(run_dir)
    final_before = json.loads((run_dir / "final" / "metrics.json").read_text())
    assert final_before["per_client"]["model"] == "global" and not (run_dir / "final" / "clients").exists()
    # a finished run resumed with --personalize-epochs: the rounds stay, only the end is made again
    tuned = run(*args, "--personalize-epochs", "1", "--resume")
    assert tuned.exit_code == 0, tuned.stderr
    after = safetensors_bytes(run_dir)
    clients = {k: v for k, v in after.items() if k.startswith("final/clients/")}
    assert {k: v for k, v in after.items() if k not in clients} == before  # every round and final/adapter
    assert len(clients) == 4
    final = json.loads((run_dir / "final" / "metrics.json").read_text())
    assert final["metrics"] == final_before["metrics"]  # the global adapter's dev metrics
    assert final["per_client_global"] == final_before["per_client"]  # the global adapter on the local tests
    assert final["per_client"]["model"] == "personal" and final["per_client"]["n"] == 4
    assert final["per_client"]["values"] != final_before["per_client"]["values"]
    global_state = adapter_state(run_dir / "final")
    for c in range(1, 5):
        mine = adapter_state(run_dir / "final" / "clients" / f"client_{c:03d}")
        assert set(mine) == set(global_state) and not all(torch.equal(mine[k], global_state[k]) for k in mine)
    meta = json.loads(
        (run_dir / "final" / "clients" / "client_001" / "adapter" / "fedlora_adapter.json").read_text()
    )
    assert meta["personalize_epochs"] == 1.0 and meta["method"] == "naive"
    assert math.isclose(final["per_client"]["mean"], np.mean(list(final["per_client"]["values"].values())))


def test_fedsa_refuses_merge_and_select_best_with_one_line(fedsa_run, tiny_model, glue_dir, tmp_path):
    run_dir, _ = fedsa_run
    sent = sorted(run_dir.glob("final/clients/client_*/adapter"))[:2]
    one_error_line(run("merge", "--adapters", *sent, "--aggregation", "fedsa", "--save-adapter", tmp_path / "m"),
                   2, "its clients keep B and the head")  # fmt: skip
    one_error_line(run(*rounds_args(tiny_model, glue_dir, tmp_path, "x", *FEDSA, "--validation-fraction", "0.1",
                                    "--select", "best")), 2, "no global adapter to score")  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Flower: the same rounds, personal parts in each ClientApp's Context.state, never on the wire


@pytest.mark.flower
def test_fedsa_on_flower_is_local_bit_for_bit_and_nothing_personal_crosses_the_wire(
    tiny_model, glue_dir, tmp_path, monkeypatch
):
    pytest.importorskip("flwr", reason="the `flower` extra is not installed")
    from recording_clients import digest, read_log, recording_app_named
    from test_flower import one_thread

    from fedlora_cli.config import ModelSpec, TrainSpec
    from fedlora_cli.federation import run_local
    from fedlora_cli.flower.simulation import run_flower_simulation

    order = np.random.default_rng(4).permutation(600).tolist()
    shards = write_manifests(tmp_path / "k4", [order[:50], order[50:130], order[130:170], order[170:260]])

    def config(name: str, engine: str) -> RoundsConfig:
        return RoundsConfig(
            data=DataSpec("sst2", str(glue_dir), max_eval_samples=50), shards=str(shards),
            model=ModelSpec(str(tiny_model)), train=TrainSpec(epochs=1.0, learning_rate=2e-2, precision="fp32"),
            output=OutputSpec(root=str(tmp_path), run_name=name), engine=engine, rounds=3, clients_per_round=3,
            aggregation=AggregationSpec("fedsa"), personal=PersonalSpec(0.25, 1.0, 0.2),
        )  # fmt: skip

    with one_thread():
        local = run_local(config("local", "local"))
    monkeypatch.syspath_prepend(str(tmp_path / "apps"))
    app = recording_app_named(tmp_path / "apps", tmp_path / "wire")
    flower = run_flower_simulation(config("flower", "flower"), client_app=app)
    a, b = local.run_dir, flower.run_dir
    ours, theirs = safetensors_bytes(a), safetensors_bytes(b)
    personal = {k for k in ours if k.endswith("personal.safetensors")}
    assert personal and not any(k.endswith("personal.safetensors") for k in theirs)  # Flower: on the clients
    assert {k: v for k, v in ours.items() if k not in personal} == theirs  # every adapter, bit for bit
    assert sum(k.startswith("final/clients/") for k in theirs) == 4  # saved by the ClientApps themselves
    assert flower.per_client == local.per_client and flower.per_client["n"] == 4
    assert flower.per_client["validation"]["n"] == 4  # the local validation splits, scored on the SuperNodes
    for x, y in zip(history(a), history(b), strict=True):
        assert x["per_client"] == y["per_client"] and x["clients"] == y["clients"]

    # what crossed the wire: the shared part (A) down and up, the start values of B and the head once per
    # client (the run's initial ones, the same for all), metrics back from evaluation and the final turn
    log = read_log(tmp_path / "wire")
    kinds = {(e["request"]["type"]) for e in log}
    assert kinds == {"query", "train", "evaluate.personal", "train.personalize"}
    start = adapter_state(a / "round_001" / "global")  # fedsa's server state keeps the initial B and head
    initial = digest(only(start, "B", "head"))
    starts = {}
    for entry in log:
        request, reply = entry["request"], entry["reply"]
        assert "error" not in reply, reply
        for record in reply["arrays"].values():  # up: never a B or head tensor
            assert {part_of(k) for k in record["keys"]} <= {"A"}, entry
        if request["type"] == "query":
            continue
        meta = request["configs"]["config"]
        assert {part_of(k) for k in request["arrays"]["arrays"]["keys"]} == {"A"}
        if meta["personal-round"] == 0:
            assert request["arrays"]["personal-start"]["digest"] == initial
            starts.setdefault(meta["client-id"], []).append((meta["server-round"], request["type"]))
        else:
            assert "personal-start" not in request["arrays"]
        if request["type"] != "train":
            assert reply["arrays"] == {} and reply["metrics"]["metrics"]  # metrics only
    rows = history(a)[1:]
    assert {c for row in rows for c in row["clients"]} == {1, 2, 3, 4}
    for c in range(1, 5):  # the start values went to each client only until its first turn counted
        first = min(row["round"] for row in rows if c in row["clients"])
        assert [kind for r, kind in starts[c] if kind == "train"] == ["train"]
        assert all(r < first or (r, kind) == (first, "train") for r, kind in starts[c]), (c, first, starts[c])
