"""Engine `local`: every client of every round in this process, one after another, on one base model."""

from __future__ import annotations

from fedlora_cli.config import RoundsConfig
from fedlora_cli.federation.client import train_client
from fedlora_cli.federation.driver import RoundDriver, RoundsResult
from fedlora_cli.federation.lifecycle import run_federated
from fedlora_cli.progress import Progress


def run_local(
    config: RoundsConfig, *, progress: Progress | None = None, argv: list[str] | None = None
) -> RoundsResult:
    """Multi-round federated LoRA over the shards, every client in this process, one after another."""
    return run_federated(config, local_rounds, progress=progress, argv=argv)


def local_rounds(driver: RoundDriver) -> None:
    """The rounds left, each client trained here in turn on the run's one model."""
    s = driver.s
    index = s.train_indices  # each client's shard, less its local test split (--client-test-fraction)
    for round_no in driver.rounds_left:
        plan = driver.plan_round(round_no)
        reports = [
            train_client(
                s.model,
                s.data,
                index[cid],
                plan.plans[cid],
                s.config.train,
                round_no=round_no,
                rounds=s.config.rounds,
                run_seed=s.config.train.seed,
                device=s.device,
                precision=s.precision,
                task=s.task if s.config.eval_clients else None,
                eval_batch_size=s.config.eval_batch_size,
                progress=driver.progress,
                personal=driver.personal_state(plan.plans[cid]),
            )
            for cid in plan.selected
        ]
        driver.close_round(plan, reports, [])
