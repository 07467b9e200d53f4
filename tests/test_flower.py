"""`fedlora rounds` on Flower: the same rounds as engine local, in simulation and on a loopback SuperLink."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

pytest.importorskip("flwr", reason="the `flower` extra is not installed")

from clitools import one_error_line, run  # noqa: E402
from test_rounds import write_manifests  # noqa: E402

from fedlora_cli.config import (  # noqa: E402
    AggregationSpec,
    DataSpec,
    LoraSpec,
    ModelSpec,
    OutputSpec,
    RoundsConfig,
    TrainSpec,
)
from fedlora_cli.flower import codec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--local-epochs", "1", "--learning-rate", "2e-2", "--precision", "fp32", "--max-eval-samples", "100"]
ADAPTER_FILES = [
    "adapter/adapter_config.json",
    "adapter/adapter_model.safetensors",
    "adapter/fedlora_adapter.json",
]


@contextlib.contextmanager
def one_thread():
    """Ray runs each virtual client with one CPU (OMP_NUM_THREADS=1): give engine local the same, so
    float reductions happen in the same order and the adapters agree to the last bit."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def files_of(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())


def expected_files(rounds: int, clients: list[int]) -> list[str]:
    out = ["history.jsonl", "run.json", "round_000/global/metrics.json",
           *(f"final/{f}" for f in [*ADAPTER_FILES, "metrics.json"])]  # fmt: skip
    for r in range(1, rounds + 1):
        for who in [*(f"client_{c:03d}" for c in clients), "global"]:
            out += [f"round_{r:03d}/{who}/{f}" for f in [*ADAPTER_FILES, "metrics.json"]]
    return sorted(out)


def history(run_dir: Path) -> list[dict]:
    """The rounds' rows (round 0, the starting adapter's evaluation, left out)."""
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return [r for r in rows if r["round"] > 0]


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-5) -> None:
    assert set(a) == set(b)
    for k in a:
        rel = ((a[k].double() - b[k].double()).norm() / a[k].double().norm().clamp_min(1e-12)).item()
        assert rel <= rtol, (k, rel)


class ProcessWatch:
    """Every process descending from `pid` (default: this one) while the block runs; `survivors()` says
    which are still running afterwards — orphans included, whoever their parent is by then."""

    def __init__(self, pid: int | None = None) -> None:
        import psutil

        self.root = psutil.Process(pid or os.getpid())
        self.seen: dict[int, psutil.Process] = {}
        self.names: dict[int, str] = {}  # as they were named while they ran
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import psutil

        while not self.stop.wait(0.1):
            with contextlib.suppress(psutil.Error):
                for proc in self.root.children(recursive=True):
                    if proc.pid not in self.seen:
                        with contextlib.suppress(psutil.Error):
                            self.names[proc.pid] = proc.name()
                        self.seen[proc.pid] = proc

    def __enter__(self) -> ProcessWatch:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def survivors(self, wait: float = 10.0) -> list[str]:
        import psutil

        def running(p) -> bool:
            try:
                return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                return False

        deadline = time.monotonic() + wait
        while (alive := [p for p in self.seen.values() if running(p)]) and time.monotonic() < deadline:
            time.sleep(0.2)
        return [f"{p.pid} {self.names.get(p.pid, '?')}" for p in alive if running(p)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    order = np.random.default_rng(0).permutation(600).tolist()
    return write_manifests(
        tmp_path_factory.mktemp("shards") / "k3", [order[:60], order[60:140], order[140:240]]
    )


def rounds_args(model, glue, shards, root, name, *extra):
    return ["rounds", "--task", "sst2", "--model", model, "--data-dir", glue, "--shards", shards,
            "--output-root", root, "--run-name", name, "--rounds", "2", *FAST, *extra]  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# codec and configuration


def test_run_config_round_trips_every_kind_of_field():
    config = RoundsConfig(
        data=DataSpec("SST-2", "/data/glue", 64, None, 100),
        shards="/s/k3",
        lora=LoraSpec(4, 8.0, 0.0, ("query", "key", "value")),
        rounds=3,
        eval_each_round=False,
        clients_per_round=2,
        min_clients=1,
        round_timeout=30.5,
        engine="flower",
    )
    flat = codec.to_run_config(config)
    assert flat["data.task"] == "sst2" and flat["data.max-train-samples"] == "" and flat["lora.alpha"] == 8.0
    assert flat["lora.target-modules"] == "query,key,value" and flat["round-timeout"] == 30.5
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
    assert codec.from_run_config(flat) == config
    # Flower's --run-config gives TOML types: ints for floats are fine, section defaults are RoundsConfig's
    partial = codec.from_run_config({"data.task": "rte", "lora.alpha": 32, "train.learning-rate": 0.001})
    assert partial.lora.alpha == 32.0 and partial.train.epochs == 1.0 and partial.train.learning_rate == 0.001
    with pytest.raises(ValueError, match="rounds must be a number"):
        codec.from_run_config({"data.task": "sst2", "rounds": "many"})
    with pytest.raises(ValueError, match="data.task"):
        codec.from_run_config({"rounds": 2})
    with pytest.warns(UserWarning, match="train.lr"):
        codec.from_run_config({"data.task": "sst2", "train.lr": 0.1})


VALID_REPORT = dict(
    codec.report_to_config(3, 60, 12345, LoraSpec(), {"loss": 0.5, "last_loss": 0.25, "steps": 3, "seconds": 1.5,
                           "samples_per_second": 40.0, "tokens_per_second": 900.0, "order": "ab12"}, {"accuracy": 0.75})
)  # fmt: skip


def test_adapter_state_lora_and_report_round_trip_exactly():
    state = {
        "a.lora_A.weight": torch.randn(4, 16),
        "a.lora_B.weight": torch.zeros(16, 4),
        "head.bias": torch.randn(2),
    }
    arrays = codec.state_to_arrays(state)
    back = codec.arrays_to_state(arrays)
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert len(arrays) == 1  # one object on Flower's wire, not one per tensor
    assert arrays.count_bytes() > sum(
        t.numel() * 4 for t in state.values()
    )  # payload + safetensors header + keys


def test_an_unreadable_adapter_is_a_value_error():
    """A client's arrays are untrusted: every way they can be wrong is the one error the server turns into a
    failed client."""
    from flwr.app import Array, ArrayRecord
    from safetensors.torch import save

    state = {"a.lora_A.weight": torch.randn(4, 16), "head.bias": torch.randn(2)}
    blob = bytes(codec.state_to_arrays(state)[codec.PACKED].data)

    def packed(data: bytes, stype: str = codec.PACKED_STYPE, key: str = codec.PACKED) -> ArrayRecord:
        return ArrayRecord({key: Array(dtype="uint8", shape=(len(data),), stype=stype, data=data)})

    lying_order = save(state, metadata={"order": json.dumps(["a.lora_A.weight", "other"])})
    no_order = save(state)
    for bad in [packed(blob[:-7]), packed(blob[:5]), packed(b"\xff" * 64), packed(blob, stype="numpy.ndarray"),
                packed(blob, key="other"), ArrayRecord.from_torch_state_dict(state), packed(lying_order),
                packed(no_order), packed(len(blob).to_bytes(8, "little") + blob[8:])]:  # fmt: skip
        with pytest.raises(ValueError, match="unreadable arrays"):
            codec.arrays_to_state(bad)
    spec = LoraSpec(8, 16.0, 0.1, ("query", "value"))
    assert codec.lora_from_config(codec.lora_to_config(spec)) == spec
    train = {"loss": 0.5, "last_loss": 0.25, "steps": 3, "seconds": 1.5, "samples_per_second": 40.0,
             "tokens_per_second": 900.0, "order": "ab12"}  # fmt: skip
    record = codec.report_to_config(3, 60, 2**32 - 1, spec, train, {"accuracy": 0.75})
    assert codec.report_from_config(record) == {"client_id": 3, "examples": 60, "seed": 2**32 - 1, "lora": spec,
                                                "train": train, "eval": {"accuracy": 0.75}}  # fmt: skip


HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1), st.floats(), st.text(max_size=300),
    st.binary(max_size=8), st.lists(st.integers(), max_size=3), st.lists(st.text(max_size=5), max_size=3),
    st.lists(st.floats(), max_size=3),
)  # fmt: skip


@settings(max_examples=400)
@given(st.dictionaries(st.sampled_from(sorted(VALID_REPORT)), HOSTILE, min_size=1, max_size=4),
       st.sets(st.sampled_from(sorted(VALID_REPORT)), max_size=2))  # fmt: skip
def test_a_hostile_report_is_a_value_error_never_anything_else(changed, dropped):
    """Whatever a client puts in its report (ConfigRecord types, any value), reading it either gives
    well-typed fields or raises the one error the server turns into a failed client."""
    record = {k: v for k, v in {**VALID_REPORT, **changed}.items() if k not in dropped}
    try:
        info = codec.report_from_config(record)
    except ValueError:
        return
    assert type(info["client_id"]) is int and type(info["examples"]) is int and type(info["seed"]) is int
    assert 0 <= info["examples"] < 2**63 and 0 <= info["seed"] < 2**32
    assert all(type(v) in (int, float) and v == v and abs(v) < float("inf") for k, v in info["train"].items()
               if k != "order") and isinstance(info["train"]["order"], str)  # fmt: skip
    assert isinstance(info["lora"], LoraSpec)
    json.dumps(info["train"])  # what is kept can be written to the run tree


def test_pyproject_declares_the_app_with_the_cli_defaults():
    import tomllib  # Python 3.11+, as Flower itself

    from flwr.clientapp import ClientApp
    from flwr.common.config import flatten_dict
    from flwr.serverapp import ServerApp
    from typer.main import get_command

    from fedlora_cli.app import app as cli
    from fedlora_cli.flower import client_app, server_app

    flwr_app = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert flwr_app["components"] == {"serverapp": "fedlora_cli.flower.server_app:app",
                                      "clientapp": "fedlora_cli.flower.client_app:app"}  # fmt: skip
    assert isinstance(server_app.app, ServerApp) and isinstance(client_app.app, ClientApp)
    declared, defaults = flatten_dict(flwr_app["config"]), codec.default_run_config()
    assert sorted(declared) == sorted(defaults)
    for key, value in defaults.items():
        assert declared[key] == value and type(declared[key]) is type(value), key
    # ... and they are the CLI's: each option's default, as the run config writes it
    options = {"--rounds": "rounds", "--local-epochs": "train.epochs", "--batch-size": "train.batch-size",
               "--learning-rate": "train.learning-rate", "--weight-decay": "train.weight-decay",
               "--warmup-ratio": "train.warmup-ratio", "--max-grad-norm": "train.max-grad-norm",
               "--precision": "train.precision", "--seed": "train.seed", "--lora-r": "lora.r",
               "--lora-alpha": "lora.alpha", "--lora-dropout": "lora.dropout", "--aggregation": "aggregation.method",
               "--svd-rank": "aggregation.svd.rank", "--alpha": "aggregation.svd.alpha", "--max-seq-length": "data.max-seq-length",
               "--max-eval-samples": "data.max-eval-samples", "--data-dir": "data.data-dir", "--device": "model.device",
               "--eval-each-round": "eval-each-round", "--eval-clients": "eval-clients",
               "--eval-batch-size": "eval-batch-size", "--clients-per-round": "clients-per-round",
               "--fraction-fit": "fraction-fit", "--init-adapter": "init-adapter", "--output-root": "output.root",
               "--run-name": "output.run-name", "--output-dir": "output.output-dir", "--engine": "engine",
               "--min-clients": "min-clients", "--client-cpus": "client-cpus", "--client-gpus": "client-gpus",
               "--round-timeout": "round-timeout", "--overwrite": "output.overwrite",
               "--client-ranks": "aggregation.client-ranks", "--prox-mu": "aggregation.prox-mu",
               "--dp-clip": "privacy.clip", "--dp-noise-multiplier": "privacy.noise-multiplier",
               "--dp-delta": "privacy.delta", "--dp-where": "privacy.where",
               "--dp-target-epsilon": "privacy.target-epsilon", "--dp-secret-noise": "privacy.secret-noise",
               "--clients": "partition.clients", "--partition": "partition.mode", "--partition-seed": "partition.seed",
               "--dirichlet-alpha": "partition.dirichlet-alpha", "--overlap-ratio": "partition.overlap-ratio",
               "--category-key": "partition.category-key", "--min-size": "partition.min-size",
               "--bin-stsb": "partition.bin-stsb", "--max-tokens": "train.max-tokens"}  # fmt: skip
    params = {p.opts[0]: p for p in get_command(cli).commands["rounds"].params if getattr(p, "opts", None)}
    assert set(options) <= set(params)
    for flag, key in options.items():
        assert codec._encode(params[flag].default) == declared[key], flag


def test_without_flower_the_engine_says_how_to_install_it(
    tiny_model, glue_dir, shards, tmp_path, monkeypatch
):
    for name in [m for m in sys.modules if m == "flwr" or m.startswith("flwr.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "flwr", None)  # `import flwr` now raises ImportError
    result = run(*rounds_args(tiny_model, glue_dir, shards, tmp_path, "x", "--engine", "flower"))
    one_error_line(result, 2, "--engine flower needs Flower: pip install 'fedlora[flower]'")
    assert not list(tmp_path.iterdir())  # nothing was started
    one_error_line(run(*rounds_args(tiny_model, glue_dir, shards, tmp_path, "x", "--round-timeout", "0")), 2,
                   "--round-timeout must be > 0")  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# the pieces of the apps, without a Flower runtime


def fake_message(src: int, dst: int, kind: str, content=None, error=None, reply_to: str = ""):
    from flwr.app import Message, Metadata, RecordDict

    meta = Metadata(run_id=1, message_id=f"m{src}-{dst}-{kind}", src_node_id=src, dst_node_id=dst,
                    reply_to_message_id=reply_to, group_id="1", created_at=time.time(), ttl=60.0,
                    message_type=kind)  # fmt: skip
    if error is not None:
        return Message(error=error, metadata=meta)
    return Message(content=content if content is not None else RecordDict(), metadata=meta)


def test_fedlora_clientapp_serves_fedlora_apps_only_and_speaks_plain_http_on_loopback_only(tmp_path):
    import io
    import zipfile

    from fedlora_cli.flower import worker

    def fab(pyproject: str) -> bytes:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as z:
            z.writestr("pyproject.toml", pyproject)
        return buffer.getvalue()

    ours = (ROOT / "pyproject.toml").read_text()
    assert (
        worker.fab_client_app(fab(ours)) == worker.CLIENT_APP
    )  # what `flwr run .` submits from this project
    other = '[tool.flwr.app.components]\nserverapp = "x:app"\nclientapp = "evil.client:app"\n'
    assert worker.fab_client_app(fab(other)) == "evil.client:app"  # run_task answers it with an error
    assert worker.fab_client_app(b"not a zip") is None and worker.fab_client_app(fab("[tool]")) is None
    assert worker.is_loopback("127.0.0.1:9094") and worker.is_loopback("localhost:9094")
    assert worker.is_loopback("[::1]:9094") and not worker.is_loopback("10.0.0.5:9094")
    one_error_line(run("clientapp", "--supernode", "10.0.0.5:9094"), 2,
                   "--supernode 10.0.0.5:9094: plain HTTP to another machine")  # fmt: skip


def test_the_federation_config_keeps_fractional_client_cpus():
    """Flower 1.42 takes whole CPUs per simulated client: a fraction scales Ray's CPU count instead."""
    from fedlora_cli.flower.simulation import federation_config

    whole = federation_config(3, 1.0, 0.0, 2)
    assert whole["num-supernodes"] == 3 and whole["client-resources-num-cpus"] == 1
    assert "init-args-num-cpus" not in whole  # Ray counts the machine's CPUs itself
    half = federation_config(4, 0.5, 0.25, 2)
    assert (
        half["client-resources-num-cpus"] == 1 and half["init-args-num-cpus"] == 4
    )  # four at once on 2 CPUs
    assert half["client-resources-num-gpus"] == 0.25
    third = federation_config(2, 1.5, 0.0, 16)
    assert third["client-resources-num-cpus"] == 3 and third["init-args-num-cpus"] == 32


def test_the_relay_carries_settings_progress_stop_and_the_outcome():
    """The command and its ServerApp (another process in a real run; a thread here) over the relay: the exact
    settings go one way; progress, tracker calls and the outcome the other; Ctrl-C reaches the ServerApp's
    stop switch; a connection without the token is dropped."""
    from fedlora_cli.errors import Interrupted
    from fedlora_cli.federation import RoundFailed
    from fedlora_cli.flower import relay
    from fedlora_cli.progress import RecordingProgress

    config = RoundsConfig(data=DataSpec("sst2", "/data/glue"), shards="/s/k3", train=TrainSpec(learning_rate=1e-3 / 3),
                          engine="flower")  # fmt: skip
    recorded, seen = RecordingProgress(), {}

    def run(cfg, argv, progress, abort, on_prepared):
        seen.update(config=cfg, argv=argv)
        on_prepared(Path("/runs/x"))
        progress.start("rounds", "rounds", 2)
        progress.advance("rounds", 1, "round 1")
        progress.log_metrics(1, {"eval/accuracy": 0.5})
        assert abort.wait(30)  # the command's stop
        raise Interrupted("interrupted")

    with relay.Relay(codec.to_run_config(config), ["fedlora", "rounds"], recorded) as command:
        host, port, _ = command.address.split(":")
        stranger = socket.create_connection((host, int(port)))
        stranger.sendall(b'{"hello": "not the token"}\n')
        odd = socket.create_connection((host, int(port)))
        odd.sendall(b'["hello"]\n')  # JSON, but not an object
        serverapp = threading.Thread(target=lambda: relay.Link(command.address).serve(run))
        serverapp.start()
        deadline = time.monotonic() + 30
        while command.run_dir is None and time.monotonic() < deadline:
            command.pump(0.1)
        assert command.run_dir == Path("/runs/x") and command.stop()
        while command.outcome is None and time.monotonic() < deadline:
            command.pump(0.1)
        serverapp.join(timeout=30)
        assert stranger.recv(100) == b"" and odd.recv(100) == b""  # dropped, never told the settings
        stranger.close()
    assert seen == {"config": config, "argv": ["fedlora", "rounds"]}  # exactly, floats included
    assert recorded.events == [("start", "rounds", "rounds", 2), ("advance", "rounds", 1, "round 1"),
                               ("metrics", 1, {"eval/accuracy": 0.5})]  # fmt: skip
    error = relay.error_from_json(command.outcome["error"])
    assert type(error) is Interrupted and error.exit_code == 130
    failed = relay.error_from_json(relay.error_to_json(RoundFailed("round 2: 1 of 3 replied")))
    assert type(failed) is RoundFailed and str(failed) == "round 2: 1 of 3 replied"
    bug = relay.error_from_json(relay.error_to_json(ValueError("boom\nmore")))
    assert (
        type(bug).__name__ == "FedloraError" and str(bug) == "the Flower simulation failed: ValueError: boom"
    )


def test_failed_and_missing_replies_are_failures_with_their_reason():
    from flwr.app import Error

    from fedlora_cli.flower.server_app import sort_replies

    sent = {10: 1, 11: 2, 12: 3}  # node -> client
    replies = [
        fake_message(
            11, 0, "train", error=Error(2, "Traceback (most recent call last):\n  ...\nValueError: bad shard")
        ),
        fake_message(10, 0, "train"),
        fake_message(99, 0, "train"),  # not sent this round: ignored
    ]
    ok, failed = sort_replies(sent, replies, timeout=5.0)
    assert [c for c, _ in ok] == [1]
    assert failed == [
        {"client": 2, "node": 11, "reason": "ValueError: bad shard"},
        {"client": 3, "node": 12, "reason": "no reply within 5 s (--round-timeout)"},
    ]


def test_a_client_that_crashes_while_starting_is_a_failure_not_bad_input(tmp_path, monkeypatch):
    """Ray's out-of-memory killer (or a bug) under a virtual client is exit 1; only fedlora's own answer about the
    node's config, shard or model is bad input (exit 2)."""
    from flwr.app import Error
    from flwr.supercore.task_identity import TaskIdentity

    from fedlora_cli.errors import FedloraError, InputError
    from fedlora_cli.flower.server_app import query_nodes
    from fedlora_cli.sharding import read_shards

    for key in (
        "_run_id",
        "_node_id",
        "_task_id",
    ):  # as in a ServerApp: the messages it makes carry the run and its node
        monkeypatch.setattr(TaskIdentity, key, 1)

    shards = read_shards(write_manifests(tmp_path / "k1", [[0, 1, 2]]))
    config = RoundsConfig(DataSpec("sst2"), shards=str(shards.directory))

    class OneReply:
        def __init__(self, error):
            self.error = error

        def send_and_receive(self, messages, timeout=None):
            return [fake_message(7, 0, "query", error=self.error)]

    def query(code, reason):
        return query_nodes(OneReply(Error(code, reason)), [7], shards, config, 5.0)

    oom = ("<class 'ray.exceptions.OutOfMemoryError'>:<'Task was killed due to the node running low on memory.\n"
           "Memory on the node (IP: 127.0.0.1) was 7.5GB / 7.8GB (0.96), which exceeds the threshold'>")  # fmt: skip
    crashes = [
        (0, oom, "(OutOfMemoryError: Task was killed due to the node running low on memory.)"),
        (2, "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ClientAppException occurred. "
            "Message: CUDA out of memory'>", "(ClientAppException: CUDA out of memory)"),
        (2, "MemoryError: cannot allocate", "(MemoryError: cannot allocate)"),  # `fedlora clientapp`'s words
        (5, "", "(error code 5)"),
    ]  # fmt: skip
    for code, reason, said in crashes:
        with pytest.raises(FedloraError) as info:
            query(code, reason)
        assert type(info.value) is FedloraError and info.value.exit_code == 1
        assert f"SuperNode 7 failed while starting its client {said}" in str(info.value)
    with pytest.raises(
        InputError, match="SuperNode 7 cannot serve a client: node config: give shard-manifest"
    ):
        query(2, "node config: give shard-manifest='/path/client_<i>.json' (or partition-id / client-id)")


def test_client_app_answers_query_and_evaluate_and_reports_bad_node_config(tiny_model, glue_dir, shards):
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedlora_cli.flower import client_app
    from fedlora_cli.modeling import LoraModel, load_base_model
    from fedlora_cli.sharding import read_shards, shard_fingerprint

    config = codec.from_run_config({"data.task": "sst2", "data.data-dir": str(glue_dir), "shards": str(shards),
                                    "model.name": str(tiny_model), "train.precision": "fp32",
                                    "data.max-eval-samples": 50})  # fmt: skip
    run_config = codec.run_config_record(config)

    def context(node_config):
        return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})

    reply = client_app.app(fake_message(0, 5, "query", RecordDict({codec.RUN_CONFIG: run_config})),
                           context({"partition-id": 1}))  # fmt: skip
    identity = reply.content.config_records[codec.IDENTITY]
    s = read_shards(shards)
    assert identity["client-id"] == 2 and identity["num-examples"] == 80
    assert identity["fingerprint"] == shard_fingerprint([2], [s.clients[1]])
    by_manifest = client_app.app(fake_message(0, 5, "query", RecordDict({codec.RUN_CONFIG: run_config})),
                                 context({"shard-manifest": str(shards / "client_3.json")}))  # fmt: skip
    assert by_manifest.content.config_records[codec.IDENTITY]["client-id"] == 3

    bad = client_app.app(fake_message(0, 5, "query", RecordDict({codec.RUN_CONFIG: run_config})),
                         context({"partition-id": 7}))  # fmt: skip
    assert bad.has_error() and bad.error.reason == f"node config: partition-id 7, but {shards} has 3 clients"

    lora = LoraSpec()
    state = LoraModel(
        load_base_model(config.model, config.data.glue_task, 0), lora, torch.device("cpu")
    ).state()
    content = RecordDict({codec.ARRAYS: codec.state_to_arrays(state), codec.RUN_CONFIG: run_config,
                          codec.CONFIG: ConfigRecord({"server-round": 1, **codec.lora_to_config(lora)})})  # fmt: skip
    evaluated = client_app.app(fake_message(0, 5, "evaluate", content), context({"partition-id": 0}))
    metrics = evaluated.content.metric_records[codec.METRICS]
    assert metrics["num-examples"] == 50 and 0.0 <= metrics["accuracy"] <= 1.0


# ---------------------------------------------------------------------------------------------------
# Flower's simulation engine


@pytest.fixture(scope="module")
def local_and_flower(tiny_model, glue_dir, shards, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    with one_thread():
        local = run(*rounds_args(tiny_model, glue_dir, shards, root, "local"))
    assert local.exit_code == 0, local.stderr
    flower = run(*rounds_args(tiny_model, glue_dir, shards, root, "flower", "--engine", "flower"))
    assert flower.exit_code == 0, flower.stderr
    return root / "sst2_tiny-roberta" / "local", root / "sst2_tiny-roberta" / "flower", flower


@pytest.mark.flower
def test_flower_simulation_writes_the_same_run_tree_and_final_adapter_as_local(local_and_flower):
    local, flower, result = local_and_flower
    assert files_of(flower) == files_of(local) == expected_files(2, [1, 2, 3])
    assert_same_adapter(final_state(local), final_state(flower))
    for a, b in zip(history(local), history(flower), strict=True):
        assert a["clients"] == b["clients"] == [1, 2, 3] and b["failed"] == []
        pick = ("client", "examples", "seed", "order")
        assert [{k: c[k] for k in pick} for c in a["client_metrics"]] == [
            {k: c[k] for k in pick} for c in b["client_metrics"]
        ]
        assert b["aggregation"]["error"] == pytest.approx(a["aggregation"]["error"], rel=1e-4, abs=1e-7)
        # bytes from the records actually sent: the payload plus .npy headers and keys
        assert b["bytes_down"] > a["bytes_down"] > 0 and b["bytes_up"] > a["bytes_up"] > 0
    record = json.loads((flower / "run.json").read_text())
    assert record["config"]["engine"] == "flower" and "--engine" in record["argv"]
    assert "final adapter" in result.stdout and "Traceback" not in result.stderr
    assert "INFO" not in result.stderr  # Flower's log lines stay off the terminal


@pytest.mark.flower
def test_exact_with_mixed_ranks_on_clients_sharded_in_memory_gives_the_same_rounds_on_flower(
    tiny_model, glue_dir, shards, tmp_path
):
    """Each client gets its own plan over the wire (its rank, exact's residual), and with --clients K the
    manifests are made in the run folder and the virtual SuperNodes serve them. (Every other method's plans
    cross the codec unchanged: the test below, without a simulation.)"""
    args = rounds_args(tiny_model, glue_dir, shards, tmp_path, "local", "--aggregation", "exact", "--client-ranks",
                       "4,8")  # fmt: skip
    at = args.index("--shards")
    args[at : at + 2] = ["--clients", "2", "--max-train-samples", "80"]  # shards made in memory
    with one_thread():
        local = run(*args)
    assert local.exit_code == 0, local.stderr
    args[args.index("--run-name") + 1] = "flower"
    flower = run(*args, "--engine", "flower")
    assert flower.exit_code == 0, flower.stderr
    a, b = tmp_path / "sst2_tiny-roberta" / "local", tmp_path / "sst2_tiny-roberta" / "flower"
    assert files_of(a) == files_of(b)
    assert sorted(p.name for p in (b / "shards").iterdir()) == [
        "client_1.json",
        "client_2.json",
        "summary.json",
    ]
    for path in sorted(a.rglob("*.safetensors")):  # clients, globals, exact's residual state, final
        assert_same_adapter(load_file(str(path)), load_file(str(b / path.relative_to(a))), rtol=1e-6)
    for ra, rb in zip(history(a), history(b), strict=True):
        assert (
            [c["rank"] for c in ra["client_metrics"]] == [c["rank"] for c in rb["client_metrics"]] == [4, 8]
        )
        assert rb["clients"] == [1, 2] and rb["aggregation"]["method"] == "exact" and not rb["failed"]


@pytest.mark.parametrize("method, spec", [
    ("rolora", {}), ("ffa", {}), ("naive", {"client_ranks": "4,8"}), ("exact", {"client_ranks": "4,8"}),
    ("hetlora", {"client_ranks": "4,8", "hetlora": {"gamma": 0.5, "penalty": 1.0}}), ("fedsa", {}),
])  # fmt: skip
def test_every_methods_plans_cross_the_wire_unchanged(method, spec):
    """What a simulation would carry, without one: each method's plans over two rounds (the parts that train,
    rolora's alternation, exact's residual, hetlora's rank regulariser, fedsa's personal parts) come out of
    the TRAIN message's content field for field, tensors bit for bit."""
    import dataclasses

    from fedlora_cli.config import AggregationSpec, HetloraOptions, LoraSpec
    from fedlora_cli.strategies import build_strategy
    from fedlora_cli.strategies.base import GlobalAdapter

    options = dict(spec)
    if "hetlora" in options:
        fields = {f.name for f in dataclasses.fields(HetloraOptions)}
        het = options.pop("hetlora")
        options["hetlora"] = HetloraOptions(**{k: v for k, v in het.items() if k in fields} or {})
    lora = LoraSpec(8, 16.0, target_modules=("m",))
    strategy = build_strategy(AggregationSpec(method, **options), lora, seed=0, client_ids=[1, 2])
    g = torch.Generator().manual_seed(0)
    state = {"m.lora_A.weight": torch.randn(8, 6, generator=g), "m.lora_B.weight": torch.randn(5, 8, generator=g),
             "head.weight": torch.randn(2, 5, generator=g)}  # fmt: skip
    current = strategy.initial(GlobalAdapter(state, lora))
    run_config = codec.run_config_record(RoundsConfig(DataSpec("sst2"), "s"))
    for round_no in (1, 2):
        for cid in (1, 2):
            plan = strategy.plan(round_no, cid, current)
            back = codec.plan_from_content(codec.plan_to_content(plan, round_no, run_config))
            for f in dataclasses.fields(plan):
                sent, got = getattr(plan, f.name), getattr(back, f.name)
                if f.name == "adapter":
                    assert got.lora == sent.lora and set(got.state) == set(sent.state), method
                    for key in sent.state:
                        assert torch.equal(got.state[key], sent.state[key]), (method, key)
                elif f.name in ("base_delta", "personal_start"):
                    assert set(got) == set(sent), (method, f.name)
                    for key in sent:
                        pairs = (
                            zip(sent[key], got[key], strict=True)
                            if isinstance(sent[key], tuple)
                            else [(sent[key], got[key])]
                        )  # noqa: E501
                        assert all(torch.equal(a, b) for a, b in pairs), (method, f.name, key)
                else:
                    assert got == sent, (method, f.name, sent, got)


@pytest.mark.flower
def test_differential_privacy_and_a_server_optimizer_give_the_same_rounds_on_both_engines(
    tiny_model, glue_dir, shards, tmp_path
):
    pytest.importorskip("dp_accounting", reason="the `privacy` extra is not installed")
    # clients clip their own update in product space (svd) and the plan says so over the wire; the
    # server's noise is seeded from --seed, so both engines must produce the same global adapters. A server
    # optimiser's moments are server state of the one round driver (issue 21); rsLoRA's scale crosses the wire.
    dp = [
        "--server-optimizer",
        "adam",
        "--server-lr",
        "0.01",
        "--use-rslora",
        "--dp-clip",
        "0.2",
        "--dp-noise-multiplier",
        "0.5",
        "--dp-where",
        "client",
        "--clients-per-round",
        "2",
    ]
    with one_thread():
        local = run(*rounds_args(tiny_model, glue_dir, shards, tmp_path, "dp-local", *dp))
    assert local.exit_code == 0, local.stderr
    flower = run(*rounds_args(tiny_model, glue_dir, shards, tmp_path, "dp-flower", "--engine", "flower", *dp))
    assert flower.exit_code == 0, flower.stderr
    a, b = tmp_path / "sst2_tiny-roberta" / "dp-local", tmp_path / "sst2_tiny-roberta" / "dp-flower"
    assert_same_adapter(final_state(a), final_state(b))
    for x, y in zip(history(a), history(b), strict=True):
        px, py = x["aggregation"]["privacy"], y["aggregation"]["privacy"]
        assert (
            x["clients"] == y["clients"] and px["epsilon"] == py["epsilon"] and px["clipped"] == py["clipped"]
        )
        assert py["where"] == "client" and py["norms"]["max"] <= 0.2 * (1 + 1e-6)
        assert [c["update_norm"] for c in y["client_metrics"]] == pytest.approx(
            [c["update_norm"] for c in x["client_metrics"]], rel=1e-4
        )


def flower_config(model, glue, shards, root, name, **options) -> RoundsConfig:
    """The RoundsConfig `rounds_args` gives on the command line, for calling the simulation runner directly."""
    return RoundsConfig(
        data=DataSpec("sst2", str(glue), max_eval_samples=100), shards=str(shards), model=ModelSpec(str(model)),
        train=TrainSpec(epochs=1.0, learning_rate=2e-2, precision="fp32"),
        output=OutputSpec(root=str(root), run_name=name), engine="flower", **{"rounds": 2, **options},
    )  # fmt: skip


@pytest.mark.flower
def test_failed_clients_are_tolerated_down_to_min_clients_then_the_run_stops_resumably(
    tiny_model, glue_dir, shards, tmp_path, monkeypatch
):
    from lying_clients import lying_app_named

    from fedlora_cli.federation import RoundFailed
    from fedlora_cli.flower.simulation import run_flower_simulation

    config = flower_config(tiny_model, glue_dir, shards, tmp_path, "faults", min_clients=2)
    # round 1: one of three fails; round 2: two fail
    monkeypatch.syspath_prepend(str(tmp_path / "apps"))
    failing = lying_app_named(tmp_path / "apps", {2: {1: "fail", 2: "fail"}, 3: {2: "fail"}})
    with ProcessWatch() as watch, pytest.raises(RoundFailed) as stopped:
        run_flower_simulation(config, client_app=failing)
    assert watch.seen and not watch.survivors()  # Ray started processes, and none outlived the failed run
    message = str(stopped.value)
    run_dir = tmp_path / "sst2_tiny-roberta" / "faults"
    assert message.startswith("round 2: 1 of 3 selected clients replied but 2 are needed")
    assert "client 3: client 3 failed on purpose in round 2" in message
    assert f"round 1 of {run_dir} is complete" in message and f"--output-dir {run_dir} --resume" in message
    rows = history(run_dir)
    assert [r["round"] for r in rows] == [1] and rows[0]["clients"] == [1, 3]
    assert rows[0]["failed"][0]["client"] == 2 and "failed on purpose" in rows[0]["failed"][0]["reason"]
    assert rows[0]["examples"] == 60 + 100 and not (run_dir / "round_002" / "global").exists()

    again = run(*rounds_args(tiny_model, glue_dir, shards, tmp_path, "faults", "--engine", "flower", "--min-clients",
                             "2", "--resume"))  # fmt: skip
    assert again.exit_code == 0, again.stderr
    assert "resumed after round 1" in again.stdout
    rows = history(run_dir)
    assert (
        [r["round"] for r in rows] == [1, 2] and rows[1]["clients"] == [1, 2, 3] and rows[1]["failed"] == []
    )
    assert files_of(run_dir) == sorted(set(expected_files(2, [1, 2, 3])) - {
        f"round_001/client_002/{f}" for f in [*ADAPTER_FILES, "metrics.json"]})  # fmt: skip


@pytest.mark.flower
def test_lying_clients_are_failed_clients_and_the_run_finishes_without_them(
    tiny_model, glue_dir, tmp_path, monkeypatch
):
    """Every reply is checked before it counts: a client that lies (NaN or integer tensors, a claimed 10**12
    examples, hostile types, missing fields, another client's id …) is a failed client with its reason,
    and the global adapter is exactly what the honest client alone gives."""
    from lying_clients import LIES, lying_app_named

    from fedlora_cli.flower.simulation import run_flower_simulation

    order = np.random.default_rng(5).permutation(600).tolist()
    liars = list(range(2, 10))
    shards = write_manifests(
        tmp_path / "shards", [order[30 * i : 30 * (i + 1)] for i in range(len(liars) + 1)]
    )
    lies = [*LIES, "fail"]
    assert len(lies) == 2 * len(liars)  # every lie told once, in one of two rounds
    behaviour = {c: {1: lies[k], 2: lies[k + len(liars)]} for k, c in enumerate(liars)}
    config = flower_config(tiny_model, glue_dir, shards, tmp_path, "liars", min_clients=1,
                           aggregation=AggregationSpec(method="naive"))  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path / "apps"))
    result = run_flower_simulation(config, client_app=lying_app_named(tmp_path / "apps", behaviour))
    run_dir = result.run_dir
    for row in history(run_dir):
        assert row["clients"] == [1]
        reasons = {f["client"]: f["reason"] for f in row["failed"]}
        assert sorted(reasons) == liars
        for c in liars:
            lie = behaviour[c][row["round"]]
            expected = "failed on purpose" if lie == "fail" else LIES[lie][1]
            assert expected in reasons[c], (c, lie, reasons[c])
        # one honest client, weight 1: the global adapter is its adapter, untouched by any liar
        honest = load_file(
            str(run_dir / f"round_{row['round']:03d}/client_001/adapter/adapter_model.safetensors")
        )
        global_ = load_file(
            str(run_dir / f"round_{row['round']:03d}/global/adapter/adapter_model.safetensors")
        )
        assert set(honest) == set(global_) and all(torch.equal(honest[k], global_[k]) for k in honest)
    assert (run_dir / "final" / "adapter" / "adapter_model.safetensors").is_file()
    assert not [
        p for p in run_dir.glob("round_*/client_*") if p.name != "client_001"
    ]  # nothing of a liar kept


@pytest.mark.flower
def test_a_client_that_scales_its_update_a_millionfold_is_bounded_by_the_norm_bound(
    tiny_model, glue_dir, shards, tmp_path, monkeypatch
):
    """Client 2 sends the broadcast plus 10⁶ × its update (finite and well-formed: every check passes; without a
    bound it drives the global adapter to ~10⁸). With --norm-bound-median 2 the server clips it to twice the
    round's median update norm: the global adapter stays near the honest run's, and the history row says
    who was clipped and every norm, on Flower as on engine local (the same attack, monkeypatched)."""
    from lying_clients import lying_app_named

    from fedlora_cli.config import NormBoundSpec
    from fedlora_cli.federation import local, run_local
    from fedlora_cli.flower.simulation import run_flower_simulation

    factor = 1e6
    config = flower_config(tiny_model, glue_dir, shards, tmp_path, "scaled",
                           norm_bound=NormBoundSpec(median_multiple=2.0))  # fmt: skip
    monkeypatch.syspath_prepend(str(tmp_path / "apps"))
    attack = {2: {1: f"scale:{factor:g}", 2: f"scale:{factor:g}"}}
    flower = run_flower_simulation(config, client_app=lying_app_named(tmp_path / "apps", attack)).run_dir

    def on_local(name: str, **changes) -> Path:
        with one_thread():
            return run_local(replace(config, engine="local", output=replace(config.output, run_name=name),
                                     **changes)).run_dir  # fmt: skip

    honest = on_local("honest", norm_bound=NormBoundSpec())
    real = local.train_client

    def scales_its_update(model, data, indices, plan, *args, **kwargs):
        report = real(model, data, indices, plan, *args, **kwargs)
        if plan.client_id != 2:
            return report
        sent = plan.adapter.state
        return replace(report, state={k: sent[k] + factor * (v - sent[k]) for k, v in report.state.items()})

    monkeypatch.setattr(local, "train_client", scales_its_update)
    attacked_local = on_local("scaled-local")

    def norm(run_dir: Path) -> float:
        return float(torch.cat([t.double().flatten() for t in final_state(run_dir).values()]).norm())

    assert norm(flower) < 1.5 * norm(honest)
    assert_same_adapter(final_state(attacked_local), final_state(flower), rtol=1e-4)
    for a, b in zip(history(attacked_local), history(flower), strict=True):
        x, y = a["aggregation"]["norm_bound"], b["aggregation"]["norm_bound"]
        assert b["clients"] == [1, 2, 3] and b["failed"] == [] and y["clipped"] == x["clipped"] == [2]
        assert y["norms"]["2"] > 1e4 * max(y["norms"]["1"], y["norms"]["3"])  # the attack reached the server
        assert y["bound"] == 2 * y["median"] and y["space"] == "product"
        assert y["norms"] == {c: pytest.approx(n, rel=1e-3) for c, n in x["norms"].items()}


@pytest.mark.flower
def test_a_client_that_times_out_keeps_no_worker_from_later_rounds(
    tiny_model, glue_dir, tmp_path, monkeypatch
):
    """Round 1: client 3 trains too slowly and client 4 stalls, both past --round-timeout. Neither gets
    more work while it is still busy (more would queue behind it and hold a second worker), and fedlora's
    client stops its own turn at the deadline: every later round gets its healthy clients."""
    from lying_clients import lying_app_named

    from fedlora_cli.flower.simulation import run_flower_simulation

    order = np.random.default_rng(6).permutation(600).tolist()
    shards = write_manifests(tmp_path / "shards", [order[30 * i : 30 * (i + 1)] for i in range(4)])
    # 30 s: the healthy clients' first turn includes starting Ray workers, which on a loaded 2-core machine
    # took more than 15 s
    timeout = 30.0
    behaviour = {
        3: {1: "slow:10"},
        4: {1: f"sleep:{timeout + 5:g}"},
    }  # 4 steps of 10 s; a stall past the deadline
    config = flower_config(tiny_model, glue_dir, shards, tmp_path, "slow", rounds=3, min_clients=2,
                           round_timeout=timeout, client_cpus=0.5)  # fmt: skip
    config = replace(config, train=replace(config.train, batch_size=8))
    monkeypatch.syspath_prepend(str(tmp_path / "apps"))
    result = run_flower_simulation(config, client_app=lying_app_named(tmp_path / "apps", behaviour))
    rows = history(result.run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["clients"][:2] == [1, 2] for r in rows)
    first = {f["client"]: f["reason"] for f in rows[0]["failed"]}
    missed = "no reply within 30 s (--round-timeout)"
    assert sorted(first) == [3, 4] and first[4] == missed
    # the slow client stopped its own turn at the deadline: its error reply may just make it in time
    assert first[3] in (
        missed,
        "stopped: round 1's --round-timeout has passed, so the server no longer waits for this client",
    )
    for row in rows[1:]:
        reasons = {f["client"]: f["reason"] for f in row["failed"]}
        assert reasons[4] == "still busy with round 1, which stopped waiting for it (--round-timeout)"
        assert 3 in row["clients"] or reasons[3] == reasons[4]  # back as soon as its turn was stopped


def test_a_client_stops_its_turn_once_the_server_stopped_waiting(tiny_model, glue_dir, shards):
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedlora_cli.errors import FedloraError
    from fedlora_cli.flower import client_app

    config = codec.from_run_config({"data.task": "sst2", "data.data-dir": str(glue_dir), "shards": str(shards),
                                    "model.name": str(tiny_model), "round-timeout": 5.0})  # fmt: skip
    state = {"a.lora_A.weight": torch.zeros(8, 4), "a.lora_B.weight": torch.zeros(4, 8)}
    content = RecordDict({codec.ARRAYS: codec.state_to_arrays(state), codec.RUN_CONFIG: codec.run_config_record(config),
                          codec.CONFIG: ConfigRecord({"server-round": 2, "client-id": 1, **codec.lora_to_config(LoraSpec())})})  # fmt: skip
    late = fake_message(0, 5, "train", content)
    late.metadata.created_at = time.time() - 6  # sent 6 s ago; the round waits 5 s
    context = Context(run_id=1, node_id=5, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = client_app.app(late, context)
    assert reply.has_error() and "round 2's --round-timeout has passed" in reply.error.reason
    deadline = client_app.Deadline(time.time() + 0.2, 3)
    deadline.advance("client")  # in time
    time.sleep(0.3)
    with pytest.raises(FedloraError, match="round 3's --round-timeout has passed"):
        deadline.advance("client")  # the training loop's next step stops the turn


@pytest.mark.flower
def test_sigterm_stops_a_flower_simulation_resumably_and_leaves_no_ray_process(tiny_model, glue_dir, shards,
                                                                                tmp_path):  # fmt: skip
    out = tmp_path / "run"
    args = ["rounds", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--shards", shards,
            "--output-dir", out, *FAST]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fedlora_cli", *map(str, args), "--rounds", "30", "--engine",
                             "flower"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    with ProcessWatch(proc.pid) as watch:
        deadline = time.monotonic() + 150
        while not (out / "round_001" / "global" / "metrics.json").is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err and "SIGTERM received" not in err, err
    assert lines[0].startswith("error: terminated (SIGTERM): ") and f"--output-dir {out} --resume" in lines[0]
    assert "raylet" in watch.names.values()
    assert not watch.survivors(), "Ray processes outlived the run"
    again = run(*args, "--rounds", "2", "--resume")  # engine local may continue a Flower run
    assert again.exit_code == 0, again.stderr
    assert [r["round"] for r in history(out)] == [1, 2]


# ---------------------------------------------------------------------------------------------------
# deployment: a SuperLink and two SuperNodes on loopback, `flwr run .`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on port {port}")


def executable(name: str) -> str:
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else (shutil.which(name) or name)


@pytest.mark.flower
def test_loopback_superlink_and_two_supernodes_run_the_same_rounds(tiny_model, glue_dir, tmp_path):
    """The README's recipe on one machine: each SuperNode with `--isolation process` and a `fedlora clientapp`
    beside it, which answers every message of the run in one process (no `flwr-clientapp` is ever started)."""
    psutil = pytest.importorskip("psutil")  # comes with flwr[simulation] (Ray)
    order = np.random.default_rng(1).permutation(600).tolist()
    shards = write_manifests(tmp_path / "shards", [order[:40], order[40:100]])
    runs = tmp_path / "runs"
    link_port, node_ports = free_port(), [free_port(), free_port()]
    started: list[subprocess.Popen] = []
    seen: dict[int, psutil.Process] = {}  # every process started, directly or by Flower (superexec, apps)
    names: dict[int, str] = {}

    def env_for(role: str) -> dict[str, str]:
        home = tmp_path / role  # each "machine" its own HOME / FLWR_HOME: the user's ~/.flwr is untouched
        home.mkdir(exist_ok=True)
        return {**os.environ, "HOME": str(home), "FLWR_HOME": str(home / ".flwr"), "FLWR_TELEMETRY_ENABLED": "0",
                "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": str(ROOT)}  # fmt: skip

    def start(role: str, *cmd: str) -> None:
        log = open(tmp_path / f"{role}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(list(cmd), env=env_for(role), stdout=log, stderr=subprocess.STDOUT,
                                cwd=tmp_path, start_new_session=True)  # own process group  # fmt: skip
        log.close()
        started.append(proc)

    def track() -> None:
        for proc in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                p = psutil.Process(proc.pid)
                for q in [p, *p.children(recursive=True)]:
                    if q.pid not in seen:
                        seen[q.pid] = q
                        with contextlib.suppress(psutil.Error):
                            names[q.pid] = " ".join(q.cmdline()[:3])

    def logs() -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(tmp_path.glob("*.log"))
        )

    deadline = time.monotonic() + 170
    try:
        start("link", executable("flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
              "--host", "127.0.0.1", "--port", str(link_port))  # fmt: skip
        for i, port in enumerate(node_ports, start=1):
            node_config = f"shard-manifest='{shards / f'client_{i}.json'}' data-dir='{glue_dir}'"
            start(f"node{i}", executable("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                  "--host", "127.0.0.1", "--port", str(port), "--isolation", "process", "--node-config", node_config)  # fmt: skip
            start(
                f"clientapp{i}",
                sys.executable,
                "-m",
                "fedlora_cli",
                "clientapp",
                "--supernode",
                f"127.0.0.1:{port}",
            )
        wait_for_port(link_port, deadline)
        cli_home = tmp_path / "cli" / ".flwr"
        cli_home.mkdir(parents=True)
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
        )
        overrides = {"shards": str(shards), "rounds": 2, "data.task": "sst2", "data.data-dir": str(glue_dir),
                     "data.max-eval-samples": 100, "model.name": str(tiny_model), "train.learning-rate": 0.02,
                     "train.precision": "fp32", "output.root": str(runs), "output.run-name": "loopback"}  # fmt: skip
        run_toml = tmp_path / "run.toml"
        run_toml.write_text("".join(f"{k} = {codec.toml_value(v)}\n" for k, v in overrides.items()))
        submitted = subprocess.run([executable("flwr"), "run", str(ROOT), "loopback", "--run-config", str(run_toml)],
                                   env=env_for("cli"), capture_output=True, text=True, timeout=90)  # fmt: skip
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        run_dir = runs / "sst2_tiny-roberta" / "loopback"
        final = run_dir / "final" / "metrics.json"
        while not final.exists():
            track()
            assert time.monotonic() < deadline, f"no final adapter in time\n{logs()}"
            assert all(p.poll() is None for p in started), f"a Flower process exited\n{logs()}"
            time.sleep(0.5)

        assert files_of(run_dir) == expected_files(2, [1, 2])
        track()
        assert not [n for n in names.values() if "flwr-clientapp" in n], names  # never a process per message
        for i in (1, 2):  # each node's messages, all answered by its one clientapp process
            served = (tmp_path / f"clientapp{i}.log").read_text()
            assert "query (run" in served and ", round 1): " in served and ", round 2): " in served, served
        rows = history(run_dir)
        assert [r["round"] for r in rows] == [1, 2] and all(
            r["clients"] == [1, 2] and r["failed"] == [] for r in rows
        )
        assert all(r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in rows)
        record = json.loads((run_dir / "run.json").read_text())
        assert record["config"]["engine"] == "flower" and record["argv"][:2] == ["flwr", "run"]
        # the same rounds as engine local with the same seed (one thread each, as the SuperNodes had)
        with one_thread():
            local = run("rounds", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--shards", shards,
                        "--rounds", "2", "--learning-rate", "0.02", "--precision", "fp32", "--max-eval-samples", "100",
                        "--output-root", tmp_path / "local", "--run-name", "local")  # fmt: skip
        assert local.exit_code == 0, local.stderr
        assert_same_adapter(
            final_state(tmp_path / "local" / "sst2_tiny-roberta" / "local"), final_state(run_dir)
        )
    finally:
        track()
        for proc in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for p in seen.values():  # Flower starts its SuperExec and app processes in sessions of their own
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(list(seen.values()), timeout=15)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        for proc in started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)

        def running(p) -> bool:
            try:
                return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return False

        assert not [p.pid for p in seen.values() if running(p)], "processes left running"


# ---------------------------------------------------------------------------------------------------
# a simulation from the user's folder: its paths are the user's, and nothing listens beyond loopback


class ListeningSockets:
    """Every socket that listens (TCP) or is bound for datagrams (UDP) in this process and every process below
    it, polled while the block runs: {(process name, address, port, kind)}."""

    def __init__(self) -> None:
        import psutil

        self.root = psutil.Process()
        self.seen: set[tuple[str, str, int, str]] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        import psutil

        while not self.stop.wait(0.2):
            with contextlib.suppress(psutil.Error):
                for proc in [self.root, *self.root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        name = proc.name()
                        for conn in proc.net_connections(kind="inet"):
                            kind = "tcp" if conn.type == socket.SOCK_STREAM else "udp"
                            listens = conn.status == psutil.CONN_LISTEN if kind == "tcp" else not conn.raddr
                            if listens and conn.laddr:
                                self.seen.add((name, conn.laddr.ip, conn.laddr.port, kind))

    def __enter__(self) -> ListeningSockets:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def is_loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, as Ray's gRPC servers report it
    return (mapped or ip).is_loopback


@pytest.fixture(scope="module")
def from_the_users_folder(tiny_model, glue_dir, shards, tmp_path_factory):
    """`fedlora rounds` on both engines from a folder holding the data, the shards and the model, every path
    relative and the default --output-root; the Flower run with its sockets watched."""
    home = tmp_path_factory.mktemp("home")
    (home / "glue").symlink_to(glue_dir)
    shutil.copytree(shards, home / "shards" / "k3")
    (home / "tiny-roberta").symlink_to(tiny_model)
    args = ["rounds", "--task", "sst2", "--model", "tiny-roberta", "--data-dir", "glue", "--shards", "shards/k3",
            "--rounds", "2", *FAST]  # fmt: skip
    before = os.getcwd()
    os.chdir(home)
    try:
        with one_thread():
            local = run(*args, "--run-name", "local")
        assert local.exit_code == 0, local.stderr
        with ListeningSockets() as sockets:
            flower = run(*args, "--run-name", "flower", "--engine", "flower")
        assert flower.exit_code == 0, flower.stderr
    finally:
        os.chdir(before)
    return home, flower, sockets.seen


@pytest.mark.flower
def test_relative_paths_on_flower_land_where_local_puts_them_with_the_same_adapter(from_the_users_folder):
    home, result, _ = from_the_users_folder
    local, flower = (
        home / "runs" / "sst2_tiny-roberta" / "local",
        home / "runs" / "sst2_tiny-roberta" / "flower",
    )
    assert files_of(flower) == files_of(local) == expected_files(2, [1, 2, 3])
    a, b = final_state(local), final_state(flower)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    printed = [line.removeprefix("run: ") for line in result.stdout.splitlines() if line.startswith("run: ")]
    assert printed == [str(flower)] and Path(printed[0]).is_dir()  # the path it prints exists
    config = json.loads((flower / "run.json").read_text())["config"]
    assert config["data"]["data_dir"] == str(home / "glue") and config["shards"] == str(
        home / "shards" / "k3"
    )
    assert config["model"]["name"] == str(home / "tiny-roberta") and config["output"]["root"] == str(
        home / "runs"
    )


@pytest.mark.flower
def test_no_process_of_a_simulation_listens_beyond_loopback(from_the_users_folder):
    _, _, seen = from_the_users_folder
    names = {name for name, *_ in seen}
    assert {"gcs_server", "raylet"} <= names, seen  # Ray's servers were there to be seen
    exposed = sorted(s for s in seen if not is_loopback(s[1]))
    assert not exposed, f"listening beyond loopback: {exposed}"
