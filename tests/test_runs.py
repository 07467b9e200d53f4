"""Run records (run.json across a run's life) and `fedlora runs`: list, show, compare, rerun --verify."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from clitools import one_error_line, run

from fedlora_cli.errors import FedloraError

SMALL = ["--max-train-samples", "96", "--max-eval-samples", "48", "--epochs", "1", "--batch-size", "16",
         "--learning-rate", "1e-2", "--precision", "fp32"]  # fmt: skip

RECORD_KEYS = {
    # RunRecord's fields
    "command", "argv", "config", "shell", "versions", "seeds", "started", "ended", "duration_s", "status",
    "error", "git_commit", "cwd", "host", "pid", "platform", "resumes", "format",
    # what train adds
    "data_fingerprints", "sizes", "device", "precision",
}  # fmt: skip


def train_args(model, glue, root, name, *extra):
    return ["train", "--task", "sst2", "--model", model, "--data-dir", glue, "--output-root", root,
            "--run-name", name, *SMALL, *extra]  # fmt: skip


def read(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


@pytest.fixture(scope="module")
def runs_root(tiny_model, glue_dir, tmp_path_factory):
    """A root with a complete, a failed and an interrupted train run, each with run.json seen mid-run."""
    from fedlora_cli import centralised

    root = tmp_path_factory.mktemp("runs")
    seen: dict[str, dict] = {}
    real = centralised.train_model

    def spy(name, then=None):
        def wrapped(*args, **kwargs):
            seen[name] = read(root / "sst2_tiny-roberta" / name)  # the record while the run is going
            if then is not None:
                raise then
            return real(*args, **kwargs)

        return wrapped

    mp = pytest.MonkeyPatch()
    results = {}
    for name, then in (("ok", None), ("diverged", FedloraError("training diverged at step 3 (loss nan)")),
                       ("stopped", KeyboardInterrupt())):  # fmt: skip
        mp.setattr(centralised, "train_model", spy(name, then))
        results[name] = run(
            *train_args(tiny_model, glue_dir, root, name, "--seed", "7" if name == "ok" else "1")
        )
    mp.undo()
    return root, seen, results


def test_run_json_fields_at_start_failure_interruption_and_completion(runs_root):
    root, seen, results = runs_root
    folder = root / "sst2_tiny-roberta"
    assert results["ok"].exit_code == 0, results["ok"].stderr
    one_error_line(results["diverged"], 1, "diverged")
    one_error_line(results["stopped"], 130, "marked interrupted")

    start = seen["ok"]
    assert set(start) == RECORD_KEYS
    assert start["status"] == "running" and start["ended"] is None and start["error"] is None
    assert start["pid"] == os.getpid() and start["duration_s"] == 0.0 and start["resumes"] == []
    assert start["argv"][:2] == ["fedlora", "train"] and start["shell"].startswith(
        "fedlora train --task sst2"
    )
    assert start["cwd"] == os.getcwd() and start["format"] == 2 and start["seeds"] == {"seed": 7}
    assert start["git_commit"] is None or len(start["git_commit"]) == 40

    done = read(folder / "ok")
    assert set(done) == RECORD_KEYS
    assert done["status"] == "complete" and done["error"] is None and done["ended"] >= done["started"]
    assert 0 < done["duration_s"] < 600
    assert {k: v for k, v in done.items() if k not in ("status", "ended", "duration_s")} == {
        k: v for k, v in start.items() if k not in ("status", "ended", "duration_s")
    }  # nothing else changes as the run goes

    failed = read(folder / "diverged")
    assert set(failed) == RECORD_KEYS and failed["status"] == "failed"
    assert failed["error"] == "training diverged at step 3 (loss nan)" and failed["ended"]
    assert sorted(p.name for p in (folder / "diverged").iterdir()) == ["run.json"]  # no half-written output

    stopped = read(folder / "stopped")
    assert set(stopped) == RECORD_KEYS and stopped["status"] == "interrupted" and stopped["ended"]
    assert sorted(p.name for p in (folder / "stopped").iterdir()) == ["run.json"]


def test_a_dead_run_does_not_block_its_name_but_a_complete_one_does(
    runs_root, tiny_model, glue_dir, tmp_path
):
    root, _, _ = runs_root
    copy = tmp_path / "copy"
    shutil.copytree(root / "sst2_tiny-roberta" / "stopped", copy / "sst2_tiny-roberta" / "stopped")
    result = run(*train_args(tiny_model, glue_dir, copy, "stopped"))
    assert result.exit_code == 0, result.stderr
    assert read(copy / "sst2_tiny-roberta" / "stopped")["status"] == "complete"
    one_error_line(run(*train_args(tiny_model, glue_dir, copy, "stopped")), 2, "--overwrite")


def _legacy_runs(root: Path) -> None:
    """Folders as the first fedlora wrote them (no status, `created`, old metrics shapes), and a killed run."""
    old = root / "sst2_old" / "train-20250101-000000"
    old.mkdir(parents=True)
    (old / "run.json").write_text(json.dumps({
        "command": "train", "argv": ["fedlora", "train", "--task", "sst2"], "created": "2025-01-01T00:00:00",
        "config": {"data": {"task": "sst2"}, "model": {"name": "roberta-base"}}, "versions": {"fedlora": "0.1.0"},
        "seeds": {"seed": 42}, "platform": "Linux", "data_fingerprints": {"train": "x"},
    }))  # fmt: skip
    (old / "metrics.json").write_text(
        json.dumps({"train": {"loss": 0.3}, "eval": {"accuracy": 0.875, "examples": 8}})
    )
    fed = root / "sst2_old" / "fed-killed"
    (fed / "round_001" / "global" / "adapter").mkdir(parents=True)
    (fed / "round_001" / "global" / "metrics.json").write_text("{}")
    (fed / "round_001" / "global" / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    import socket

    (fed / "run.json").write_text(json.dumps({
        "command": "rounds", "argv": ["fedlora", "rounds"], "started": "2025-01-02T00:00:00+00:00",
        "status": "running", "pid": int(dead.stdout), "host": socket.gethostname(),
        "config": {"data": {"task": "sst2"}, "model": {"name": "roberta-base"}, "rounds": 4,
                   "aggregation": {"method": "naive"}},
        "client_sizes": {"1": 10, "2": 20, "3": 30},
    }))  # fmt: skip


def test_runs_list_json_shows_complete_failed_interrupted_and_old_runs(runs_root, tmp_path):
    root, _, _ = runs_root
    listing = tmp_path / "listing"
    shutil.copytree(root, listing)
    _legacy_runs(listing)
    result = run("runs", "list", listing, "--json")
    assert result.exit_code == 0, result.stderr
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert set(rows) == {"sst2_tiny-roberta/ok", "sst2_tiny-roberta/diverged", "sst2_tiny-roberta/stopped",
                         "sst2_old/train-20250101-000000", "sst2_old/fed-killed"}  # fmt: skip
    ok = rows["sst2_tiny-roberta/ok"]
    assert (ok["status"], ok["command"], ok["task"], ok["model"], ok["method"]) == (
        "complete",
        "train",
        "sst2",
        "tiny-roberta",
        "lora",
    )
    assert ok["main_metric"] == "accuracy" and 0 <= ok["main_value"] <= 1 and ok["duration_s"] > 0
    assert rows["sst2_tiny-roberta/diverged"]["status"] == "failed"
    assert rows["sst2_tiny-roberta/diverged"]["error"].startswith("training diverged")
    assert rows["sst2_tiny-roberta/stopped"]["status"] == "interrupted"
    legacy = rows["sst2_old/train-20250101-000000"]
    assert (legacy["status"], legacy["main_value"], legacy["started"]) == (
        "complete",
        0.875,
        "2025-01-01T00:00:00",
    )
    killed = rows["sst2_old/fed-killed"]  # "running", but its process is gone: killed
    assert (killed["status"], killed["method"], killed["clients"]) == ("interrupted", "naive", 3)
    assert (killed["rounds_done"], killed["rounds_total"]) == (1, 4)

    def names(*args):
        result = run("runs", "list", listing, "--json", *args)
        assert result.exit_code == 0, result.stderr
        return sorted(r["name"] for r in json.loads(result.stdout))

    assert names("--status", "failed") == ["sst2_tiny-roberta/diverged"]
    assert names("--command", "rounds") == ["sst2_old/fed-killed"]
    assert names("--method", "naive", "--task", "SST-2") == ["sst2_old/fed-killed"]
    table = run("runs", "list", listing)
    assert table.exit_code == 0 and "interrupted" in table.stdout and "fed-killed" in table.stdout
    one_error_line(run("runs", "list", listing, "--status", "done"), 2, "--status must be one of")
    one_error_line(run("runs", "list", tmp_path / "nowhere"), 2, "no such folder")


def test_rerun_verify_is_bit_identical_and_says_so_when_not(runs_root, tmp_path):
    root, _, _ = runs_root
    result = run("runs", "rerun", "ok", "--root", root, "--verify")
    assert result.exit_code == 0, result.stderr
    assert "verified: bit-identical" in result.stdout
    again = root / "sst2_tiny-roberta" / "ok-rerun-1"
    record = read(again)
    assert record["status"] == "complete" and record["rerun_of"] == str(
        (root / "sst2_tiny-roberta" / "ok").resolve()
    )
    assert record["config"] == {**read(root / "sst2_tiny-roberta" / "ok")["config"],
                                "output": {**record["config"]["output"]}}  # fmt: skip
    assert record["config"]["output"]["output_dir"] == str(again)

    tampered = tmp_path / "t" / "sst2_tiny-roberta" / "ok"
    shutil.copytree(root / "sst2_tiny-roberta" / "ok", tampered)
    metrics = json.loads((tampered / "metrics.json").read_text())
    metrics["adapter_sha256"] = "0" * 64
    (tampered / "metrics.json").write_text(json.dumps(metrics))
    one_error_line(run("runs", "rerun", tampered, "--verify"), 1, "not reproduced")
    one_error_line(run("runs", "rerun", "no-such-run", "--root", root), 2, "no run no-such-run")


def test_completion_offers_run_names(runs_root):
    from fedlora_cli.runs.query import run_names

    root, _, _ = runs_root
    assert "sst2_tiny-roberta/ok" in run_names(root) and "ok" in run_names(root, "o")
    assert all(n.startswith("st") for n in run_names(root, "st")) and run_names(root / "none") == []


def test_show_and_compare(runs_root, tmp_path):
    root, _, _ = runs_root
    shown = run("runs", "show", "sst2_tiny-roberta/ok", "--root", root)
    assert shown.exit_code == 0, shown.stderr
    assert "fedlora train --task sst2" in shown.stdout and "lora.r" in shown.stdout
    adapter_line = next(line for line in shown.stdout.splitlines() if line.startswith("final adapter:"))
    assert adapter_line == f"final adapter: {root / 'sst2_tiny-roberta' / 'ok' / 'adapter'}"  # never wrapped
    data = json.loads(run("runs", "show", root / "sst2_tiny-roberta" / "ok", "--json").stdout)
    assert data["status"] == "complete" and data["final"]["command"] == "train"

    plot = tmp_path / "curves.png"
    compared = run("runs", "compare", "ok", "diverged", "--root", root, "--json", "--plot", plot)
    assert compared.exit_code == 0, compared.stderr
    diff = json.loads(compared.stdout[: compared.stdout.rindex("}") + 1])
    assert diff["differ"]["train.seed"] == [7, 1]  # what differs, and only that
    assert set(diff["differ"]) == {"train.seed", "output.run_name"}
    assert diff["status"] == ["complete", "failed"] and diff["metrics"]["accuracy"][1] is None
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_record_lifecycle_resumes_and_config_changes(tmp_path):
    from fedlora_cli.runs import (
        config_changes,
        finish_record,
        new_record,
        read_record,
        record_resume,
        run_session,
        write_record,
    )

    write_record(
        tmp_path, new_record(command="rounds", config={"rounds": 3, "train": {"seed": 1}}, argv=["fedlora"])
    )
    with pytest.raises(KeyboardInterrupt), run_session(tmp_path):
        raise KeyboardInterrupt
    first = read_record(tmp_path)
    assert first.status == "interrupted" and first.error == "interrupted"
    changes = config_changes({"rounds": 3, "train": {"seed": 1}}, {"rounds": 4, "train": {"seed": 1}})
    assert changes == {"rounds": [3, 4]}
    record_resume(tmp_path, argv=["fedlora", "rounds", "--rounds", "4"], changes=changes)
    resumed = read_record(tmp_path)
    assert resumed.status == "running" and resumed.ended is None
    assert resumed.resumes == [{"at": resumed.resumes[0]["at"], "argv": ["fedlora", "rounds", "--rounds", "4"],
                                "shell": "fedlora rounds --rounds 4", "changes": {"rounds": [3, 4]}}]  # fmt: skip
    finish_record(tmp_path, "complete", seconds=2.5)
    final = read_record(tmp_path)
    assert final.status == "complete" and final.duration_s == pytest.approx(first.duration_s + 2.5)
    data = json.loads((tmp_path / "run.json").read_text())
    data["from_the_future"] = {"x": 1}
    (tmp_path / "run.json").write_text(json.dumps(data))
    finish_record(tmp_path, "complete")  # a newer fedlora's keys survive a rewrite
    assert json.loads((tmp_path / "run.json").read_text())["from_the_future"] == {"x": 1}


def test_git_commit_reads_refs_without_git(tmp_path):
    from fedlora_cli.runs import git_commit

    sha = "a" * 40
    repo = tmp_path / "repo"
    (repo / ".git" / "refs" / "heads").mkdir(parents=True)
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / ".git" / "refs" / "heads" / "main").write_text(sha + "\n")
    assert git_commit(repo) == sha
    (repo / ".git" / "refs" / "heads" / "main").unlink()
    (repo / ".git" / "packed-refs").write_text(f"# pack-refs\n{'b' * 40} refs/heads/main\n")
    assert git_commit(repo) == "b" * 40
    worktree = tmp_path / "wt"
    (repo / ".git" / "worktrees" / "wt").mkdir(parents=True)
    (repo / ".git" / "worktrees" / "wt" / "HEAD").write_text("c" * 40)  # detached
    (repo / ".git" / "worktrees" / "wt" / "commondir").write_text("../..")
    worktree.mkdir()
    (worktree / ".git").write_text(f"gitdir: {repo / '.git' / 'worktrees' / 'wt'}\n")
    assert git_commit(worktree) == "c" * 40
    assert git_commit(tmp_path / "not-a-checkout") is None
    (tmp_path / "broken" / ".git").mkdir(parents=True)
    assert git_commit(tmp_path / "broken") is None  # no HEAD: None, never an error


def test_adapter_digest_is_about_the_weights_only(tmp_path):
    import torch
    from safetensors.torch import save_file

    from fedlora_cli.runs import adapter_digest, state_digest

    state = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(2)}
    save_file(state, str(tmp_path / "one.safetensors"), metadata={"format": "pt"})
    save_file(state, str(tmp_path / "two.safetensors"), metadata={"format": "pt", "written": "later"})
    assert adapter_digest(tmp_path / "one.safetensors") == adapter_digest(tmp_path / "two.safetensors")
    assert adapter_digest(tmp_path / "one.safetensors") == state_digest(state)
    flipped = {**state, "a": torch.tensor([1.0, 1.0000001])}
    assert state_digest(flipped) != state_digest(state)


def test_merge_records_itself_and_reruns_bit_identically(runs_root, tmp_path):
    root, _, _ = runs_root
    adapter = root / "sst2_tiny-roberta" / "ok" / "adapter"
    merged = tmp_path / "merges" / "two"
    result = run("merge", "--adapters", adapter, adapter, "--weights", "1", "3", "--save-adapter", merged)
    assert result.exit_code == 0, result.stderr
    record, metrics = read(merged), json.loads((merged / "metrics.json").read_text())
    assert record["command"] == "merge" and record["status"] == "complete" and record["argv"][1] == "merge"
    assert metrics["command"] == "merge" and "aggregation_error" in metrics["metrics"]
    from fedlora_cli.runs import adapter_digest

    assert metrics["adapter_sha256"] == adapter_digest(merged)  # computed before writing, equal after
    (row,) = json.loads(run("runs", "list", tmp_path / "merges", "--json").stdout)
    assert (row["command"], row["status"], row["method"]) == ("merge", "complete", "svd")
    again = run("runs", "rerun", merged, "--verify")
    assert again.exit_code == 0, again.stderr
    assert (tmp_path / "merges" / "two-rerun-1" / "adapter_model.safetensors").is_file()


def test_history_has_one_reader_with_one_rule_for_a_bad_line(tmp_path):
    """A torn last line (a crash mid-append) is skipped; a bad line anywhere else is one error naming it."""
    from fedlora_cli.errors import InputError
    from fedlora_cli.runs import HistoryRow, read_history, write_history

    rows = [HistoryRow(round=r, clients=[1, 2], failed=[], client_metrics=[], examples=10, train_loss=0.5 / (r + 1),
                       aggregation={"error": 0.0}, eval={"accuracy": 0.5 + r / 8}, bytes_down=1, bytes_up=2,
                       bytes_written=3, seconds={"wall": 1.0}, extra={"privacy": {"epsilon": 1.5}})
            for r in (0, 1, 2)]  # fmt: skip
    write_history(tmp_path, rows)
    assert read_history(tmp_path) == rows  # typed rows, optional sections included
    path = tmp_path / "history.jsonl"
    text = path.read_text()
    path.write_text(text + '{"round": 3, "clie')
    assert read_history(tmp_path) == rows
    lines = text.splitlines(keepends=True)
    path.write_text(lines[0] + '{"round": 1, "clie\n' + lines[2])
    with pytest.raises(InputError, match=r"history.jsonl:2: not a history row"):
        read_history(tmp_path)
    path.write_text(text + '{"round": "3"}\n')  # complete (it has its newline), so not torn: damaged
    with pytest.raises(InputError, match=r"history.jsonl:4: not a history row \('round' must be"):
        read_history(tmp_path)
    path.write_text('{"round": 1, "eval": {"accuracy": 0.75}, "new_section": {}}\n')  # older and newer rows
    (row,) = read_history(tmp_path)
    assert (row.metric("accuracy"), row.clients, row.train_loss, row.extra) == (
        0.75,
        [],
        None,
        {"new_section": {}},
    )
    assert read_history(tmp_path / "nowhere") == []


def test_runs_list_shows_a_dp_runs_method_with_dp(tmp_path):
    for name, privacy in (("plain", {"clip": None, "noise_multiplier": None}),
                          ("private", {"clip": 1.0, "noise_multiplier": 0.8})):  # fmt: skip
        folder = tmp_path / "sst2_m" / name
        folder.mkdir(parents=True)
        config = {"data": {"task": "sst2"}, "aggregation": {"method": "svd"}, "privacy": privacy, "rounds": 2}
        (folder / "run.json").write_text(json.dumps({"command": "rounds", "argv": [], "config": config}))
    listed = run("runs", "list", tmp_path, "--json")
    assert {r["name"]: r["method"] for r in json.loads(listed.stdout)} == {
        "sst2_m/plain": "svd",
        "sst2_m/private": "svd+dp",
    }


def test_rerun_writes_only_under_the_root_it_was_asked_about(runs_root, tmp_path):
    """A link to a run gets its re-run beside the link, never beside the target; a record's cache folder is
    not used; a folder under the root that leads elsewhere is refused before any work."""
    root, _, _ = runs_root
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(root / "sst2_tiny-roberta" / "ok", elsewhere / "ok")
    record = read(elsewhere / "ok")
    record["config"]["data"]["cache_dir"] = str(tmp_path / "planted-cache")  # a hand-edited record
    (elsewhere / "ok" / "run.json").write_text(json.dumps(record))
    mine = tmp_path / "mine" / "sst2_tiny-roberta"
    mine.mkdir(parents=True)
    (mine / "link").symlink_to(elsewhere / "ok")
    result = run("runs", "rerun", mine / "link", "--root", tmp_path / "mine", "--verify")
    assert result.exit_code == 0, result.stderr
    assert (
        "re-running the recorded configuration" in result.stdout
        and "verified: bit-identical" in result.stdout
    )
    assert (mine / "link-rerun-1" / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["ok"]  # nothing beside the link's target
    assert not (tmp_path / "planted-cache").exists()  # the tokenized cache is the user's default
    assert read(mine / "link-rerun-1")["config"]["data"]["cache_dir"] is None

    (tmp_path / "linked-root").mkdir()
    (tmp_path / "linked-root" / "sst2").symlink_to(elsewhere)
    refused = run("runs", "rerun", "sst2/ok", "--root", tmp_path / "linked-root")
    one_error_line(refused, 2, "outside the runs root")
    one_error_line(run("runs", "rerun", mine / "link", "--output-dir", elsewhere), 2, "already exists")
    assert sorted(p.name for p in elsewhere.iterdir()) == ["ok"]


def test_rerun_of_a_record_of_the_wrong_shape_is_one_line(tmp_path):
    folder = tmp_path / "r"
    folder.mkdir()
    (folder / "run.json").write_text(
        json.dumps({"command": ["train"], "argv": ["fedlora", "train"], "config": {}})
    )
    one_error_line(run("runs", "rerun", folder), 2, "'command' must be a command name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_an_older_record_gets_its_final_config_from_its_resumes(tmp_path):
    """Records written before resumes updated `config` kept the first session's: the resumes restore it."""
    from fedlora_cli.runs import RunRecord

    old = RunRecord.from_json({"command": "rounds", "argv": [], "config": {"rounds": 2, "engine": "local"},
                               "resumes": [{"changes": {"rounds": [2, 3]}}, {"changes": {"rounds": [3, 5],
                               "output.output_dir": ["a", "b"]}}]})  # fmt: skip
    assert old.effective_config() == {"rounds": 5, "engine": "local"}
    from fedlora_cli.workflows import describe_config

    assert (
        describe_config(old) == "the final configuration, as 2 resumes left it (rounds 2 → 5), from the start"
    )
