"""`rounds --resume`: it checks the round it continues from before it changes anything, and a run that
does not exist, or died before its first round, is handled without surprises."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from clitools import one_error_line, run
from safetensors.torch import load_file, save_file
from test_rounds import write_manifests

from fedlora_cli.runs import RoundTree, integrity

# exact keeps a server state (its residual, state.safetensors), so every kind of file a round writes is here
QUICK = ["--local-epochs", "1", "--learning-rate", "2e-2", "--precision", "fp32", "--batch-size", "32",
         "--max-eval-samples", "50", "--aggregation", "exact"]  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    order = np.random.default_rng(2).permutation(600).tolist()
    return write_manifests(tmp_path_factory.mktemp("shards") / "k2", [order[:60], order[60:140]])


def args(model, glue, shards, out, *extra):
    return ["rounds", "--task", "sst2", "--model", model, "--data-dir", glue, "--shards", shards,
            "--output-dir", out, *QUICK, *extra]  # fmt: skip


@pytest.fixture(scope="module")
def complete(tiny_model, glue_dir, shards, tmp_path_factory) -> Path:
    """A complete 3-round run, never modified: tests damage copies of it."""
    out = tmp_path_factory.mktemp("resume") / "good"
    result = run(*args(tiny_model, glue_dir, shards, out, "--rounds", "3"))
    assert result.exit_code == 0, result.stderr
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def copy(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "copy"))


def reseal(run_dir: Path, round_no: int) -> None:
    """Record the round's files as they are now: what a round that really wrote them would have recorded."""
    tree = RoundTree(run_dir)
    path = tree.global_dir(round_no) / "metrics.json"
    record = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("files", "record_sha256")}
    path.write_text(json.dumps(integrity.sealed(record, integrity.round_digests(tree, round_no))))


def test_a_round_record_holds_the_sha256_of_every_file_the_round_wrote(complete):
    tree = RoundTree(complete)
    for r in (1, 2, 3):
        record = json.loads((tree.global_dir(r) / "metrics.json").read_text())
        record_path = tree.global_dir(r) / "metrics.json"
        written = sorted(
            p.relative_to(tree.round_dir(r)).as_posix()
            for p in tree.round_dir(r).rglob("*")
            if p.is_file() and p != record_path
        )
        assert sorted(record["files"]) == written and "global/state.safetensors" in written
        assert all(integrity.sha256_file(tree.round_dir(r) / k) == v for k, v in record["files"].items())
        assert record["record_sha256"] == integrity.record_digest(record)
        assert integrity.check_round(tree, r) is True
    history = [json.loads(line) for line in (complete / "history.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [0, 1, 2, 3] and not any("files" in h for h in history)


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # in the tensor data: the file still parses, with one different number
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def nan_adapter(path: Path) -> None:
    state = load_file(str(path))
    key = next(k for k in state if "lora_A" in k)
    state[key][0, 0] = float("nan")
    save_file(state, str(path), metadata={"format": "pt"})
    reseal(path.parents[3], 3)  # as if the round itself had written the NaN: only the finite check sees it


def nan_state(path: Path) -> None:
    state = load_file(str(path))
    key = next(iter(state))
    state[key].view(-1)[0] = float("inf")
    save_file(state, str(path))
    reseal(path.parents[2], 3)


def edit_record(path: Path) -> None:
    path.write_text(path.read_text().replace('"examples": 140', '"examples": 1400'))


DAMAGE = {  # what is damaged, how, and what the one line says about it
    "truncated adapter": ("round_003/global/adapter/adapter_model.safetensors", truncate, "does not match the sha256"),
    "bit-flipped adapter": ("round_003/global/adapter/adapter_model.safetensors", flip_a_bit, "does not match the sha256"),
    "NaN adapter": ("round_003/global/adapter/adapter_model.safetensors", nan_adapter, "NaN"),
    "bit-flipped residual": ("round_003/global/state.safetensors", flip_a_bit, "does not match the sha256"),
    "Inf residual": ("round_003/global/state.safetensors", nan_state, "NaN or Inf"),
    "missing client adapter": ("round_003/client_002/adapter/adapter_model.safetensors", Path.unlink, "is missing"),
    "edited round record": ("round_003/global/metrics.json", edit_record, "does not match the sha256"),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_resume_refuses_a_damaged_round_before_it_changes_anything(kind, complete, tiny_model, glue_dir, shards,
                                                                  tmp_path):  # fmt: skip
    run_dir = copy(complete, tmp_path)
    name, damage, says = DAMAGE[kind]
    damage(run_dir / name)
    before = snapshot(run_dir)
    result = run(*args(tiny_model, glue_dir, shards, run_dir, "--rounds", "3", "--resume"))
    message = one_error_line(result, 2, says)
    assert str(run_dir / name).split("/adapter_model")[0] in message
    assert "round 3 of the run is damaged" in message and "--resume-from-round 2" in message
    assert snapshot(run_dir) == before  # final/ and every round still there, byte for byte


def test_resume_from_an_earlier_round_discards_the_later_ones_and_ends_as_an_uninterrupted_run(
    complete, tiny_model, glue_dir, shards, tmp_path
):
    run_dir = copy(complete, tmp_path)
    flip_a_bit(run_dir / "round_003/global/adapter/adapter_model.safetensors")
    flip_a_bit(run_dir / "round_002/client_001/adapter/adapter_model.safetensors")
    base = args(tiny_model, glue_dir, shards, run_dir, "--rounds", "3")
    # round 2 is checked as round 3 was before anything is discarded; round 1 is intact
    one_error_line(run(*base, "--resume-from-round", "2"), 2, "--resume-from-round 1")
    one_error_line(
        run(*base, "--resume-from-round", "4"), 2, "--resume-from-round must be an integer in 0..3"
    )
    result = run(*base, "--resume-from-round", "1")
    assert result.exit_code == 0, result.stderr
    assert "resumed after round 1" in result.stdout
    for path in sorted(complete.rglob("*.safetensors")):  # clients, globals, residuals, final: bit-identical
        assert path.read_bytes() == (run_dir / path.relative_to(complete)).read_bytes(), path
    history = [json.loads(line)["round"] for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert history == [0, 1, 2, 3]
    assert not [p for p in run_dir.rglob(".*")]  # no lock file, no temporary left behind


def test_resume_from_round_zero_starts_the_run_again_in_its_folder(
    complete, tiny_model, glue_dir, shards, tmp_path
):
    run_dir = copy(complete, tmp_path)
    truncate(run_dir / "round_001/global/adapter/adapter_model.safetensors")
    base = args(tiny_model, glue_dir, shards, run_dir, "--rounds", "1")
    # three rounds are complete: a shorter run is not a resumption of this one
    one_error_line(run(*base, "--resume"), 2, "--rounds 1, but rounds 1-3 of")
    one_error_line(
        run(*base, "--resume-from-round", "1"), 2, "`--resume-from-round 0` (discards every round)"
    )
    result = run(*base, "--resume-from-round", "0")
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in run_dir.glob("round_*")) == ["round_000", "round_001"]  # 0: the start
    good = complete / "round_001/global/adapter/adapter_model.safetensors"
    assert (run_dir / "round_001/global/adapter/adapter_model.safetensors").read_bytes() == good.read_bytes()


def test_resume_of_a_run_that_does_not_exist_is_an_error(tiny_model, glue_dir, shards, tmp_path):
    missing = tmp_path / "runs" / "nothing-here"
    one_error_line(
        run(*args(tiny_model, glue_dir, shards, missing, "--resume")), 2, f"there is no run at {missing}"
    )
    assert not (tmp_path / "runs").exists()  # nothing was created


def test_a_run_killed_before_its_first_round_can_be_started_again_or_resumed(
    complete, tiny_model, glue_dir, shards, tmp_path
):
    # killed right after its folder was created: a temporary file and a dead process's lock files inside
    born = tmp_path / "born"
    born.mkdir()
    (born / ".run.json.fedlora-abcdef-999999-1a2b3c4d.tmp").write_text("{")
    (born / ".fedlora.lock").write_text("")
    (born / ".fedlora.lock.json").write_text(json.dumps({"pid": 999999, "host": "gone", "command": "rounds"}))
    # killed during round 1: run.json and a half-written round, but no complete round
    started = tmp_path / "started"
    started.mkdir()
    shutil.copy(complete / "run.json", started / "run.json")
    shutil.copytree(complete / "round_001" / "client_001", started / "round_001" / "client_001")
    for folder in (born, started):
        for extra in ([], ["--resume"]):
            copy_of = tmp_path / f"{folder.name}{len(extra)}"
            shutil.copytree(folder, copy_of)
            result = run(*args(tiny_model, glue_dir, shards, copy_of, "--rounds", "1", *extra))
            assert result.exit_code == 0, (folder.name, extra, result.stderr)
            good = complete / "round_001/global/adapter/adapter_model.safetensors"
            assert (
                copy_of / "round_001/global/adapter/adapter_model.safetensors"
            ).read_bytes() == good.read_bytes()
            assert not list(copy_of.glob(".*"))


def test_a_run_with_complete_rounds_still_needs_resume_or_overwrite(complete, tiny_model, glue_dir, shards):
    before = snapshot(complete)
    one_error_line(run(*args(tiny_model, glue_dir, shards, complete, "--rounds", "3")), 2, "--resume")
    assert snapshot(complete) == before


def test_every_message_about_complete_rounds_uses_one_phrase():
    from fedlora_cli.runs import complete_rounds, interrupted_rounds_message

    run_dir = Path("/runs/x")
    assert complete_rounds(run_dir, 0) == f"no round of {run_dir} was complete"
    assert complete_rounds(run_dir, 1) == f"round 1 of {run_dir} is complete"
    assert complete_rounds(run_dir, 4) == f"rounds 1-4 of {run_dir} are complete"
    assert complete_rounds(run_dir, 0) in interrupted_rounds_message(run_dir, 0)


def test_an_extended_run_records_its_final_config_and_reruns_to_the_same_adapter(
    tiny_model, glue_dir, shards, tmp_path
):
    """`--resume RUN --rounds 3` on a 2-round run: run.json says 3 rounds and lists the resume, and `runs rerun`
    runs that final configuration from the start, which ends bit-identical to the extended run."""
    root = tmp_path / "runs"
    folder = root / "ext"
    assert run(*args(tiny_model, glue_dir, shards, folder, "--rounds", "2")).exit_code == 0
    result = run("rounds", "--resume", folder, "--rounds", "3")
    assert result.exit_code == 0, result.stderr
    record = json.loads((folder / "run.json").read_text())
    assert record["config"]["rounds"] == 3 and record["status"] == "complete"
    (resume,) = record["resumes"]
    assert resume["changes"] == {"rounds": [2, 3]} and resume["after_round"] == 2
    assert resume["argv"][-4:] == ["--resume", str(folder), "--rounds", "3"]
    (listed,) = json.loads(run("runs", "list", root, "--json").stdout)
    assert (listed["rounds_done"], listed["rounds_total"]) == (3, 3)
    again = run("runs", "rerun", folder, "--root", root, "--verify")
    assert again.exit_code == 0, again.stderr
    assert "re-running the final configuration, as 1 resume left it (rounds 2 → 3)" in again.stdout
    assert "verified: bit-identical" in again.stdout
    rerun = json.loads((root / "ext-rerun-1" / "run.json").read_text())
    assert rerun["config"]["rounds"] == 3 and rerun["resumes"] == [] and rerun["config"]["resume"] is False


def test_a_resume_of_a_record_of_the_wrong_shape_is_one_line(
    complete, tiny_model, glue_dir, shards, tmp_path
):
    run_dir = copy(complete, tmp_path)
    record = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**record, "config": [1]}))
    before = snapshot(run_dir)
    one_error_line(run("rounds", "--resume", run_dir, "--rounds", "3"), 2, "'config' must be a JSON object")
    named = args(tiny_model, glue_dir, shards, run_dir, "--rounds", "3", "--resume")
    one_error_line(run(*named), 2, "'config' must be a JSON object")
    assert snapshot(run_dir) == before
