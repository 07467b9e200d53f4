"""`fedlora baseline`: full fine-tuning, or zero-shot evaluation with --no-train."""

from __future__ import annotations

from typing import Any

from fedlora_cli.commands import _common as c
from fedlora_cli.config import TRAIN_SCHEDULES, BaselineConfig

OPTIONS = c.Command(
    BaselineConfig,
    rename={"train.lr_schedule": c.Rename(choices=TRAIN_SCHEDULES)},
    required={"data.task"},
    extras=[c.MODEL_SIZE, c.LOG_EVERY, c.REPORT_TO, c.reference_flag("--eval")],
)


def _baseline(ctx: Any, values: c.Values) -> None:
    """Full fine-tuning of every weight (the upper reference), or `--no-train` zero-shot evaluation."""
    config = values.config(BaselineConfig)
    from fedlora_cli.centralised import run_baseline

    with c.reporter(log_every=values.extra["log_every"], report_to=values.extra["report_to"]) as progress:
        result = run_baseline(config, progress=progress, argv=c.argv())
    c.show_run_result("baseline", result)


baseline = OPTIONS.wrap(_baseline)
