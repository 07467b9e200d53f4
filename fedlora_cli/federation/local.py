"""Engine `local`: every client of every round in this process, on one base model: one after another, or
`--clients-at-once K` of them together (`stacked.py`)."""

from __future__ import annotations

from fedlora_cli.config import RoundsConfig
from fedlora_cli.federation.client import train_client
from fedlora_cli.federation.driver import RoundDriver, RoundsResult
from fedlora_cli.federation.lifecycle import run_federated
from fedlora_cli.federation.stacked import check_memory, estimate_memory, groups, train_clients_at_once
from fedlora_cli.progress import Progress


def run_local(
    config: RoundsConfig, *, progress: Progress | None = None, argv: list[str] | None = None
) -> RoundsResult:
    """Multi-round federated LoRA over the shards, every client in this process."""
    return run_federated(config, local_rounds, progress=progress, argv=argv)


def local_rounds(driver: RoundDriver) -> None:
    """The rounds left, each client trained here on the run's one model (K at once with --clients-at-once)."""
    s = driver.s
    config = s.config
    index = s.train_indices  # each client's shard, less its local test split (--client-test-fraction)
    at_once = min(config.clients_at_once, driver.per_round)
    if at_once > 1 and driver.rounds_to_run:
        estimate = estimate_memory(s.model, s.data, config.train, at_once, s.device, s.precision)
        driver.progress.log(estimate.describe(at_once))
        check_memory(estimate, at_once)
    common = dict(
        round_no=0,
        run_seed=config.train.seed,
        device=s.device,
        precision=s.precision,
        task=s.task if config.eval_clients else None,
        eval_batch_size=config.eval_batch_size,
        progress=driver.progress,
        rounds=config.rounds,
    )
    for round_no in driver.rounds_left:
        plan = driver.plan_round(round_no)
        common["round_no"] = round_no
        if at_once > 1:
            members = [(index[cid], plan.plans[cid]) for cid in plan.selected]
            reports = [
                report
                for group in groups(members, config.train, at_once)
                for report in train_clients_at_once(s.model, s.data, group, config.train, **common)
            ]
        else:
            reports = [
                train_client(
                    s.model,
                    s.data,
                    index[cid],
                    plan.plans[cid],
                    config.train,
                    personal=driver.personal_state(plan.plans[cid]),
                    **common,
                )
                for cid in plan.selected
            ]
        driver.close_round(plan, reports, [])
