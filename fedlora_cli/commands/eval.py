"""`fedlora eval`: an adapter, or the plain model, on the task's dev split(s)."""

from __future__ import annotations

from typing import Any

from fedlora_cli.commands import _common as c
from fedlora_cli.config import EvalConfig

OPTIONS = c.Command(
    EvalConfig, required={"data.task"}, skip={"data.max_train_samples"}, extras=[c.MODEL_SIZE]
)


def _eval(ctx: Any, values: c.Values) -> None:
    """Evaluate an adapter (LoRA and its head) on the dev split(s) and print the GLUE metrics.

    Without --model (or --model-size), the base model recorded in the adapter is used.
    """
    fixed = {}
    adapter = values.get("adapter")
    if values.get("model.name") is None and adapter:
        from fedlora_cli.modeling import adapter_base_model

        fixed["model.name"] = adapter_base_model(adapter)
    config = values.config(EvalConfig, **fixed)
    from fedlora_cli.centralised import run_eval

    with c.reporter(transient=True) as progress:
        result = run_eval(config, progress=progress, argv=c.argv())
    c.show_run_result("eval", result)
    if config.output_json:
        c.print_path("metrics", config.output_json)
    if config.predictions:
        c.print_path("predictions", config.predictions)


eval_command = OPTIONS.wrap(_eval)
