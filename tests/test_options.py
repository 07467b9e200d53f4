"""Every numeric option is checked before any work: finite, in range, within what the model allows."""

from __future__ import annotations

import math

import pytest
from clitools import one_error_line, run

from fedlora_cli.config import (
    AggregationSpec,
    DataSpec,
    LoraSpec,
    RoundsConfig,
    SvdOptions,
    TrainSpec,
    clients_per_round_note,
)

SEED_RANGE = "must be an integer in 0..4,294,967,295"


# (flag, value, message): each is refused by `train` before the model is even loaded
TRAIN_BAD = [
    ("--epochs", "nan", "--epochs must be a finite number in (0, 1000], got nan"),
    ("--epochs", "inf", "--epochs must be a finite number in (0, 1000], got inf"),
    ("--epochs", "1e9", "--epochs must be a finite number in (0, 1000]"),
    ("--epochs", "0", "--epochs must be a finite number in (0, 1000], got 0.0"),
    ("--learning-rate", "inf", "--learning-rate must be a finite number > 0, got inf"),
    ("--learning-rate", "nan", "--learning-rate must be a finite number > 0, got nan"),
    ("--weight-decay", "inf", "--weight-decay must be a finite number >= 0, got inf"),
    ("--warmup-ratio", "nan", "--warmup-ratio must be in [0, 1), got nan"),
    ("--max-grad-norm", "nan", "--max-grad-norm must be a finite number >= 0, got nan"),
    ("--max-grad-norm", "-inf", "--max-grad-norm must be a finite number >= 0"),
    ("--lora-alpha", "inf", "--lora-alpha must be > 0, got inf"),
    ("--lora-alpha", "nan", "--lora-alpha must be > 0, got nan"),
    ("--lora-dropout", "nan", "--lora-dropout must be in [0, 1), got nan"),
    ("--lora-r", str(2**40), "--lora-r must be <= 2,147,483,647"),
    ("--batch-size", str(2**40), "--batch-size must be an integer in 1..2,147,483,647"),
    ("--eval-batch-size", "0", "--eval-batch-size must be an integer in 1..2,147,483,647, got 0"),
    ("--max-seq-length", "4", "--max-seq-length must be an integer in 8..2,147,483,647, got 4"),
    ("--seed", "-1", f"--seed {SEED_RANGE}, got -1"),
    ("--seed", str(2**32), f"--seed {SEED_RANGE}, got 4294967296"),
]


@pytest.mark.parametrize(("flag", "value", "message"), TRAIN_BAD)
def test_train_refuses_bad_numbers_before_any_work(tmp_path, flag, value, message):
    # the model does not exist: a check that came after loading it would say so instead
    result = run(
        "train",
        "--task",
        "sst2",
        "--model",
        tmp_path / "no-model",
        flag,
        value,
        "--output-dir",
        tmp_path / "o",
    )
    one_error_line(result, 2, message)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("eval", ["--seed", "-5"], f"--seed {SEED_RANGE}"),
        ("baseline", ["--epochs", "inf"], "--epochs must be a finite number"),
        ("rounds", ["--shards", "s", "--local-epochs", "nan"], "--epochs must be a finite number"),
        ("rounds", ["--shards", "s", "--round-timeout", "inf"], "--round-timeout must be a finite number > 0"),
        ("rounds", ["--shards", "s", "--client-cpus", "inf"], "--client-cpus must be a finite number > 0, got inf"),
        ("rounds", ["--shards", "s", "--rounds", str(10**9)], "--rounds must be an integer in 1..100,000"),
        ("rounds", ["--shards", "s", "--alpha", "inf"], "--alpha must be a finite number > 0, got inf"),
        ("rounds", ["--shards", "s", "--aggregation", "naive", "--svd-rank", "4"], "--svd-rank applies to --aggregation svd only"),
        ("rounds", ["--shards", "s", "--skip_svd", "--alpha", "8"], "--alpha applies to --aggregation svd only"),
        ("merge", ["--adapters", "a", "--save-adapter", "m", "--aggregation", "naive", "--svd-rank", "4", "--alpha", "4"],
         "--svd-rank and --alpha apply to --aggregation svd only"),
        ("merge", ["--adapters", "a", "--adapters", "b", "--weights", "1", "--save-adapter", "m"], "--weights has 1 value for 2 adapters"),
        ("merge", ["--adapters", "a", "--adapters", "b", "--weights", "1", "--weights", "inf", "--save-adapter", "m"],
         "--weights must all be finite numbers > 0, got inf"),
    ],
)  # fmt: skip
def test_other_commands_refuse_bad_numbers_before_any_work(tmp_path, command, args, message):
    task = [] if command == "merge" else ["--task", "sst2", "--model", tmp_path / "no-model"]
    one_error_line(run(command, *task, *args), 2, message)


def test_config_checks_are_the_dataclasses_own():
    for build, message in [
        (lambda: TrainSpec(epochs=math.inf), "--epochs"),
        (lambda: TrainSpec(seed=2**32), "--seed"),
        (lambda: LoraSpec(alpha=math.nan), "--lora-alpha"),
        (lambda: DataSpec("sst2", max_seq_length=2**40), "--max-seq-length"),
        (lambda: AggregationSpec("svd", svd=SvdOptions(rank=0)), "--svd-rank"),
        (
            lambda: AggregationSpec("naive", svd=SvdOptions(alpha=4.0)),
            "--alpha applies to --aggregation svd only",
        ),
        (lambda: RoundsConfig(DataSpec("sst2"), "s", min_clients=0), "--min-clients"),
    ]:
        with pytest.raises(ValueError, match=message):
            build()
    AggregationSpec("naive")  # nothing ignored: fine
    AggregationSpec("svd", svd=SvdOptions(rank=4, alpha=8.0))


def test_clamped_clients_per_round_gets_a_warning_line():
    config = RoundsConfig(DataSpec("sst2"), "s", clients_per_round=12)
    assert clients_per_round_note(config, 12) is None
    note = clients_per_round_note(config, 5)
    assert note == "warning: --clients-per-round 12 is more than the 5 clients: every round uses all 5"
    assert config.clients_in_round(5) == 5


# ---------------------------------------------------------------------------------------------------
# what the model allows, checked once it is built and before any data is tokenized or any step taken


def test_max_seq_length_is_bounded_by_the_models_positions(tiny_model, glue_dir, tmp_path):
    # the tiny RoBERTa has 160 positions; RoBERTa's positions start after the padding index (1): 158 tokens
    from fedlora_cli.preamble import load_model_and_data
    from fedlora_cli.progress import NullProgress

    common = ["--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--output-dir", tmp_path / "o"]
    result = run("train", *common, "--max-seq-length", "159")
    one_error_line(
        result, 2, "--max-seq-length 159 is more than this model takes: it has positions for 158 tokens"
    )
    assert not (tmp_path / "o").exists()
    one_error_line(
        run("eval", *common[:-2], "--max-seq-length", "512"), 2, "use --max-seq-length 158 or less"
    )
    spec = DataSpec("sst2", str(glue_dir), max_seq_length=158, max_eval_samples=8)
    from fedlora_cli.config import ModelSpec

    _, data, _ = load_model_and_data(
        ModelSpec(str(tiny_model)), spec, 0, train=False, progress=NullProgress()
    )
    assert max(int(d.lengths.max()) for d in data.evals.values()) <= 158


def test_lora_rank_is_bounded_by_the_target_modules(tiny_model, glue_dir, tmp_path):
    common = ["--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--output-dir", tmp_path / "o"]
    result = run("train", *common, "--lora-r", "65")  # query/value are 64 x 64
    one_error_line(
        result, 2, "LoRA rank 65 is too large for roberta.encoder.layer.0.attention.self.query (64 x 64)"
    )
    assert not (tmp_path / "o").exists()


def test_too_many_steps_is_refused_before_training(tiny_model, glue_dir, tmp_path, monkeypatch):
    from fedlora_cli import training

    assert training.planned_steps(600, TrainSpec(epochs=1000, batch_size=1)) == 600_000
    with pytest.raises(
        Exception, match="is 67,349,000 optimizer steps, more than 10,000,000: lower --epochs"
    ):
        training.planned_steps(67_349, TrainSpec(epochs=1000, batch_size=1))
    monkeypatch.setattr(training, "MAX_STEPS", 100)  # the fixture's 600 examples cannot reach the real limit

    def never(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr("fedlora_cli.centralised.train_model", never)
    common = ["--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--output-dir", tmp_path / "o"]
    one_error_line(
        run("train", *common, "--epochs", "10", "--batch-size", "1"),
        2,
        "lower --epochs or raise --batch-size",
    )
    one_error_line(
        run("baseline", *common, "--epochs", "10", "--batch-size", "1"), 2, "6,000 optimizer steps"
    )
    assert not (tmp_path / "o").exists()
