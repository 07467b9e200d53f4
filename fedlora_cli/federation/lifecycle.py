"""One federated run from start to end, for every engine: prepare -> session -> driver -> the engine's rounds
-> final/ -> release the run folder.

An engine brings only its round loop: a function that runs the rounds `driver.rounds_left` names, each
planned and closed by the driver (engine local trains the clients in this process, `local.py`; the Flower
ServerApp hands the loop to Flower's `Strategy.start`). Everything around it is here, written once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from fedlora_cli.config import RoundsConfig
from fedlora_cli.errors import Interrupted
from fedlora_cli.federation.driver import RoundDriver, RoundsResult
from fedlora_cli.federation.setup import prepare
from fedlora_cli.progress import NullProgress, Progress
from fedlora_cli.runs import interrupted_rounds_message, run_session

RoundLoop = Callable[[RoundDriver], None]  # runs `driver.rounds_left`: plan, train (the engine's part), close


def run_federated(
    config: RoundsConfig,
    round_loop: RoundLoop,
    *,
    progress: Progress | None = None,
    argv: list[str] | None = None,
    resume_hint: Callable[[Path], str] | None = None,
    on_prepared: Callable[[Path], None] | None = None,
) -> RoundsResult:
    """Run `fedlora rounds` with `round_loop` carrying the rounds; returns what the run produced.

    `prepare` claims the run folder (its lock is held until the end, however the run ends); run.json says
    running until the session ends (complete, failed or interrupted); Ctrl-C becomes `Interrupted`, whose
    message says how many rounds are complete and how to --resume. `on_prepared(run_dir)` is called once
    the run folder is known (the Flower simulation tells its command).
    """
    progress = progress or NullProgress()
    setup = prepare(config, progress=progress, argv=argv, resume_hint=resume_hint)
    try:
        if on_prepared is not None:
            on_prepared(setup.run_dir)
        with run_session(setup.run_dir):
            driver = RoundDriver(setup, progress)
            progress.start("rounds", "rounds", total=setup.config.rounds)  # fewer than asked when DP ends it
            progress.advance("rounds", setup.start_round)
            round_loop(driver)
            progress.stop("rounds")
            return driver.finish()
    except KeyboardInterrupt:
        done = setup.recorder.tree.last_complete_round()
        raise Interrupted(interrupted_rounds_message(setup.run_dir, done)) from None
    finally:
        setup.recorder.close()  # the run folder's lock
