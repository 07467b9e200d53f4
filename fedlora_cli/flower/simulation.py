"""`fedlora rounds --engine flower`: the ServerApp and ClientApp on Flower's simulation engine (Ray).

One virtual SuperNode per shard (node i serves the i-th client of --shards), each ClientApp call in a
Ray actor with --client-cpus / --client-gpus. Everything runs in the current environment: nothing is
installed at run time and telemetry is off. Flower's and Ray's log output is kept off the terminal;
a failure comes back as one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

from fedlora_cli.config import RoundsConfig
from fedlora_cli.errors import FedloraError, InputError
from fedlora_cli.flower import require_flower
from fedlora_cli.progress import NullProgress, Progress


def run_flower_simulation(
    config: RoundsConfig,
    *,
    progress: Progress | None = None,
    argv: list[str] | None = None,
    client_app: Any = None,
) -> Any:
    """Run `fedlora rounds` on Flower's simulation engine; returns the same `federation.RoundsResult`.

    `client_app`: the ClientApp the virtual SuperNodes run (default: fedlora's); tests pass one that
    misbehaves, to see the server cope with untrusted clients.
    """
    _telemetry_off()
    require_flower()  # before anything imports flwr: a missing extra is one line, exit 2
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedlora_cli.errors import Interrupted
    from fedlora_cli.federation import check_run_folder, cli_resume_hint, client_count
    from fedlora_cli.flower import client_app as fedlora_client
    from fedlora_cli.flower.server_app import run_server
    from fedlora_cli.runs import RoundTree, interrupted_rounds_message

    progress = progress or NullProgress()
    _check_resources(config)
    check_run_folder(config)  # a run in use, or a --resume of no run, fails before Ray starts
    num_nodes = client_count(config)
    abort = threading.Event()
    outcome: dict[str, Any] = {}

    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        outcome["thread"] = threading.current_thread()
        outcome["result"] = run_server(
            grid, config, progress=progress, argv=argv, resume_hint=cli_resume_hint, abort=abort,
            on_prepared=lambda run_dir: outcome.__setitem__("run_dir", run_dir),
        )  # fmt: skip

    backend = {
        "client_resources": {"num_cpus": config.client_cpus, "num_gpus": config.client_gpus},
        "init_args": {"logging_level": "ERROR", "log_to_driver": False, "include_dashboard": False},
    }

    def interrupted() -> Interrupted:
        run_dir = outcome.get("run_dir")
        if run_dir is None:
            return Interrupted("interrupted before the first round started")
        return Interrupted(interrupted_rounds_message(run_dir, RoundTree(run_dir).last_complete_round()))

    with _quiet_flower() as flower_errors, _ray_session(backend["init_args"]), _ctrl_c_sets(abort):
        try:
            run_simulation(server_app=server, client_app=client_app or fedlora_client.app, num_supernodes=num_nodes,
                           backend_config=backend)  # fmt: skip
        except KeyboardInterrupt:  # a second Ctrl-C, or one outside the main thread's handler
            abort.set()
            thread = outcome.get("thread")
            if thread is not None:
                thread.join(timeout=60)
            raise interrupted() from None
        except FedloraError:
            if abort.is_set():
                raise interrupted() from None
            raise
        except Exception as e:  # Flower wraps what went wrong (twice): say what the innermost error says
            root = e
            while root.__cause__ is not None:
                root = root.__cause__
            text = str(root).strip().splitlines()[0] if str(root).strip() else ""
            reason = (
                f"{type(root).__name__}: {text}" if text else (flower_errors.last() or type(root).__name__)
            )
            raise FedloraError(f"the Flower simulation failed: {reason}") from e
    if "result" not in outcome:
        raise FedloraError(
            f"the Flower simulation ended without a result: {flower_errors.last() or 'no error logged'}"
        )
    return outcome["result"]


def _telemetry_off() -> None:
    """Flower reads FLWR_TELEMETRY_ENABLED once, when flwr is first imported (Ray's workers inherit it)."""
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    telemetry = sys.modules.get("flwr.supercore.telemetry")
    if telemetry is not None:  # flwr was imported before this call (library use)
        telemetry.FLWR_TELEMETRY_ENABLED = "0"


def _check_resources(config: RoundsConfig) -> None:
    """Ray cannot place a virtual client that asks for more than the machine has: say so before it hangs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if config.client_cpus > cpus:
        raise InputError(f"--client-cpus {config.client_cpus:g}: this machine has {cpus} CPUs, so no virtual "
                         f"client would fit; use --client-cpus {cpus} or less")  # fmt: skip
    if config.client_gpus > 0:
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise InputError(
                f"--client-gpus {config.client_gpus:g}: this machine has no GPU; use --client-gpus 0"
            )
        if config.client_gpus > gpus:
            raise InputError(f"--client-gpus {config.client_gpus:g}: this machine has {gpus} GPU(s); give each "
                             f"virtual client at most {gpus} (0.5 = two clients per GPU)")  # fmt: skip


@contextlib.contextmanager
def _ray_session(init_args: dict[str, Any]) -> Iterator[None]:
    """Start Ray as Flower's RayBackend would (Flower then uses it), and stop all of it whatever happens.

    Started here rather than inside Flower for two reasons. `ray.init` takes SIGTERM over: first a Python
    handler that exits on the spot, then a native one that aborts the process (no clean-up, no message,
    exit -6); here SIGTERM during the start becomes the CLI's Terminated, and the CLI's handler is put
    back after it (`_ctrl_c_sets`, entered next, then turns SIGTERM into an orderly stop). And on every
    way out — success, a failure, Ctrl-C, SIGTERM, even half-way through ray.init — `ray.shutdown()`
    runs and every Ray process this run started (GCS, raylet, agents, workers) is stopped.
    """
    import ray

    from fedlora_cli import termination

    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    started: dict[int, Any] = {}
    try:
        if not ray.is_initialized():
            # As flwr's RayBackend.init_ray: the workers import what this process can (fedlora, tests' apps).
            pythonpath = os.pathsep.join(sys.path)
            if os.environ.get("PYTHONPATH"):
                pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
            os.environ["PYTHONPATH"] = pythonpath
            try:
                ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)
            except SystemExit as e:  # ray.init's own SIGTERM handler, until it is done, exits on the spot
                if e.code != signal.SIGTERM:
                    raise
                termination.note()
                raise termination.Terminated from None
            finally:
                if main:  # Ray's native SIGTERM handler out, ours (the CLI's) back in
                    signal.signal(signal.SIGTERM, before if before is not None else signal.SIG_DFL)
        started.update(_ray_processes())
        yield
    finally:
        started.update(_ray_processes())
        ray.shutdown()
        # Ray's agents that were still starting when their raylet stopped outlive it for up to a minute
        # (they notice late); they are this run's, so they go now.
        _stop(started.values())


def _ray_processes() -> dict[int, Any]:
    """This process's descendants that are Ray's (GCS, raylet, agents, workers), by pid."""
    import psutil  # a dependency of peft, so always there

    found: dict[int, Any] = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            name, command = proc.name(), " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if name.startswith("ray::") or name in ("raylet", "gcs_server") or f"{os.sep}ray{os.sep}" in command:
            found[proc.pid] = proc
    return found


def _stop(processes: Iterable[Any], grace: float = 3.0) -> None:
    """Terminate the processes still running (psutil checks a pid was not reused), then kill the stubborn."""
    import psutil

    alive = [p for p in processes if p.is_running()]
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, stubborn = psutil.wait_procs(alive, timeout=grace)
    for proc in stubborn:
        with contextlib.suppress(psutil.Error):
            proc.kill()


@contextlib.contextmanager
def _ctrl_c_sets(abort: threading.Event) -> Iterator[None]:
    """Ctrl-C or SIGTERM asks the ServerApp to stop at its next wait, so Flower and Ray shut down in order
    (a KeyboardInterrupt inside Flower's engine can leave a thread waiting on Ray forever); a second
    Ctrl-C interrupts at once."""
    from fedlora_cli import termination

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if signum == signal.SIGTERM:
            termination.note()  # the CLI exits with 143
        elif abort.is_set():
            raise KeyboardInterrupt
        abort.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _ErrorLog(logging.Handler):
    """Keeps Flower's error records (first line each) instead of printing them."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage().strip()
        if text and not text.startswith("Traceback"):
            self.lines.append(text.splitlines()[0][:300])

    def last(self) -> str | None:
        return self.lines[-1] if self.lines else None


@contextlib.contextmanager
def _quiet_flower() -> Iterator[_ErrorLog]:
    """Flower logs every step at INFO and deprecation notices at WARNING: keep them off the terminal."""
    logger = logging.getLogger("flwr")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    errors = _ErrorLog()
    logger.handlers = [errors]
    logger.propagate = False
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # Ray's notice that it will stop hiding GPUs from num_gpus=0 actors: not the user's business.
            warnings.filterwarnings(
                "ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*", category=FutureWarning
            )
            yield errors
    finally:
        logger.setLevel(saved[0])
        logger.handlers = saved[1]
        logger.propagate = saved[2]
