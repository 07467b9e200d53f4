"""Never delete or replace what fedlora did not write: one rule for every path a command writes to."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from clitools import one_error_line, run

from fedlora_cli import ownership
from fedlora_cli.errors import InputError

QUICK = ["--max-train-samples", "64", "--epochs", "1", "--precision", "fp32", "--no-eval"]


@pytest.fixture(scope="module")
def trained(tiny_model, glue_dir, tmp_path_factory) -> Path:
    """One small `train` run; its adapter is fedlora's."""
    out = tmp_path_factory.mktemp("own") / "run"
    result = run(
        "train", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, *QUICK, "--output-dir", out
    )
    assert result.exit_code == 0, result.stderr
    return out


def train(tiny_model, glue_dir, *args):
    return run("train", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, *QUICK, *args)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------
# the rule itself, for each kind of output


def test_claim_free_targets_and_the_overwrite_rule(tmp_path, trained):
    adapter = trained / "adapter"
    # free: missing, or an empty folder
    assert (
        ownership.claim(tmp_path / "new", ownership.ADAPTER, overwrite=False, option="--x")
        == tmp_path / "new"
    )
    (tmp_path / "empty").mkdir()
    ownership.claim(tmp_path / "empty", ownership.ADAPTER, overwrite=False, option="--x")
    # fedlora's: needs --overwrite, then it may be replaced
    with pytest.raises(
        InputError, match="already holds a fedlora adapter folder: choose another --x, or pass --overwrite"
    ):
        ownership.claim(adapter, ownership.ADAPTER, overwrite=False, option="--x")
    ownership.claim(adapter, ownership.ADAPTER, overwrite=True, option="--x")
    ownership.claim(trained, ownership.RUN, overwrite=True, option="--x")
    # a file where a folder belongs, a folder where a file belongs
    with pytest.raises(InputError, match="exists and is not a folder"):
        ownership.claim(adapter / "adapter_config.json", ownership.ADAPTER, overwrite=True, option="--x")
    with pytest.raises(InputError, match="is a folder, not a file"):
        ownership.claim(adapter, ownership.METRICS_JSON, overwrite=True, option="--x")


@pytest.mark.parametrize(
    ("kind", "source", "intruder"),
    [
        ("ADAPTER", "adapter", "notes.txt"),  # a file beside the adapter
        ("ADAPTER", "adapter", "adapter_model.bin"),  # a name PEFT knows, but fedlora did not write it
        ("RUN", ".", "thesis.tex"),
        ("RUN", ".", "adapter/extra.json"),  # inside the run's adapter folder
    ],
)
def test_overwrite_refuses_a_folder_with_anything_fedlora_did_not_write(
    tmp_path, trained, kind, source, intruder
):
    target = tmp_path / "t"
    shutil.copytree(trained / source, target)
    (target / intruder).write_text("mine")
    with pytest.raises(InputError, match=f"fedlora did not write \\({intruder}\\)"):
        ownership.claim(target, getattr(ownership, kind), overwrite=True, option="--x")


def test_plain_peft_adapters_and_hand_made_files_are_not_fedloras(tmp_path, trained):
    peft_only = tmp_path / "peft"
    shutil.copytree(trained / "adapter", peft_only)
    (peft_only / ownership.ADAPTER_META).unlink()  # what PEFT's save_pretrained writes: not ours to delete
    with pytest.raises(InputError, match="fedlora did not write"):
        ownership.claim(peft_only, ownership.ADAPTER, overwrite=True, option="--x")
    fake = tmp_path / "fake"
    shutil.copytree(trained / "adapter", fake)
    (fake / ownership.ADAPTER_META).write_text("[1, 2]")  # wrong-typed JSON is not a signature either
    with pytest.raises(InputError, match="fedlora did not write"):
        ownership.claim(fake, ownership.ADAPTER, overwrite=True, option="--x")
    results = tmp_path / "results.json"
    results.write_text('{"accuracy": 0.9}')
    with pytest.raises(InputError, match="was not written by fedlora"):
        ownership.claim(results, ownership.METRICS_JSON, overwrite=True, option="--output-json")
    linked = tmp_path / "linked"
    shutil.copytree(trained / "adapter", linked)
    (linked / "adapter_config.json").unlink()
    (linked / "adapter_config.json").symlink_to(tmp_path / "results.json")  # fedlora never writes a link
    with pytest.raises(InputError, match="fedlora did not write \\(adapter_config.json\\)"):
        ownership.claim(linked, ownership.ADAPTER, overwrite=True, option="--x")


# ---------------------------------------------------------------------------------------------------
# every command that writes to a path the user named


def test_train_adapter_output_dir_follows_the_rule(tiny_model, glue_dir, trained, tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        result = train(
            tiny_model,
            glue_dir,
            "--output-dir",
            tmp_path / f"r{len(extra)}",
            "--adapter-output-dir",
            user,
            *extra,
        )
        one_error_line(result, 2, "holds files that fedlora did not write (notes.txt)")
        assert snapshot(user) == {"notes.txt": b"mine"}
        assert not (tmp_path / f"r{len(extra)}").exists()  # refused before any work
    ours = tmp_path / "ours"
    shutil.copytree(trained / "adapter", ours)
    before = snapshot(ours)
    result = train(tiny_model, glue_dir, "--output-dir", tmp_path / "r2", "--adapter-output-dir", ours)
    one_error_line(result, 2, "pass --overwrite")
    assert snapshot(ours) == before
    result = train(tiny_model, glue_dir, "--output-dir", tmp_path / "r3", "--adapter-output-dir", ours, "--overwrite",
                   "--seed", "7")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert snapshot(ours) != before and sorted(snapshot(ours)) == sorted(before)


def test_merge_save_adapter_overwrite_keeps_unrelated_files(trained, tmp_path):
    adapter = trained / "adapter"
    out = tmp_path / "merged"
    assert run("merge", "--adapters", adapter, adapter, "--save-adapter", out).exit_code == 0
    (out / "README.md").write_text("my notes about this merge")
    result = run("merge", "--adapters", adapter, adapter, "--save-adapter", out, "--overwrite")
    one_error_line(result, 2, "fedlora did not write (README.md)")
    assert (out / "README.md").read_text() == "my notes about this merge"
    (out / "README.md").unlink()
    one_error_line(run("merge", "--adapters", adapter, "--save-adapter", out), 2, "pass --overwrite")
    result = run("merge", "--adapters", adapter, adapter, "--weights", "1", "--weights", "3", "--save-adapter", out,
                 "--overwrite")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert json.loads((out / "fuse_manifest.json").read_text())["weights"] == [0.25, 0.75]
    assert json.loads((out / ownership.ADAPTER_META).read_text())["files"] == [
        "adapter_config.json", "adapter_model.safetensors", "fedlora_adapter.json", "fuse_manifest.json",
        "metrics.json", "run.json",
    ]  # fmt: skip


def test_eval_output_json_is_replaced_only_when_fedlora_wrote_it(tiny_model, glue_dir, trained, tmp_path):
    args = ["eval", "--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir, "--adapter", trained / "adapter",
            "--max-eval-samples", "16", "--precision", "fp32"]  # fmt: skip
    theirs = tmp_path / "results.json"
    theirs.write_text('{"accuracy": 0.97, "note": "from the paper"}')
    for extra in ([], ["--overwrite"]):
        one_error_line(run(*args, "--output-json", theirs, *extra), 2, "was not written by fedlora")
    assert json.loads(theirs.read_text())["note"] == "from the paper"
    ours = tmp_path / "ours.json"
    assert run(*args, "--output-json", ours).exit_code == 0
    one_error_line(run(*args, "--output-json", ours), 2, "pass --overwrite")
    assert run(*args, "--output-json", ours, "--overwrite").exit_code == 0


def test_a_rounds_run_tree_is_fedloras_and_anything_added_to_it_is_not(tmp_path):
    run_dir = tmp_path / "run"
    for folder in ("round_001/global/adapter", "round_002/client_001/adapter", "final/adapter", "shards"):
        (run_dir / folder).mkdir(parents=True)
    (run_dir / "run.json").write_text(json.dumps({"command": "rounds", "versions": {"fedlora": "0.1.0"}}))
    (run_dir / "history.jsonl").write_text("{}\n")
    assert ownership.run_foreign(run_dir) == []
    (run_dir / "analysis.ipynb").write_text("{}")
    (run_dir / "round_x").mkdir()
    assert ownership.run_foreign(run_dir) == ["analysis.ipynb", "round_x"]
    (run_dir / "run.json").write_text(json.dumps({"command": "rounds"}))  # no fedlora version: not a record
    assert "run.json" in ownership.run_foreign(run_dir)


def test_the_interrupt_message_names_an_option_that_works_for_every_run(tmp_path):
    from fedlora_cli.runs import interrupted_rounds_message

    run_dir = tmp_path / "exact" / "place"
    assert interrupted_rounds_message(run_dir, 0) == (
        f"interrupted: no round of {run_dir} was complete; continue with "
        f"`fedlora rounds … --output-dir {run_dir} --resume`"
    )
    assert f"round 1 of {run_dir} is complete" in interrupted_rounds_message(run_dir, 1)
    assert f"rounds 1-3 of {run_dir} are complete" in interrupted_rounds_message(run_dir, 3)
    assert "1..0" not in interrupted_rounds_message(run_dir, 0)


# ---------------------------------------------------------------------------------------------------
# fedlora's temporaries are its own: a user's dot-names ending in .tmp / .old are the user's


def users_dot_files(folder: Path) -> dict[str, bytes]:
    """What a user may keep in a folder: names that start with '.' and end with '.old' or '.tmp'."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".thesis.old").write_text("chapter 1")
    (folder / ".photos.old").mkdir()
    (folder / ".photos.old" / "cat.jpg").write_bytes(b"\xff\xd8cat")
    (folder / ".draft.tmp").write_text("draft")
    return snapshot(folder)


@pytest.mark.parametrize(
    "command",
    ["train --output-dir", "train --adapter-output-dir", "rounds --output-dir", "rounds --config output-dir",
     "merge --save-adapter", "shard --out"],
)  # fmt: skip
def test_a_users_dot_old_and_dot_tmp_files_are_never_taken_for_fedlora_leftovers(
    command, tiny_model, glue_dir, trained, tmp_path
):
    target = tmp_path / "target"
    before = users_dot_files(target)
    data = ["--task", "sst2", "--model", tiny_model, "--data-dir", glue_dir]
    rounds = ["rounds", *data, "--clients", "2", "--max-train-samples", "64", "--rounds", "1",
              "--precision", "fp32", "--no-eval-each-round"]  # fmt: skip
    args = {
        "train --output-dir": ["train", *data, *QUICK[:-1], "--output-dir", target],
        "train --adapter-output-dir": ["train", *data, *QUICK, "--output-dir", tmp_path / "run",
                                       "--adapter-output-dir", target],
        "rounds --output-dir": [*rounds, "--output-dir", target],
        "rounds --config output-dir": [*rounds, "--config", tmp_path / "c.toml"],
        "merge --save-adapter": ["merge", "--adapters", trained / "adapter", trained / "adapter", "--save-adapter",
                                 target],
        "shard --out": ["shard", "--task", "sst2", "--data-dir", glue_dir, "-k", "2", "--out", target],
    }[command]  # fmt: skip
    (tmp_path / "c.toml").write_text(f'output-dir = "{target}"\n')
    one_error_line(run(*args), 2, str(target))  # occupied: refused, one way or another
    assert snapshot(target) == before
    one_error_line(
        run(*args, "--overwrite"), 2, "holds files that fedlora did not write (.draft.tmp, .photos.old"
    )
    assert snapshot(target) == before
    assert (
        sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    )  # no temporary left beside


def test_a_merge_killed_by_sigkill_leaves_a_temporary_that_the_next_merge_clears(trained, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    target = tmp_path / "mg_1"
    # a merge that died half-way: its temporary folder beside the target, made by a process now gone
    killed = subprocess.run(
        [sys.executable, "-c", "import os, signal, sys\nfrom fedlora_cli import atomic\n"
         "tmp = atomic.new_temp_dir(sys.argv[1]); (tmp / 'adapter_model.safetensors').write_bytes(b'half')\n"
         "os.kill(os.getpid(), signal.SIGKILL)", str(target)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL
    [leftover] = [p for p in tmp_path.iterdir() if p.name.startswith(".mg_1.")]
    assert leftover.is_dir() and atomic_is_leftover(leftover.name)
    # a write in progress in a live process (this one), and a user's look-alikes, are not leftovers to clear
    from fedlora_cli import atomic

    live = atomic.new_temp_dir(target)
    users = users_dot_files(tmp_path / "mine")
    (tmp_path / ".mg_1.old").write_text("the user's")
    (tmp_path / ".mg_1.12345678.tmp").write_text("the user's too")
    result = run("merge", "--adapters", trained / "adapter", trained / "adapter", "--save-adapter", target)
    assert result.exit_code == 0, result.stderr
    assert not leftover.exists() and live.is_dir()
    assert (tmp_path / ".mg_1.old").read_text() == "the user's" and (tmp_path / ".mg_1.12345678.tmp").exists()
    assert snapshot(tmp_path / "mine") == users
    live.rmdir()


def atomic_is_leftover(name: str) -> bool:
    from fedlora_cli.atomic import is_leftover

    return is_leftover(name)
