"""The local training function: it learns, it changes exactly what should change, it is reproducible."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedlora_cli.config import DataSpec, LoraSpec, ModelSpec, TrainSpec
from fedlora_cli.evaluation import evaluate
from fedlora_cli.features import load_task_data
from fedlora_cli.modeling import LoraModel, load_base_model, load_tokenizer
from fedlora_cli.tasks import get_task
from fedlora_cli.training import linear_schedule, train_model

CPU = torch.device("cpu")
FAST = TrainSpec(epochs=5, learning_rate=1e-2, batch_size=32, precision="fp32")


@pytest.fixture(scope="module")
def sst2(tiny_model, glue_dir):
    spec = ModelSpec(str(tiny_model))
    return spec, load_task_data(DataSpec("sst2", str(glue_dir)), load_tokenizer(spec))


def _lora(spec, seed=0):
    return LoraModel(load_base_model(spec, get_task("sst2"), seed), LoraSpec(), CPU)


def test_lora_training_learns_and_touches_only_lora_and_head(sst2):
    spec, data = sst2
    model = _lora(spec)
    before_adapter = model.state()
    before_base = {k: v.clone() for k, v in model.module.named_parameters() if not v.requires_grad}
    trainable = {k for k, v in model.module.named_parameters() if v.requires_grad}
    assert trainable and all(("lora_" in k) or ("modules_to_save" in k) for k in trainable)

    result = train_model(model.module, data.train, FAST, device=CPU, precision="fp32", seed=1)
    acc = evaluate(model.module, get_task("sst2"), data.evals, 64, CPU, "fp32").metrics["accuracy"]
    assert acc >= 0.9, acc
    assert result.last_loss < 0.5 * result.loss or result.last_loss < 0.3

    after = model.state()
    lora_b = [k for k in after if "lora_B" in k]
    assert all(before_adapter[k].abs().sum() == 0 for k in lora_b)  # PEFT inits B at zero …
    assert all(after[k].abs().sum() > 0 for k in lora_b)  # … and training moved every B
    assert all(not torch.equal(after[k], before_adapter[k]) for k in after)  # A, B and the head all changed
    for k, v in model.module.named_parameters():
        if k in before_base:
            assert torch.equal(v, before_base[k]), f"frozen weight {k} changed"


def test_same_seed_same_result_other_seed_other_order(sst2):
    spec, data = sst2
    short = TrainSpec(epochs=1, learning_rate=1e-2, precision="fp32")
    runs = []
    for seed in (3, 3, 4):
        model = _lora(spec)
        r = train_model(model.module, data.train, short, device=CPU, precision="fp32", seed=seed)
        runs.append((r, model.state()))
    (r1, s1), (r2, s2), (r3, s3) = runs
    assert r1.order_digest == r2.order_digest and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert r1.order_digest != r3.order_digest and any(not torch.equal(s1[k], s3[k]) for k in s1)


def test_indices_restrict_training_to_a_subset(sst2):
    spec, data = sst2
    model = _lora(spec)
    idx = np.arange(0, 100)
    r = train_model(model.module, data.train, TrainSpec(epochs=2, batch_size=10, precision="fp32"),
                    device=CPU, precision="fp32", seed=0, indices=idx)  # fmt: skip
    assert r.examples == 100 and r.steps == 20 and r.samples_seen == 200
    assert r.real_tokens == 2 * int(data.train.lengths[idx].sum())
    assert r.padded_tokens >= r.real_tokens


@pytest.mark.slow
def test_bf16_autocast_trains_too(sst2):
    spec, data = sst2
    model = _lora(spec)
    train_model(model.module, data.train, FAST, device=CPU, precision="bf16", seed=1)
    acc = evaluate(model.module, get_task("sst2"), data.evals, 64, CPU, "bf16").metrics["accuracy"]
    assert acc >= 0.85, acc


def test_linear_schedule_warms_up_then_decays_to_zero():
    f = linear_schedule(total_steps=10, warmup_steps=2)
    values = [f(s) for s in range(11)]
    assert values[0] < values[1] < values[2] == 1.0
    assert values[10] == 0.0 and all(a >= b for a, b in zip(values[2:], values[3:], strict=False))


def test_divergence_stops_with_a_clear_error(sst2):
    from fedlora_cli.errors import FedloraError

    spec, data = sst2
    model = _lora(spec)
    with pytest.raises(FedloraError, match="diverged at step 2"):
        train_model(model.module, data.train, TrainSpec(learning_rate=1e30, precision="fp32", warmup_ratio=0),
                    device=CPU, precision="fp32", seed=0)  # fmt: skip


def test_progress_sees_one_step_per_optimizer_step(sst2):
    from fedlora_cli.progress import RecordingProgress

    spec, data = sst2
    progress = RecordingProgress()
    result = train_model(_lora(spec).module, data.train, TrainSpec(epochs=1.5, batch_size=64, precision="fp32"),
                         device=CPU, precision="fp32", seed=0, progress=progress, progress_key="k")  # fmt: skip
    assert result.steps == 15  # 600 examples: 10 steps per epoch, 1.5 epochs
    assert progress.events[0] == ("start", "k", "training", 15)
    steps = [e for e in progress.events if e[0] == "advance"]
    assert len(steps) == 15 and all(e[2] == 1 and e[3].startswith("loss ") for e in steps)
    assert progress.events[-1] == ("stop", "k")


def test_split_batch_keeps_every_pass_under_the_token_budget():
    from fedlora_cli.training import split_batch

    lengths = np.array([20, 19, 18, 10, 9, 5, 40])
    idx = np.arange(6)  # widest example: 20 tokens
    assert [p.tolist() for p in split_batch(idx, lengths, None)] == [idx.tolist()]
    assert [p.tolist() for p in split_batch(idx, lengths, 200)] == [idx.tolist()]  # 6 x 20 fits
    for budget in (20, 30, 45, 64, 100):
        parts = split_batch(idx, lengths, budget)
        assert np.concatenate(parts).tolist() == idx.tolist()  # every example once, in order
        assert all(len(p) * lengths[p].max() <= budget for p in parts), budget
        assert len(parts) == -(-6 // (budget // 20))  # as few passes as the budget allows
    assert [len(p) for p in split_batch(np.array([6, 0]), lengths, 30)] == [1, 1]  # too long: alone


def test_split_passes_give_the_whole_batchs_gradient(sst2):
    from fedlora_cli.training import backward, split_batch

    spec, data = sst2
    model = _lora(spec)
    model.module.eval()  # no dropout: the passes then see exactly what the whole batch sees
    idx = np.arange(40)
    grads = []
    for budget in (None, 100):
        parts = split_batch(idx, data.train.lengths, budget)
        loss = backward(model.module, data.train, idx, parts, CPU, "fp32")
        trainable = model.module.named_parameters()
        grads.append((loss, len(parts), {n: p.grad.clone() for n, p in trainable if p.requires_grad}))
        model.module.zero_grad(set_to_none=True)
    (whole, one, g1), (split, many, g2) = grads
    assert one == 1 and many > 2
    assert torch.allclose(whole, split, rtol=1e-5)
    assert all(torch.allclose(g1[n], g2[n], rtol=1e-4, atol=1e-7) for n in g1)


@pytest.mark.slow
def test_max_tokens_trains_the_same_steps_and_learns(sst2):
    spec, data = sst2
    model = _lora(spec)
    train = TrainSpec(epochs=5, learning_rate=1e-2, batch_size=32, precision="fp32", max_tokens=128)
    result = train_model(model.module, data.train, train, device=CPU, precision="fp32", seed=1)
    assert result.steps == 5 * -(-len(data.train) // 32) and result.samples_seen == 5 * len(data.train)
    acc = evaluate(model.module, get_task("sst2"), data.evals, 64, CPU, "fp32").metrics["accuracy"]
    assert acc >= 0.9, acc
