"""`fedlora rounds --engine flower`: the ServerApp and ClientApp on Flower's simulation runtime, run the way
Flower 1.42 documents it — `flwr run` against a SuperLink in simulation mode.

Flower 1.42 deprecates `flwr.simulation.run_simulation` ("Please use `flwr run` in the CLI instead");
`flwr run` with a local connection starts `flower-superlink --simulation`, whose SuperExec runs the app
in a `flwr-simulation` process: the ServerApp in a thread, each ClientApp call in a Ray actor. fedlora
does the same with a SuperLink of its own — on a free loopback port, with its own FLWR_HOME in a
temporary folder, started for this run and stopped with it (Flower's managed local SuperLink would stay
in the background after the run):

- the app: a FAB of one pyproject.toml that names fedlora's ServerApp and ClientApp; fedlora and its
  dependencies come from this environment (`--disable-runtime-dependency-installation`: nothing is
  installed at run time) and telemetry is off;
- the federation (`flwr run --federation-config`): one virtual SuperNode per shard (node i serves the
  i-th client of --shards), each ClientApp call with --client-cpus CPUs and a --client-gpus share;
- the run's settings, the progress display, Ctrl-C / SIGTERM and the result: over the relay (relay.py)
  between this process and the ServerApp, so the run tree, the bar and the summary are engine local's;
- on loopback only: the SuperLink listens on 127.0.0.1, and Ray is told this machine's address is 127.0.0.1
  (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0: Ray's own single-machine mode, its default on Windows and macOS), so
  its GCS server, raylet, object manager, runtime-env agent and workers bind 127.0.0.1 instead of every
  interface; Ray's dashboard stays off (Flower's default). Nothing of a simulation is reachable from another
  machine; any local user can still reach those ports, as with any local service;
- paths: the engines give it a config whose paths are absolute (engines.absolute_paths), and the cache
  folders named by the environment (FEDLORA_CACHE, HF_HOME …) are made absolute here, since every process
  below runs in the temporary folder;
- quiet: the SuperLink's, Flower's and Ray's output go to a log file in the temporary folder; a
  failure comes back as one line;
- clean: every process below the SuperLink (SuperExec, flwr-simulation, Ray) is stopped when the run
  ends, however it ends, and Ray's session folder (RAY_TMPDIR) is inside the temporary folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

from fedlora_cli.config import RoundsConfig
from fedlora_cli.errors import FedloraError, InputError
from fedlora_cli.flower import require_flower
from fedlora_cli.progress import NullProgress, Progress

SERVER_APP = "fedlora_cli.flower.server_app:app"
CLIENT_APP = "fedlora_cli.flower.client_app:app"
CONNECTION = "fedlora-simulation"  # the SuperLink connection's name in the run's own Flower config
START_SECONDS = 60.0  # for the SuperLink to listen, and for `flwr run` to submit
POLL_SECONDS = 0.25
# Ray (2.x) takes this machine's address to be 127.0.0.1 when this is 0 — its single-machine mode — so every
# server it starts (GCS, raylet, workers, agents) binds 127.0.0.1; otherwise they listen on every interface.
RAY_LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# folders the processes below find through the environment: relative ones would resolve in the temporary
# folder
CACHE_VARIABLES = (
    "FEDLORA_CACHE",
    "XDG_CACHE_HOME",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_DATASETS_CACHE",
    "TRANSFORMERS_CACHE",
)


def run_flower_simulation(
    config: RoundsConfig,
    *,
    progress: Progress | None = None,
    argv: list[str] | None = None,
    client_app: str | None = None,
) -> Any:
    """Run `fedlora rounds` on Flower's simulation runtime; returns the same `federation.RoundsResult`.

    `client_app`: the ClientApp the virtual SuperNodes run, as Flower names app components
    (`"module:attribute"`, importable from this process's sys.path); default fedlora's. Tests pass one that
    misbehaves, to see the server cope with untrusted clients.
    """
    _telemetry_off()
    require_flower()  # before anything imports flwr: a missing extra is one line, exit 2
    from fedlora_cli.flower import codec, relay
    from fedlora_cli.options import absolute_paths

    # the user's paths, before anything runs in the temporary folder (run_rounds did it; a library call may
    # not)
    config = absolute_paths(config)

    progress = progress or NullProgress()
    _check_resources(config)
    abort = threading.Event()
    with (
        tempfile.TemporaryDirectory(prefix="fedlora-flower-") as tmp,
        relay.Relay(codec.to_run_config(config), argv, progress) as link,
        _SuperLink(Path(tmp), link.address) as superlink,
        _ctrl_c_sets(abort),
    ):
        try:
            superlink.launch()  # it starts while this process loads the core (torch …) for the checks
            from fedlora_cli.federation import check_run_folder, client_count

            check_run_folder(config)  # a run in use, or a --resume of no run, fails before the simulation
            nodes = client_count(config)
            app = write_app(Path(tmp) / "app", client_app or CLIENT_APP)
            superlink.wait_until_listening()
            if not abort.is_set():
                superlink.submit(
                    app, federation_config(nodes, config.client_cpus, config.client_gpus, _cpu_count())
                )
                _follow(link, superlink, abort)
        except KeyboardInterrupt:  # a second Ctrl-C: stop everything now (the `with` does)
            abort.set()
        if abort.is_set() and (link.outcome is None or "error" in link.outcome):
            raise _interrupted(link.run_dir) from None
        if link.outcome is None:
            raise FedloraError(f"the Flower simulation failed: {superlink.failure()}")
        if "error" in link.outcome:
            raise relay.error_from_json(link.outcome["error"])
        result = relay.result_from_json(link.outcome["result"])
    return result


def _follow(link: Any, superlink: _SuperLink, abort: threading.Event) -> None:
    """Feed the ServerApp's progress to the display until the run has an outcome or stops."""
    asked_to_stop = False
    submitted = time.monotonic()
    while link.outcome is None:
        if abort.is_set() and not asked_to_stop:
            asked_to_stop = link.stop()
            if not asked_to_stop:  # no ServerApp yet: nothing has started that needs an orderly stop
                return
        link.pump(POLL_SECONDS)
        if link.lost or (not link.connected and superlink.simulation_ended()):
            return
        superlink.check_alive()
        if not link.connected and not superlink.simulations and time.monotonic() - submitted > START_SECONDS:
            raise FedloraError(
                f"Flower's SuperExec did not start the simulation within {START_SECONDS:g} s: "
                f"{superlink.last_log_line() or 'no error logged'}"
            )


def _interrupted(run_dir: Path | None) -> Exception:
    from fedlora_cli.errors import Interrupted
    from fedlora_cli.runs import RoundTree, interrupted_rounds_message

    if run_dir is None:
        return Interrupted("interrupted before the first round started")
    return Interrupted(interrupted_rounds_message(run_dir, RoundTree(run_dir).last_complete_round()))


# ---------------------------------------------------------------------------------------------------
# the app and the federation, as Flower takes them


def write_app(folder: Path, client_app: str) -> Path:
    """A Flower app folder: one pyproject.toml naming fedlora's ServerApp and `client_app`, with the run
    config declared as fedlora's pyproject.toml declares it. No code: fedlora comes from this environment."""
    from fedlora_cli import __version__
    from fedlora_cli.flower import codec

    lines = [
        "[build-system]",
        'requires = ["setuptools>=68"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        'name = "fedlora"',
        f"version = {codec.toml_value(__version__)}",
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "fedlora"',
        "",
        "[tool.flwr.app.components]",
        f"serverapp = {codec.toml_value(SERVER_APP)}",
        f"clientapp = {codec.toml_value(client_app)}",
        "",
        "[tool.flwr.app.config]",
        *(f"{key} = {codec.toml_value(value)}" for key, value in codec.default_run_config().items()),
    ]
    folder.mkdir(parents=True)
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n")
    return folder


def federation_config(nodes: int, client_cpus: float, client_gpus: float, cpus: int) -> dict[str, Any]:
    """`flwr run --federation-config` for `nodes` virtual SuperNodes.

    Flower 1.42's simulation config takes whole CPUs per client (`client-resources-num-cpus` is an integer
    field). Ray's CPUs are a scheduling count, so a fractional --client-cpus keeps its meaning by giving Ray
    k times the machine's CPUs and each client k x --client-cpus of them (0.5 on 2 CPUs: 1 of 4, so four
    clients at once, as before).
    """
    scale = Fraction(client_cpus).limit_denominator(1000).denominator
    out: dict[str, Any] = {
        "num-supernodes": nodes,
        "client-resources-num-cpus": max(1, round(client_cpus * scale)),
        "client-resources-num-gpus": float(client_gpus),
        "init-args-logging-level": "ERROR",
        "init-args-log-to-driver": False,
    }
    if scale != 1:
        out["init-args-num-cpus"] = cpus * scale
    return out


def _config_args(values: dict[str, Any]) -> str:
    from fedlora_cli.flower import codec

    return " ".join(f"{k}={codec.toml_value(v)}" for k, v in values.items())


# ---------------------------------------------------------------------------------------------------
# the SuperLink and everything below it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tool(name: str) -> str:
    """Flower's console scripts of this environment (the SuperLink starts `flower-superexec` from PATH)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


class _SuperLink:
    """A SuperLink in simulation mode, for one run: started, watched, and stopped with every process below
    it."""

    def __init__(self, work: Path, relay_address: str) -> None:
        from fedlora_cli.flower import relay

        self.work = work
        self.port = _free_port()
        self.log = work / "superlink.log"
        self.proc: subprocess.Popen | None = None
        self.run_id: str | None = None
        self.seen: dict[int, Any] = {}  # pid -> psutil.Process of everything below the SuperLink
        self.simulations: dict[int, Any] = {}  # the flwr-simulation processes among them
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._watch = threading.Thread(
            target=self._track_forever, name="fedlora-superlink-watch", daemon=True
        )
        flwr_home = (
            work / "flwr-home"
        )  # Flower's config and installed apps; HOME stays the user's (model caches)
        flwr_home.mkdir()
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        # The SuperExec, flwr-simulation and Ray's workers inherit this: they import what this process can
        # (fedlora, a test's ClientApp), stay quiet, and find the relay.
        paths = [p for p in sys.path if p] + (
            [os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []
        )
        self.env = {
            **os.environ,
            **{
                name: os.path.abspath(os.path.expanduser(os.environ[name]))
                for name in CACHE_VARIABLES
                if os.environ.get(name)
            },
            **RAY_LOOPBACK,
            # Ray's session folder (sockets, logs, spilled objects) inside the run's temporary folder, removed
            # with it: by default every simulation left a session_* folder in /tmp/ray for good
            "RAY_TMPDIR": str(self.work / "ray"),
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",  # the SuperExec starts flwr-simulation sooner
            "PYTHONPATH": os.pathsep.join(paths),
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            relay.ENV: relay_address,
        }

    # -- start ------------------------------------------------------------------------------------

    def launch(self) -> None:
        command = [
            _tool("flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        with open(self.log, "ab") as log:
            # a session of its own: Ctrl-C in the terminal reaches this process only, which stops the run in
            # order
            self.proc = subprocess.Popen(
                command,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.work,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                **_die_with_parent(),
            )
        self._watch.start()

    def wait_until_listening(self) -> None:
        deadline = time.monotonic() + START_SECONDS
        while not self._listening():
            self.check_alive()
            if time.monotonic() > deadline:
                raise FedloraError(
                    f"Flower's SuperLink did not start within {START_SECONDS:g} s: "
                    f"{self.last_log_line() or 'no output'}"
                )
            time.sleep(0.1)

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def submit(self, app: Path, federation: dict[str, Any]) -> None:
        """`flwr run APP CONNECTION --federation-config …`; keeps the run id."""
        command = [
            _tool("flwr"),
            "run",
            str(app),
            CONNECTION,
            "--federation-config",
            _config_args(federation),
            "--format",
            "json",
        ]
        try:
            done = subprocess.run(
                command,
                env=self.env,
                cwd=self.work,
                capture_output=True,
                text=True,
                stdin=subprocess.DEVNULL,
                timeout=START_SECONDS,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired:
            raise FedloraError(
                f"`flwr run` did not submit the simulation within {START_SECONDS:g} s"
            ) from None
        answer: dict[str, Any] = {}
        with contextlib.suppress(ValueError):
            answer = json.loads(done.stdout[done.stdout.find("{") :]) if "{" in done.stdout else {}
        if done.returncode != 0 or not answer.get("success"):
            reason = (
                _reason(answer.get("error-message")) or _last_line(done.stderr) or _last_line(done.stdout)
            )
            raise FedloraError(
                f"`flwr run` could not start the simulation: {reason or f'exit {done.returncode}'}"
            )
        self.run_id = str(answer.get("run-id"))

    # -- watch ------------------------------------------------------------------------------------

    def _track_forever(self) -> None:
        while not self._stop.wait(0.2):
            self._track()

    def _track(self) -> None:
        import psutil  # a dependency of peft and of Ray, so always there

        if self.proc is None:
            return
        with self._lock, contextlib.suppress(psutil.Error):
            for proc in psutil.Process(self.proc.pid).children(recursive=True):
                if proc.pid not in self.seen:
                    self.seen[proc.pid] = proc
                    if _is_simulation(proc):
                        self.simulations[proc.pid] = proc

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise FedloraError(
                f"Flower's SuperLink exited (code {self.proc.returncode}): "
                f"{self.last_log_line() or 'no output'}"
            )

    def simulation_ended(self) -> bool:
        """A flwr-simulation process ran and has exited (its parent, the SuperExec, leaves it a zombie)."""
        import psutil

        def running(proc: Any) -> bool:
            try:
                return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                return False

        self._track()
        started = list(self.simulations.values())
        return bool(started) and not any(running(p) for p in started)

    def failure(self) -> str:
        """Why the simulation ended without a result, as the SuperLink recorded it."""
        if self.run_id is None:
            return "it was not started"
        with contextlib.suppress(Exception):
            done = subprocess.run(
                [_tool("flwr"), "ls", CONNECTION, "--run-id", self.run_id, "--format", "json"],
                env=self.env,
                cwd=self.work,
                capture_output=True,
                text=True,
                timeout=30,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            run = json.loads(done.stdout[done.stdout.find("{") :])["runs"][0]
            details = str(run.get("status-details") or "").strip()
            if details and details != "N/A":
                return _reason(details.removeprefix("Simulation failed with exception:")) or details
            return f"the run ended as {run.get('status')} without a result"
        return self.last_log_line() or "no error was recorded"

    def last_log_line(self) -> str | None:
        with contextlib.suppress(OSError):
            lines = [line for line in self.log.read_text(errors="replace").splitlines() if "ERROR" in line]
            return _one_line(lines[-1]) if lines else None
        return None

    # -- stop -------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the SuperLink and every process below it at once (SuperExec, flwr-simulation, Ray)."""
        import psutil

        if self.proc is None:
            return
        self._stop.set()
        if self._watch.is_alive():
            self._watch.join()
        self._track()
        processes = list(self.seen.values())
        if self.proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                processes.insert(0, psutil.Process(self.proc.pid))
        _stop(processes)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> _SuperLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_simulation(proc: Any) -> bool:
    try:
        return any("flwr-simulation" in part for part in proc.cmdline()[:3])
    except Exception:
        return False


def _die_with_parent() -> dict[str, Any]:
    """On Linux the SuperLink gets SIGTERM when this process dies, even by SIGKILL (its SuperExec, its
    flwr-simulation and Ray follow their parents out). Elsewhere an orphaned SuperLink outlives a SIGKILL."""
    if not sys.platform.startswith("linux"):
        return {}
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return {}
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)

    def set_death_signal() -> None:  # runs in the child between fork and exec: no imports, no allocation
        prctl(pr_set_pdeathsig, sigterm)

    return {"preexec_fn": set_death_signal}


def _stop(processes: Iterable[Any], grace: float = 3.0) -> None:
    """Terminate the processes still running (psutil checks a pid was not reused), then kill the stubborn."""
    import psutil

    alive = []
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            if proc.is_running():
                alive.append(proc)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, stubborn = psutil.wait_procs(alive, timeout=grace)
    for proc in stubborn:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(stubborn, timeout=grace)


def _reason(text: str | None) -> str | None:
    """Flower's multi-line messages in one line: its bullet points ("- Unable to load module x"), or the first
    line."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    bullets = [line[2:] for line in lines if line.startswith("- ")]
    return _one_line("; ".join(bullets) if bullets else lines[0]) if lines else None


def _last_line(text: str | None) -> str | None:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return _one_line(lines[-1]) if lines else None


def _one_line(text: str) -> str:
    text = text.strip().splitlines()[0] if text.strip() else ""
    return text if len(text) <= 300 else text[:297] + "..."


# ---------------------------------------------------------------------------------------------------
# this process


def _telemetry_off() -> None:
    """Flower reads FLWR_TELEMETRY_ENABLED once, when flwr is first imported (the SuperLink inherits it)."""
    os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
    telemetry = sys.modules.get("flwr.supercore.telemetry")
    if telemetry is not None:  # flwr was imported before this call (library use)
        telemetry.FLWR_TELEMETRY_ENABLED = "0"


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _check_resources(config: RoundsConfig) -> None:
    """Ray cannot place a virtual client that asks for more than the machine has: say so before it hangs."""
    cpus = _cpu_count()
    if config.client_cpus > cpus:
        raise InputError(
            f"--client-cpus {config.client_cpus:g}: this machine has {cpus} CPUs, so no virtual "
            f"client would fit; use --client-cpus {cpus} or less"
        )
    if config.client_gpus > 0:
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise InputError(
                f"--client-gpus {config.client_gpus:g}: this machine has no GPU; use --client-gpus 0"
            )
        if config.client_gpus > gpus:
            raise InputError(
                f"--client-gpus {config.client_gpus:g}: this machine has {gpus} GPU(s); give each "
                f"virtual client at most {gpus} (0.5 = two clients per GPU)"
            )


@contextlib.contextmanager
def _ctrl_c_sets(abort: threading.Event) -> Iterator[None]:
    """Ctrl-C or SIGTERM asks the ServerApp to stop at its next wait, so the round in progress ends in order
    and the run stays resumable; a second Ctrl-C stops everything at once. SIGTERM only in the `fedlora`
    command's own process (termination.enable): in library use it stays the host's."""
    from fedlora_cli import termination

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = (signal.SIGINT, signal.SIGTERM) if termination.enabled() else (signal.SIGINT,)

    def handler(signum: int, frame: Any) -> None:
        if signum == signal.SIGTERM:
            termination.note()  # the CLI exits with 143
        elif abort.is_set():
            raise KeyboardInterrupt
        abort.set()

    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
