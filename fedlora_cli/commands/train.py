"""`fedlora train`: centralised LoRA fine-tuning on one machine."""

from __future__ import annotations

from typing import Any

from fedlora_cli.commands import _common as c
from fedlora_cli.config import TRAIN_SCHEDULES, TrainConfig

OPTIONS = c.Command(
    TrainConfig,
    rename={"train.lr_schedule": c.Rename(choices=TRAIN_SCHEDULES)},
    required={"data.task"},
    extras=[c.MODEL_SIZE, c.LOG_EVERY, c.REPORT_TO, c.reference_flag("--train")],
)


def _train(ctx: Any, values: c.Values) -> None:
    """Centralised LoRA: train A/B and the head on the whole training set, evaluate, save a PEFT adapter."""
    config = values.config(TrainConfig)
    from fedlora_cli.centralised import run_train

    with c.reporter(log_every=values.extra["log_every"], report_to=values.extra["report_to"]) as progress:
        result = run_train(config, progress=progress, argv=c.argv())
    c.show_run_result("train", result)


train = OPTIONS.wrap(_train)
