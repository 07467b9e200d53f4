"""`fedlora rounds` and `fedlora merge`: correct FedAvg of LoRA adapters, reproducible and resumable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import one_error_line, run
from safetensors.torch import load_file

from fedlora_cli.federation import derive_seed, select_clients

FAST = ["--local-epochs", "3", "--learning-rate", "2e-2", "--precision", "fp32", "--batch-size", "32"]


def write_manifests(folder: Path, clients: list[list[int]], task: str = "sst2", total: int = 600) -> Path:
    """Shard manifests exactly as the reference's save_shard_manifests writes them (no fedlora keys)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, indices in enumerate(clients, start=1):
        (folder / f"client_{i}.json").write_text(json.dumps({"dataset": task, "indices": indices}))
    summary = {"client_indices": clients, "size_per_client": [len(c) for c in clients],
               "total_train": total, "task": task, "mode": "iid",
               "meta": {"seed": 0, "overlap_ratio": 0.0, "category_key": None, "bin_stsb": False}}  # fmt: skip
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def rounds_args(model, glue, shards, root, name, *extra):
    return ["rounds", "--task", "sst2", "--model", model, "--data-dir", glue, "--shards", shards,
            "--output-root", root, "--run-name", name, *FAST, *extra]  # fmt: skip


def adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    # unequal client sizes, so that example-count weighting is visible: 100, 200, 300 examples
    rng = np.random.default_rng(0)
    order = rng.permutation(600).tolist()
    return write_manifests(
        tmp_path_factory.mktemp("shards") / "k3", [order[:100], order[100:300], order[300:]]
    )


@pytest.fixture(scope="module")
def federated(tiny_model, glue_dir, shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    result = run(*rounds_args(tiny_model, glue_dir, shards, root, "base", "--rounds", "3"))
    assert result.exit_code == 0, result.stderr
    return root / "sst2_tiny-roberta" / "base", result


def test_run_tree_is_exactly_as_documented(federated):
    run_dir, result = federated
    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    adapter_files = [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "adapter/fedlora_adapter.json",
    ]
    expected = ["history.jsonl", "run.json", "round_000/global/metrics.json"]  # round 0: the starting adapter
    for r in (1, 2, 3):
        for who in ("client_001", "client_002", "client_003", "global"):
            expected += [f"round_{r:03d}/{who}/{f}" for f in [*adapter_files, "metrics.json"]]
    expected += [f"final/{f}" for f in [*adapter_files, "metrics.json"]]
    assert files == sorted(expected)
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [0, 1, 2, 3]
    start, history = history[0], history[1:]
    assert start["clients"] == [] and 0 <= start["eval"]["accuracy"] <= 1 and start["eval_loss"] > 0
    for h in history:
        assert h["bytes_up"] > 0 and h["bytes_down"] > 0 and h["seconds"]["wall"] > 0
        assert h["learning_rate"] == 2e-2 and h["eval_loss"] > 0 and h["time"]
        assert h["memory"]["peak_rss_mb"] >= h["memory"]["rss_mb"] > 0 and h["memory"]["cuda_peak_mb"] is None
        assert 0 <= h["aggregation"]["error"] < 1 and h["eval"]["accuracy"] >= 0
        assert [c["examples"] for c in h["client_metrics"]] == [100, 200, 300]
    record = json.loads((run_dir / "run.json").read_text())
    assert record["shards_fingerprint"] and record["client_sizes"] == {"1": 100, "2": 200, "3": 300}
    assert "final adapter" in result.stdout


def test_federated_lora_learns(federated):
    run_dir, _ = federated
    final = json.loads((run_dir / "final" / "metrics.json").read_text())
    assert final["metrics"]["accuracy"] >= 0.9 and final["command"] == "rounds" and final["rounds"] == 3, (
        final
    )


def test_every_round_clients_train_lora_and_head_and_the_global_moves(federated):
    run_dir, _ = federated
    for r in (1, 2, 3):
        for c in (1, 2, 3):
            client = adapter(run_dir / f"round_{r:03d}" / f"client_{c:03d}")
            assert all(client[k].abs().sum() > 0 for k in client if "lora_B" in k)  # B starts at 0
            if r > 1:
                # The reference froze A/B from round 2 on (PeftModel.from_pretrained without is_trainable):
                # here every tensor, LoRA A, LoRA B and the head, must move away from the broadcast.
                broadcast = adapter(run_dir / f"round_{r - 1:03d}" / "global")
                same = [k for k in client if torch.equal(client[k], broadcast[k])]
                assert not same, f"round {r} client {c} did not train {same}"
        if r > 1:
            before, after = (
                adapter(run_dir / f"round_{r - 1:03d}" / "global"),
                adapter(run_dir / f"round_{r:03d}" / "global"),
            )
            assert all(not torch.equal(before[k], after[k]) for k in after)


def test_clients_data_order_differs_between_rounds(federated):
    run_dir, _ = federated
    for c in (1, 2, 3):
        orders = {json.loads((run_dir / f"round_{r:03d}" / f"client_{c:03d}" / "metrics.json").read_text())["order"]
                  for r in (1, 2, 3)}  # fmt: skip
        seeds = {json.loads((run_dir / f"round_{r:03d}" / f"client_{c:03d}" / "metrics.json").read_text())["seed"]
                 for r in (1, 2, 3)}  # fmt: skip
        assert len(orders) == 3 and len(seeds) == 3
    assert derive_seed(42, 1, 1) != derive_seed(42, 2, 1) != derive_seed(42, 1, 2)
    assert derive_seed(42, 2, 3) == derive_seed(42, 2, 3)


def test_head_is_averaged_with_example_counts_not_batches(federated):
    run_dir, _ = federated
    clients = [adapter(run_dir / "round_001" / f"client_{c:03d}") for c in (1, 2, 3)]
    global_ = adapter(run_dir / "round_001" / "global")
    weights = [100 / 600, 200 / 600, 300 / 600]  # batches would give 4/19, 7/19, 10/19 at batch size 32
    head_keys = [k for k in global_ if "classifier" in k]
    assert head_keys
    for k in head_keys:
        expected = sum(w * c[k].double() for w, c in zip(weights, clients, strict=True))
        torch.testing.assert_close(global_[k].double(), expected, rtol=1e-6, atol=1e-7)


def test_global_is_the_svd_of_the_weighted_sum_of_client_updates(federated):
    run_dir, _ = federated
    clients = [adapter(run_dir / "round_002" / f"client_{c:03d}") for c in (1, 2, 3)]
    global_ = adapter(run_dir / "round_002" / "global")
    config = json.loads((run_dir / "round_002" / "global" / "adapter" / "adapter_config.json").read_text())
    client_config = json.loads(
        (run_dir / "round_002" / "client_001" / "adapter" / "adapter_config.json").read_text()
    )
    # --svd-rank defaults to the clients' rank, --alpha keeps their scaling (lora_alpha / r = 16 / 8)
    assert config["r"] == 8 and config["lora_alpha"] == 16
    s_client = client_config["lora_alpha"] / client_config["r"]
    prefix = next(k for k in global_ if k.endswith("query.lora_A.weight")).removesuffix(".lora_A.weight")
    target = sum(w * s_client * c[f"{prefix}.lora_B.weight"].double() @ c[f"{prefix}.lora_A.weight"].double()
                 for w, c in zip([1 / 6, 2 / 6, 3 / 6], clients, strict=True))  # fmt: skip
    u, sv, vh = torch.linalg.svd(target)
    best = u[:, :8] @ torch.diag(sv[:8]) @ vh[:8]
    s_global = config["lora_alpha"] / config["r"]
    ours = (
        s_global * global_[f"{prefix}.lora_B.weight"].double() @ global_[f"{prefix}.lora_A.weight"].double()
    )
    torch.testing.assert_close(ours, best, rtol=1e-5, atol=1e-6)


def test_final_adapter_opens_with_plain_peft(federated, tiny_model):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    run_dir, _ = federated
    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model), num_labels=2)
    model = PeftModel.from_pretrained(base, str(run_dir / "final" / "adapter"))
    loaded = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert loaded and all(v.abs().sum() > 0 for v in loaded.values())


def test_merge_of_round_one_clients_equals_round_one_global(federated, shards, tmp_path):
    run_dir, _ = federated
    out = tmp_path / "merged"
    clients = [run_dir / "round_001" / f"client_{c:03d}" / "adapter" for c in (1, 2, 3)]
    manifests = [shards / f"client_{c}.json" for c in (1, 2, 3)]
    # the reference's command-line style: several values after one flag
    result = run(
        "merge",
        "--adapters",
        *clients,
        "--shard_manifests",
        *manifests,
        "--save_adapter",
        out,
        "--task",
        "sst2",
    )
    assert result.exit_code == 0, result.stderr
    merged = load_file(str(out / "adapter_model.safetensors"))
    expected = adapter(run_dir / "round_001" / "global")
    assert set(merged) == set(expected)
    for k in merged:
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-6, atol=1e-7)
    manifest = json.loads((out / "fuse_manifest.json").read_text())
    assert manifest["weights"] == pytest.approx([1 / 6, 2 / 6, 3 / 6]) and manifest["skip_svd"] is False
    assert (out / "adapter_config.json").is_file()


@pytest.mark.slow
def test_resume_after_an_interruption_mid_round_is_bit_identical(
    tiny_model, glue_dir, shards, federated, tmp_path, monkeypatch
):
    from fedlora_cli.federation import local

    real = local.train_client
    calls = []

    def interrupt_in_round_two(model, data, indices, plan, *args, **kwargs):
        calls.append((kwargs["round_no"], plan.client_id))
        if (kwargs["round_no"], plan.client_id) == (2, 2):
            raise KeyboardInterrupt
        return real(model, data, indices, plan, *args, **kwargs)

    args = rounds_args(tiny_model, glue_dir, shards, tmp_path, "resumed", "--rounds", "3")
    with monkeypatch.context() as m:
        m.setattr(local, "train_client", interrupt_in_round_two)
        first = run(*args)
    one_error_line(first, 130, "--resume")
    run_dir = tmp_path / "sst2_tiny-roberta" / "resumed"
    assert (run_dir / "round_001" / "global" / "metrics.json").is_file()
    assert not (run_dir / "round_002" / "global").exists()  # round 2 never closed

    again = run(*args, "--resume")
    assert again.exit_code == 0, again.stderr
    assert "resumed after round 1" in again.stdout
    reference, _ = federated
    for sub in ["final", *(f"round_{r:03d}/global" for r in (1, 2, 3)), "round_002/client_002"]:
        a = (run_dir / sub / "adapter" / "adapter_model.safetensors").read_bytes()
        b = (reference / sub / "adapter" / "adapter_model.safetensors").read_bytes()
        assert a == b, f"{sub} differs after resume"
    history = [json.loads(line)["round"] for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert history == [0, 1, 2, 3]


@pytest.mark.slow
def test_every_engines_round_loop_runs_inside_the_one_lifecycle(tiny_model, glue_dir, shards, tmp_path):
    """An engine brings only its round loop (`run_federated`): a Ctrl-C inside it becomes one Interrupted line
    that says how to --resume, run.json says interrupted, the run folder is released, and engine local
    continues the run to the same result as an uninterrupted one."""
    from dataclasses import replace

    from fedlora_cli.config import DataSpec, ModelSpec, OutputSpec, RoundsConfig, TrainSpec
    from fedlora_cli.errors import Interrupted
    from fedlora_cli.federation import run_federated, run_local, train_client

    train = TrainSpec(epochs=1.0, learning_rate=2e-2, precision="fp32", batch_size=32)
    data, model = DataSpec("sst2", str(glue_dir)), ModelSpec(str(tiny_model))
    config = RoundsConfig(data, str(shards), model=model, train=train, rounds=2, eval_each_round=False)
    reference = run_local(replace(config, output=OutputSpec(str(tmp_path), "reference")))

    def stops_in_round_two(driver):  # an engine of its own: round 1 trained here, then Ctrl-C
        s = driver.s
        assert list(driver.rounds_left) == [1, 2]
        plan = driver.plan_round(1)
        index = dict(zip(s.shards.client_ids, s.shards.clients, strict=True))
        kwargs = dict(round_no=1, run_seed=s.config.train.seed, device=s.device, precision=s.precision)
        reports = [
            train_client(s.model, s.data, index[c], plan.plans[c], s.config.train, **kwargs)
            for c in plan.selected
        ]
        driver.close_round(plan, reports, [])
        raise KeyboardInterrupt

    stopped = replace(config, output=OutputSpec(str(tmp_path), "stopped"))
    with pytest.raises(Interrupted, match="round 1 .*--resume"):
        run_federated(stopped, stops_in_round_two)
    run_dir = tmp_path / "sst2_tiny-roberta" / "stopped"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    resumed = run_local(replace(stopped, resume=True))  # the lock is free again
    assert resumed.resumed_after == 1 and [row.round for row in resumed.history] == [1, 2]
    for sub in ("round_001/global", "round_002/global", "final"):
        a = (run_dir / sub / "adapter" / "adapter_model.safetensors").read_bytes()
        assert a == (reference.run_dir / sub / "adapter" / "adapter_model.safetensors").read_bytes(), sub


@pytest.mark.slow
def test_same_command_twice_gives_identical_files(tiny_model, glue_dir, shards, federated, tmp_path):
    result = run(*rounds_args(tiny_model, glue_dir, shards, tmp_path, "again", "--rounds", "3"))
    assert result.exit_code == 0, result.stderr
    reference, _ = federated
    twin = tmp_path / "sst2_tiny-roberta" / "again"
    for path in sorted(reference.rglob("*.safetensors")):
        assert path.read_bytes() == (twin / path.relative_to(reference)).read_bytes(), path
    for path in sorted(reference.rglob("adapter_config.json")):
        assert path.read_text() == (twin / path.relative_to(reference)).read_text()


def test_naive_aggregation_sampling_and_reference_flags(tiny_model, glue_dir, shards, tmp_path):
    result = run(
        "rounds", "--task_name", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--shard_dir", shards,
        "--rounds", "2", "--local_epochs", "1", "--skip_svd", "--lora_r", "4", "--lora_alpha", "8",
        "--clients-per-round", "2", "--output_root", tmp_path, "--run-name", "naive", "--no-eval-each-round",
        "--precision", "fp32",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    run_dir = tmp_path / "sst2_tiny-roberta" / "naive"
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert [h["clients"] for h in history] == [select_clients([1, 2, 3], 2, 42, r) for r in (1, 2)]
    assert all(len(h["clients"]) == 2 for h in history)
    assert history[0]["eval"] is None and history[1]["eval"] is not None  # the last round is always evaluated
    config = json.loads((run_dir / "final" / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)  # naive keeps the clients' shape
    assert history[0]["aggregation"]["method"] == "naive" and history[0]["aggregation"]["error"] > 0
    clients = [adapter(run_dir / "round_001" / f"client_{c:03d}") for c in history[0]["clients"]]
    sizes = {1: 100, 2: 200, 3: 300}
    w = np.array([sizes[c] for c in history[0]["clients"]], dtype=float)
    w /= w.sum()
    global_ = adapter(run_dir / "round_001" / "global")
    k = next(k for k in global_ if "lora_A" in k)
    torch.testing.assert_close(
        global_[k].double(), sum(wi * c[k].double() for wi, c in zip(w, clients, strict=True))
    )


def test_init_adapter_and_svd_rank_change(tiny_model, glue_dir, shards, tmp_path):
    trained = tmp_path / "train"
    result = run("train", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--epochs", "1",
                 "--max-train-samples", "64", "--output-dir", trained)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    result = run(*rounds_args(tiny_model, glue_dir, shards, tmp_path, "init", "--rounds", "2", "--local-epochs", "1",
                              "--init-adapter", trained / "adapter", "--svd-rank", "4", "--alpha", "8"))  # fmt: skip
    assert result.exit_code == 0, result.stderr
    run_dir = tmp_path / "sst2_tiny-roberta" / "init"
    config = json.loads((run_dir / "round_002" / "global" / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8)
    round2_client = json.loads(
        (run_dir / "round_002" / "client_001" / "adapter" / "adapter_config.json").read_text()
    )
    # clients keep their own rank and scaling (the --init-adapter's r=8, alpha=16): the rank-4 global
    # adapter is padded for them, its product unchanged
    assert (round2_client["r"], round2_client["lora_alpha"]) == (8, 16)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["config"]["init_adapter"] == str(trained / "adapter")


def test_bad_shards_and_runs_are_refused(tiny_model, glue_dir, shards, federated, tmp_path):
    base = ["--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--output-root", tmp_path]
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error_line(run("rounds", *base, "--shards", empty), 2, "fedlora shard")
    far = write_manifests(tmp_path / "far", [[0, 1], [5, 10_000]])
    one_error_line(run("rounds", *base, "--shards", far), 2, "index 10,000")
    other = write_manifests(tmp_path / "other", [[0, 1], [2, 3]], task="rte")
    one_error_line(run("rounds", *base, "--shards", other), 2, "rte")
    zero = write_manifests(tmp_path / "zero", [[0, 1], []])
    one_error_line(run("rounds", *base, "--shards", zero), 2, "client(s) 2")
    one_error_line(run("rounds", *base, "--shards", shards, "--svd-rank", "0"), 2, "--svd-rank must be >= 1")
    assert not list(tmp_path.glob("sst2_*"))  # nothing was started

    root = federated[0].parent.parent
    existing = ["rounds", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--shards", shards,
                "--output-root", root, "--run-name", "base", *FAST, "--rounds", "3"]  # fmt: skip
    before = (federated[0] / "history.jsonl").read_text()
    one_error_line(run(*existing), 2, "--resume")
    one_error_line(run(*existing, "--learning-rate", "0.03", "--resume"), 2, "learning_rate: 0.02 -> 0.03")
    assert (federated[0] / "history.jsonl").read_text() == before  # nothing already written was lost


def test_merge_refuses_incompatible_adapters(federated, tmp_path):
    run_dir, _ = federated
    a = run_dir / "round_001" / "client_001" / "adapter"
    b = run_dir / "round_001" / "client_002" / "adapter"
    one_error_line(
        run("merge", "--adapters", a, b, "--save-adapter", tmp_path / "m", "--task", "mnli"), 2, "needs 3"
    )
    one_error_line(
        run("merge", "--adapters", a, b, "--weights", "1", "--save-adapter", tmp_path / "m"),
        2,
        "1 value for 2",
    )
    halved = tmp_path / "halved"  # the same adapter at alpha 8: another scaling than the clients' 16 / 8
    halved.mkdir()
    cfg = json.loads((a / "adapter_config.json").read_text())
    (halved / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": 8}))
    (halved / "adapter_model.safetensors").write_bytes((a / "adapter_model.safetensors").read_bytes())
    one_error_line(
        run("merge", "--adapters", a, halved, "--aggregation", "naive", "--save-adapter", tmp_path / "m"),
        2,
        "use svd",
    )
    odd = tmp_path / "odd"
    odd.mkdir()
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["target_modules"] = ["key", "value"]
    (odd / "adapter_config.json").write_text(json.dumps(cfg))
    (odd / "adapter_model.safetensors").write_bytes((a / "adapter_model.safetensors").read_bytes())
    one_error_line(
        run("merge", "--adapters", a, odd, "--save-adapter", tmp_path / "m"), 2, "different modules"
    )
    assert not (tmp_path / "m").exists()
