"""`rounds --clients-at-once K`: several clients trained together over one frozen base give what they give
one after another (dropout 0), reproducibly (any dropout), resumably, for every method."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import one_error_line, run
from safetensors.torch import load_file
from test_rounds import write_manifests

from fedlora_cli import stacked_lora
from fedlora_cli.aggregation import lora_modules

CPU = torch.device("cpu")
# lr 1e-2 over 2 local epochs: the adapters move far enough from the start for a difference to show
BASE = ["--rounds", "2", "--local-epochs", "2", "--batch-size", "16", "--learning-rate", "1e-2",
        "--precision", "fp32", "--max-eval-samples", "40"]  # fmt: skip


@pytest.fixture(scope="module")
def still_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny RoBERTa without its own dropout (hidden and attention: 0.1 in the fixture), so that one
    client's rows are computed alike whatever the other rows of the pass."""
    folder = Path(shutil.copytree(tiny_model, tmp_path_factory.mktemp("models") / "still-roberta"))
    config = json.loads((folder / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    # four clients of 40, 75, 130 and 55 examples: 3, 5, 9 and 4 steps an epoch at batch 16, last batches partial
    order = np.random.default_rng(0).permutation(600).tolist()
    return write_manifests(
        tmp_path_factory.mktemp("shards") / "k4", [order[:40], order[40:115], order[115:245], order[245:300]]
    )


def rounds(model, glue, shards, out, *extra):
    task = [] if "--task" in extra else ["--task", "sst2"]
    result = run("rounds", *task, "--model", model, "--data-dir", glue, "--shards", shards,
                 "--output-dir", out, *BASE, *extra)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return result


def adapter(run_dir: Path, sub: str) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / sub / "adapter" / "adapter_model.safetensors"))


def products(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per module B·A (what the model computes; factors themselves may turn within an SVD), and the head."""
    out = {p: state[b].double() @ state[a].double() for p, (a, b) in lora_modules(state).items()}
    out.update({k: v.double() for k, v in state.items() if ".lora_" not in k})
    return out


def assert_close_runs(one: Path, many: Path, subs: list[str], rtol: float) -> None:
    for sub in subs:
        a, b = products(adapter(one, sub)), products(adapter(many, sub))
        assert a.keys() == b.keys(), sub
        for key in a:
            err = float((a[key] - b[key]).norm() / a[key].norm().clamp_min(1e-12))
            assert err < rtol, f"{sub} {key}: relative difference {err:.2e}"


EVERY_SUB = ["round_001/client_001", "round_001/client_002", "round_001/client_003", "round_001/client_004",
             "round_001/global", "round_002/client_003", "round_002/global", "final"]  # fmt: skip

METHODS = {
    "svd": ["--aggregation", "svd"],
    "svd-mixed-ranks-prox": ["--aggregation", "svd", "--client-ranks", "4,8,2", "--prox-mu", "0.1"],
    "naive-mixed-ranks": ["--aggregation", "naive", "--client-ranks", "4,8"],
    "exact": ["--aggregation", "exact"],
    "exact-dp-client": ["--aggregation", "exact", "--dp-clip", "0.5", "--dp-noise-multiplier", "0.1",
                        "--dp-where", "client"],
    "ffa-mixed-ranks-max-tokens": ["--aggregation", "ffa", "--client-ranks", "2,8", "--max-tokens", "200"],
    "rolora-global-schedule": ["--aggregation", "rolora", "--lr-schedule", "global-cosine"],
}  # fmt: skip


# one case in the fast subset, every method in the full suite
FAST_CASE = "svd-mixed-ranks-prox"


@pytest.mark.parametrize(
    "method", [m if m == FAST_CASE else pytest.param(m, marks=pytest.mark.slow) for m in METHODS]
)
def test_clients_at_once_give_the_sequential_round(method, still_model, glue_dir, shards, tmp_path):
    """Dropout 0 (LoRA's and the model's): K = 3 (a group of three and a group of one, mixed shard sizes, so
    clients finish at different steps) ends where one after another ends, to float rounding, round after
    round; every client keeps its own data order, and the frozen parts stay bit-identical (close_round
    refuses a report that changed them)."""
    extra = [*METHODS[method], "--lora-dropout", "0"]
    one = tmp_path / "one"
    many = tmp_path / "many"
    rounds(still_model, glue_dir, shards, one, *extra)
    result = rounds(still_model, glue_dir, shards, many, *extra, "--clients-at-once", "3")
    said = result.stdout + result.stderr
    assert "clients at once: 3" in said and "clients 3,2,4" in said
    assert_close_runs(one, many, EVERY_SUB, rtol=2e-3)
    assert_close_runs(one, many, ["round_001/client_002", "round_001/client_003"], rtol=1e-4)
    rows = [
        [json.loads(line) for line in (d / "history.jsonl").read_text().splitlines()] for d in (one, many)
    ]
    for a, b in zip(*rows, strict=True):
        assert [c["order"] for c in a["client_metrics"]] == [c["order"] for c in b["client_metrics"]]
        assert [c["steps"] for c in a["client_metrics"]] == [c["steps"] for c in b["client_metrics"]]
        if a["round"]:
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
            assert sorted(a["client_metrics"][0]) == sorted(b["client_metrics"][0])  # the same report keys
    record = json.loads((many / "run.json").read_text())
    assert record["config"]["clients_at_once"] == 3


def test_a_regression_task_at_once_gives_the_sequential_round(still_model, glue_dir, tmp_path):
    """STS-B: one output, a squared-error loss per row (as the model's MSE counts it)."""
    order = np.random.default_rng(1).permutation(150).tolist()
    shards = write_manifests(tmp_path / "shards", [order[:50], order[50:]], task="stsb", total=150)
    args = ["--task", "stsb", "--rounds", "1", "--lora-dropout", "0"]
    one, many = tmp_path / "one", tmp_path / "many"
    rounds(still_model, glue_dir, shards, one, *args)
    rounds(still_model, glue_dir, shards, many, *args, "--clients-at-once", "2")
    assert_close_runs(one, many, ["round_001/client_001", "round_001/client_002", "final"], rtol=1e-4)


@pytest.mark.slow
def test_with_dropout_a_run_is_reproducible_bit_for_bit_and_resumes_at_any_k(
    tiny_model, glue_dir, shards, tmp_path
):
    """The fixture's model has hidden and attention dropout 0.1, LoRA dropout 0.1 by default: each client's
    masks come from its own stream, so the same K gives the same files; a run
    resumed after round 1 ends bit for bit as the uninterrupted run; K may change on --resume."""
    a, b = tmp_path / "a", tmp_path / "b"
    rounds(tiny_model, glue_dir, shards, a, "--clients-at-once", "2")
    rounds(tiny_model, glue_dir, shards, b, "--clients-at-once", "2")
    for path in sorted(a.rglob("*.safetensors")):
        assert path.read_bytes() == (b / path.relative_to(a)).read_bytes(), path
    one = tmp_path / "one"
    rounds(tiny_model, glue_dir, shards, one)  # sequential: other masks, so other numbers
    sequential, together = adapter(one, "round_001/client_003"), adapter(a, "round_001/client_003")
    assert not all(torch.equal(sequential[k], together[k]) for k in sequential)

    # resumed at K = 4 after round 1 of a K = 4 run: bit for bit the uninterrupted K = 4 run
    four = tmp_path / "four"
    rounds(tiny_model, glue_dir, shards, four, "--clients-at-once", "4")
    resumed = Path(shutil.copytree(four, tmp_path / "resumed"))
    shutil.rmtree(resumed / "final")
    rounds(tiny_model, glue_dir, shards, resumed, "--resume-from-round", "1", "--clients-at-once", "4")
    for path in sorted(four.rglob("*.safetensors")):
        assert path.read_bytes() == (resumed / path.relative_to(four)).read_bytes(), path
    # and K may change on --resume (it does not change what a run computes): recorded as a change
    changed = Path(shutil.copytree(a, tmp_path / "changed"))
    rounds(tiny_model, glue_dir, shards, changed, "--resume-from-round", "1", "--clients-at-once", "4")
    record = json.loads((changed / "run.json").read_text())
    assert record["config"]["clients_at_once"] == 4
    assert record["resumes"][-1]["changes"] == {"clients_at_once": [2, 4]}


def test_a_k_that_cannot_fit_fails_before_training_with_one_line(
    still_model, glue_dir, shards, tmp_path, monkeypatch
):
    from fedlora_cli.federation import stacked

    monkeypatch.setattr(stacked, "_available", lambda device: (1.0, "RAM"))
    out = tmp_path / "tight"
    result = run("rounds", "--task", "sst2", "--model", still_model, "--data-dir", glue_dir, "--shards", shards,
                 "--output-dir", out, *BASE, "--clients-at-once", "4")  # fmt: skip
    line = one_error_line(result, 2, "--clients-at-once 4: a pass of 64 rows")
    assert "MB RAM is available" in line and "--max-tokens" in line
    assert not list(out.glob("round_001/client_*"))  # no client trained


def test_clients_at_once_is_engine_local_only(still_model, glue_dir, shards, tmp_path):
    result = run("rounds", "--task", "sst2", "--model", still_model, "--data-dir", glue_dir, "--shards", shards,
                 "--output-dir", tmp_path / "x", "--engine", "flower", "--clients-at-once", "2")  # fmt: skip
    one_error_line(result, 2, "--clients-at-once 2 needs --engine local")
    one_error_line(
        run("rounds", "--task", "sst2", "--clients-at-once", "0"),
        2,
        "--clients-at-once must be an integer in 1..",
    )


# ---------------------------------------------------------------------------------------------------
# the stacked layers


def lora_model(model_dir: Path, r: int = 4, dropout: float = 0.0):
    from fedlora_cli.config import LoraSpec, ModelSpec
    from fedlora_cli.modeling import LoraModel, load_base_model
    from fedlora_cli.tasks import get_task

    spec = LoraSpec(r=r, alpha=2.0 * r, dropout=dropout)
    return LoraModel(load_base_model(ModelSpec(str(model_dir)), get_task("sst2"), 0), spec, CPU)


def random_adapter(model, seed: int) -> stacked_lora.ClientAdapter:
    """The model's adapter with every LoRA factor and the head drawn at random (B is 0 when fresh)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.peft.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return stacked_lora.take(model.peft, model.peft.active_adapter, frozenset({"A", "B", "head"}))


def batch(n: int, width: int = 9, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 300, (n, width), generator=g)
    mask = torch.ones(n, width, dtype=torch.long)
    mask[1::2, width - 3 :] = 0  # some rows padded
    ids[mask == 0] = 1
    return {"input_ids": ids, "attention_mask": mask}


def stacked_logits(model, clients, seeds, rows, x, train: bool = False) -> torch.Tensor:
    stack = stacked_lora.Stack(clients, seeds, CPU)
    with stack.swapped(model.peft):
        model.peft.train(train)
        start, segments = 0, []
        for k, n in rows:
            segments.append(stacked_lora.Segment(k, start, start + n))
            start += n
        stack.set_rows(segments)
        out = model.peft(**x).logits
        model.peft.eval()
    return out


def test_each_row_goes_through_its_own_clients_adapter(still_model):
    """Rows of three clients (two of rank 4, one of rank 2: the loop path; equal row counts: the bmm path)
    give the logits each client's adapter gives alone; the model is its own again afterwards."""
    model = lora_model(still_model)
    clients = [random_adapter(model, s) for s in (1, 2)]
    from fedlora_cli.config import LoraSpec

    model.activate(LoraSpec(r=2, alpha=4.0, dropout=0.0))
    clients.append(random_adapter(model, 3))
    x = batch(6)
    alone = []
    for k, c in enumerate(clients):
        model.activate(
            LoraSpec(r=2, alpha=4.0, dropout=0.0) if k == 2 else LoraSpec(r=4, alpha=8.0, dropout=0.0)
        )
        stacked_lora.put(model.peft, model.peft.active_adapter, c)
        with torch.no_grad():
            alone.append(model.peft(**x).logits)
    with torch.no_grad():
        mixed = stacked_logits(model, clients, [0, 0, 0], [(0, 2), (1, 2), (2, 2)], x)
        bmm = stacked_logits(model, clients[:2], [0, 0], [(0, 3), (1, 3)], x)
    torch.testing.assert_close(
        mixed, torch.cat([alone[0][:2], alone[1][2:4], alone[2][4:]]), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(bmm, torch.cat([alone[0][:3], alone[1][3:]]), rtol=1e-5, atol=1e-6)
    assert not any(isinstance(m, stacked_lora.StackedLoraLinear | stacked_lora.ClientDropout)
                   for m in model.peft.modules())  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(model.peft(**x).logits, alone[2])


def test_a_clients_gradient_comes_from_its_own_rows_only(still_model):
    model = lora_model(still_model)
    clients = [random_adapter(model, s) for s in (1, 2)]
    stack = stacked_lora.Stack(clients, [0, 0], CPU)
    x = batch(4)
    with stack.swapped(model.peft):
        stack.set_rows([stacked_lora.Segment(0, 0, 2), stacked_lora.Segment(1, 2, 4)])
        logits = model.peft(**x).logits
        logits[:2].sum().backward()  # client 0's rows only
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stack.parameters(0))
        assert all(p.grad is None or not p.grad.any() for p in stack.parameters(1))


def test_each_clients_dropout_masks_come_from_its_own_seed(tiny_model):
    """Hidden, attention, LoRA and head dropout (0.1 each): a client's rows depend on its own seed, not on
    the other client's seed nor on the process's global generator; another seed of its own changes them."""
    model = lora_model(tiny_model, dropout=0.1)
    clients = [random_adapter(model, s) for s in (1, 2)]
    x = batch(4)
    rows = [(0, 2), (1, 2)]
    with torch.no_grad():
        torch.manual_seed(0)
        first = stacked_logits(model, clients, [11, 22], rows, x, train=True)
        torch.manual_seed(1)
        other_global = stacked_logits(model, clients, [11, 22], rows, x, train=True)
        other_neighbour = stacked_logits(model, clients, [11, 99], rows, x, train=True)
        other_own = stacked_logits(model, clients, [12, 22], rows, x, train=True)
        still = stacked_logits(model, clients, [11, 22], rows, x, train=False)
    assert torch.equal(first, other_global)
    assert torch.equal(first[:2], other_neighbour[:2]) and not torch.equal(first[2:], other_neighbour[2:])
    assert not torch.equal(first[:2], other_own[:2]) and torch.equal(first[2:], other_own[2:])
    assert not torch.equal(first, still)  # dropout did act


def test_memory_estimate_grows_with_the_rows_of_a_pass_and_max_tokens_bounds_it(still_model, glue_dir):
    from fedlora_cli.config import DataSpec, ModelSpec, TrainSpec
    from fedlora_cli.features import load_task_data
    from fedlora_cli.federation.stacked import estimate_memory
    from fedlora_cli.modeling import load_tokenizer

    model = lora_model(still_model)
    data = load_task_data(
        DataSpec(task="sst2", data_dir=str(glue_dir)), load_tokenizer(ModelSpec(str(still_model)))
    )
    two = estimate_memory(model, data, TrainSpec(batch_size=16), 2, CPU, "fp32")
    four = estimate_memory(model, data, TrainSpec(batch_size=16), 4, CPU, "fp32")
    bounded = estimate_memory(
        model, data, TrainSpec(batch_size=16, max_tokens=10 * four.width), 4, CPU, "fp32"
    )
    assert (two.rows, four.rows, bounded.rows) == (32, 64, 10)
    assert two.per_row_mb > 0 and four.total_mb > two.total_mb > bounded.total_mb
    assert four.total_mb == pytest.approx(four.fixed_mb + 64 * four.per_row_mb)


def test_a_step_of_several_clients_is_passes_of_batches_of_similar_width():
    """Every row once, each client's rows together within a pass, padding within PADDING_SLACK of what the
    batches need alone, and --max-tokens caps every pass (a batch wider than it is split first)."""
    from fedlora_cli.federation.stacked import PADDING_SLACK, plan_passes

    lengths = np.array([10] * 16 + [40] * 16 + [11] * 16 + [38] * 16 + [15] * 16)
    batches = [np.arange(0, 16), np.arange(16, 32), np.arange(32, 48), np.arange(48, 64), np.arange(64, 80)]
    passes = plan_passes(batches, lengths, None)
    # widest first; similar widths share a pass (40 with 38; 15, 11 and 10), 38 with 15 would not
    assert [[j for j, _ in p] for p in passes] == [[1, 3], [4, 2, 0]]
    for p in passes:
        rows = np.concatenate([part for _, part in p])
        assert len(rows) * lengths[rows].max() <= PADDING_SLACK * sum(len(x) * lengths[x].max() for _, x in p)
    seen = np.sort(np.concatenate([part for p in passes for _, part in p]))
    assert np.array_equal(seen, np.arange(80))
    capped = plan_passes(batches, lengths, 400)
    assert all(sum(len(x) for _, x in p) * max(lengths[x].max() for _, x in p) <= 400 for p in capped)
    assert np.array_equal(np.sort(np.concatenate([x for p in capped for _, x in p])), np.arange(80))


def test_a_global_schedule_puts_each_clients_turn_on_its_rounds_slice(monkeypatch):
    """`--lr-schedule global-*`: round t's turn is the t-th slice of one schedule over all rounds, on either
    path (train_client passes the window the stacked path computes with the same `client_window`)."""
    from fedlora_cli.config import TrainSpec
    from fedlora_cli.federation import client

    spec = TrainSpec(epochs=1.0, batch_size=16, lr_schedule="global-cosine")
    assert client.client_window(spec, 2, 3, 64) == (4, 12)  # 4 steps a turn: round 2 of 3 is steps 4-7 of 12
    assert client.client_window(spec, 2, None, 64) is None
    assert client.client_window(TrainSpec(epochs=1.0, lr_schedule="per-turn"), 2, 3, 64) is None

    class Stop(Exception):
        pass

    def record(*args, **kwargs):
        raise Stop(kwargs["window"])

    class Model:
        module = None

        def apply_plan(self, plan):
            pass

    monkeypatch.setattr(client, "train_model", record)
    from fedlora_cli.config import LoraSpec
    from fedlora_cli.strategies.base import ClientPlan, GlobalAdapter

    plan = ClientPlan(1, GlobalAdapter({}, LoraSpec()))
    data = type("Data", (), {"train": None})()
    with pytest.raises(Stop) as stop:
        client.train_client(Model(), data, np.arange(64), plan, spec, round_no=3, run_seed=0, device=CPU,
                            precision="fp32", rounds=3)  # fmt: skip
    assert stop.value.args[0] == (8, 12)


def test_a_plans_rank_regulariser_pulls_each_clients_own_tail_toward_zero(still_model, glue_dir):
    """A plan that carries HetLoRA's rank regulariser (tail_penalty λ, tail_from k) adds
    λ·Σ ‖B[:, k:]‖·‖A[k:, :]‖ over that client's own factors: its ranks beyond k shrink, the other client's
    do not move."""
    from dataclasses import dataclass

    from fedlora_cli.config import DataSpec, ModelSpec, TrainSpec
    from fedlora_cli.features import load_task_data
    from fedlora_cli.federation.stacked import train_clients_at_once
    from fedlora_cli.modeling import load_tokenizer
    from fedlora_cli.strategies.base import ClientPlan, GlobalAdapter

    @dataclass(frozen=True)
    class TailPlan(ClientPlan):
        tail_penalty: float = 0.0
        tail_from: int = 0

    model = lora_model(still_model, r=8)
    random_adapter(model, 1)  # B away from 0, so the tail has a norm to lose
    start = GlobalAdapter(model.state(), model.spec)
    data = load_task_data(
        DataSpec(task="sst2", data_dir=str(glue_dir)), load_tokenizer(ModelSpec(str(still_model)))
    )
    spec = TrainSpec(epochs=2.0, batch_size=16, learning_rate=3e-2, lr_schedule="constant", warmup_ratio=0.0)

    def tails(penalty: float) -> list[float]:
        members = [(np.arange(0, 64), TailPlan(1, start, tail_penalty=penalty, tail_from=4)),
                   (np.arange(64, 128), TailPlan(2, start))]  # fmt: skip
        reports = train_clients_at_once(model, data, members, spec, round_no=1, run_seed=0, device=CPU,
                                        precision="fp32")  # fmt: skip
        return [sum(float(v[..., 4:].norm() if ".lora_B." in k else v[4:].norm()) for k, v in r.state.items()
                    if ".lora_" in k) for r in reports]  # fmt: skip

    plain, pulled = tails(0.0), tails(5.0)
    assert pulled[0] < 0.7 * plain[0]
    assert pulled[1] == pytest.approx(plain[1], rel=1e-5)
