"""The run tree of a `rounds` run: claim it (one process per run), record each round, and resume it.

A round is complete once its `global/metrics.json` exists: written last, it holds the round's history
row and the sha256 of every file the round wrote (integrity.py), so `--resume` can check the round it
continues from before it discards anything after it. A resume rewrites run.json's `config` to the
configuration the run continues with and appends what changed to its `resumes`: the record always
describes the result beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedlora_cli import atomic
from fedlora_cli.config import RoundsConfig
from fedlora_cli.errors import InputError
from fedlora_cli.modeling import read_adapter, save_adapter
from fedlora_cli.options import walk
from fedlora_cli.ownership import entries
from fedlora_cli.runlock import RunLock
from fedlora_cli.runs import (
    ADAPTER_DIR,
    METRICS,
    RUN_OPTION,
    RoundTree,
    RunRecord,
    apply_changes,
    claim_run_dir,
    complete_rounds,
    config_changes,
    experiment_changes,
    final_metrics,
    read_record,
    record_resume,
    write_metrics,
    write_record,
)
from fedlora_cli.runs.history import HistoryRow, write_history
from fedlora_cli.runs.integrity import (
    STATE_FILE,
    check_round,
    damaged,
    last_recorded_round,
    read_round_record,
    round_digests,
    sealed,
)
from fedlora_cli.strategies.base import ClientReport, GlobalAdapter
from fedlora_cli.tasks import GlueTask

# Config keys that may change between a run and its resumption — the option fields marked `resume_free`:
# where it is written, how the work is spread (engine, resources, fault tolerance: both engines give the
# same rounds), what is evaluated, and how many rounds there are in all (each round's clients and seeds do
# not depend on the total, so extending a run gives what running longer from the start would).
RESUME_FREE_KEYS = {f.dotted for f in walk(RoundsConfig) if f.option.resume_free}


def resume_config(run_dir: Path, recorded: dict[str, Any], changes: dict[str, Any]) -> RoundsConfig:
    """What `--resume RUN` continues: the run's recorded config, with `changes` (flattened config keys) that a
    resume may make (RESUME_FREE_KEYS: --rounds, the engine, evaluation, …). Any other change is one error
    naming the options, so the resumed run is the same experiment."""
    from fedlora_cli.config import from_dict
    from fedlora_cli.runs import flatten

    def free(key: str) -> bool:
        return key in RESUME_FREE_KEYS or key.split(".")[0] in RESUME_FREE_KEYS

    before = flatten(recorded)
    refused = {k: v for k, v in changes.items() if not free(k) and before.get(k) != v}
    if refused:
        detail = ", ".join(f"{k}: {before.get(k)!r} -> {v!r}" for k, v in sorted(refused.items())[:4])
        allowed = ", ".join(sorted(k for k in RESUME_FREE_KEYS if not k.startswith(("output.", "resume"))))
        raise InputError(
            f"--resume {run_dir}: {detail} would make it another experiment; a resume may change only "
            f"{allowed}"
        )
    merged = apply_changes(recorded, {k: [None, v] for k, v in changes.items()})
    merged["resume"] = True
    output = merged.get("output")
    merged["output"] = {
        **(output if isinstance(output, dict) else {}),
        "output_dir": str(run_dir),
        "overwrite": False,
    }
    try:
        return from_dict(RoundsConfig, merged)
    except (TypeError, ValueError, AttributeError, KeyError) as e:  # a damaged record fails in any of these
        raise InputError(f"--resume {run_dir}: the recorded config cannot be rebuilt ({e})") from None


class RoundRecorder:
    """Writes the run tree of a `rounds` run and decides where a resumed run continues.

    It holds the run folder's lock (runlock.py) from `claim` until `close`: one process per run.
    """

    def __init__(self, run_dir: Path, base_model: str, task: GlueTask) -> None:
        self.tree = RoundTree(run_dir)
        self.base_model = base_model
        self.task = task
        self.history: list[HistoryRow] = []
        self.lock = RunLock(run_dir, "rounds")

    @property
    def run_dir(self) -> Path:
        return self.tree.root

    def claim(self, config: RoundsConfig) -> None:
        """Before any work: a --resume needs a run to continue; then hold the folder's lock (or say who
        does)."""
        root = self.tree.root
        if config.resuming and not root.is_dir():
            raise InputError(
                f"--resume: there is no run at {root}: check {RUN_OPTION}, or start the run without --resume"
            )
        if root.exists() and not root.is_dir():
            raise InputError(f"{root} exists and is not a folder: choose another {RUN_OPTION}")
        self.lock.acquire()

    def close(self) -> None:
        """Release the folder's lock (the run is finished, failed or interrupted; what is complete stays)."""
        self.lock.release()

    def start(self, config: RoundsConfig, record: dict[str, Any]) -> int:
        """Under the lock: start the run in its folder, or check it for --resume; return the last complete
        round.

        A folder holding nothing but fedlora's temporaries, or a rounds run that never completed a round
        (killed right after it started), may be started again without --overwrite, or resumed.
        """
        root = self.tree.root
        begun = bool(entries(root))  # anything beyond temporaries and lock files
        if config.resuming and begun:
            return self._resume(config, record)
        if begun and not self._never_completed_a_round() and not config.output.overwrite:
            raise InputError(
                f"run {root} already exists: pass --resume to continue it, --overwrite to replace it, or "
                f"choose another {RUN_OPTION}"
            )
        claim_run_dir(root, overwrite=True)  # only ever deletes a fedlora run (ownership.RUN)
        write_record(root, record)
        return 0

    def _never_completed_a_round(self) -> bool:
        try:
            record = read_record(self.tree.root)
        except InputError:
            return False
        return record.command == "rounds" and last_recorded_round(self.tree) == 0

    def _resume(self, config: RoundsConfig, record: dict[str, Any]) -> int:
        """Check the run, then the round it continues from (integrity.check_round), and only then discard
        what came after that round."""
        root = self.tree.root
        previous = read_record(root)
        if previous.command != "rounds":
            raise InputError(
                f"--resume: {root} is not a `fedlora rounds` run (its run.json says {previous.command!r})"
            )
        _check_same_run(previous, record)
        last = last_recorded_round(self.tree)
        done = last if config.resume_from_round is None else config.resume_from_round
        if done > config.rounds:
            raise InputError(
                f"--rounds {config.rounds}, but {complete_rounds(root, done)}: ask for more rounds, or "
                f"go back with --resume-from-round N"
            )
        if done > last:
            complete = f"its last complete round is {last}" if last else "no round of it is complete"
            raise InputError(f"--resume-from-round {done}: {root} has no complete round {done} ({complete})")
        # Each complete round's global/metrics.json holds its whole history row, so history.jsonl is
        # rebuilt from them: it can never disagree with the rounds actually on disk (round 0, the
        # starting adapter's evaluation, when it was made).
        first = 0 if (self.tree.global_dir(0) / METRICS).is_file() else 1
        rows = [self._history_row(r) for r in range(first, done + 1)]
        if done:
            check_round(self.tree, done)
        self.tree.discard_after(done)
        self.history = rows
        write_history(root, rows)
        # What changed in the experiment (not where it is written: --run-name vs --output-dir), between
        # both configs as today's RoundsConfig reads them (an older record's missing options are no change).
        # record_resume makes run.json's config the one this session continues with.
        changes = experiment_changes(
            config_changes(_normalised(previous.config), _normalised(record["config"]))
        )
        record_resume(root, argv=record["argv"], changes=changes, after_round=done)
        return done

    def _history_row(self, round_no: int) -> HistoryRow:
        try:
            return HistoryRow.from_json(read_round_record(self.tree, round_no))
        except (TypeError, ValueError):
            raise damaged(
                self.tree.global_dir(round_no) / METRICS, "is not a round record", round_no
            ) from None

    def _meta(self, origin: str, round_no: int, **extra: Any) -> dict[str, Any]:
        return {
            "task": self.task.name,
            "label_names": list(self.task.label_names),
            "origin": origin,
            "round": round_no,
            **extra,
        }

    def save_client(self, round_no: int, report: ClientReport) -> int:
        """The update a client sent (its metrics only when it sent nothing: `--aggregation local`)."""
        folder = self.tree.client_dir(round_no, report.client_id)
        size = 0
        if report.state:
            size = save_adapter(
                folder / ADAPTER_DIR,
                report.state,
                report.lora,
                base_model=self.base_model,
                meta=self._meta("client", round_no, client=report.client_id, examples=report.examples),
            )
        atomic.write_json(folder / METRICS, report.summary())
        return size

    def save_global(
        self, round_no: int, adapter: GlobalAdapter, server_state: dict[str, torch.Tensor]
    ) -> int:
        folder = self.tree.global_dir(round_no)
        size = save_adapter(
            folder / ADAPTER_DIR,
            adapter.state,
            adapter.lora,
            base_model=self.base_model,
            meta=self._meta("global", round_no),
        )
        if server_state:
            from safetensors.torch import save

            blob = save({k: v.detach().cpu().contiguous() for k, v in server_state.items()})
            atomic.write_bytes(folder / STATE_FILE, blob)
            size += len(blob)
        return size

    def complete_round(self, row: HistoryRow) -> None:
        """Write the round's record last: global/metrics.json marks the round complete (with the sha256 of
        every file the round wrote, for --resume), then history."""
        files = round_digests(self.tree, row.round)
        atomic.write_json(self.tree.global_dir(row.round) / METRICS, sealed(row.to_json(), files))
        self.history.append(row)
        write_history(self.tree.root, self.history)

    def load_global(self, round_no: int) -> tuple[GlobalAdapter, dict[str, torch.Tensor]]:
        """A complete round's global adapter and the strategy state saved with it."""
        from safetensors.torch import load_file

        folder = self.tree.global_dir(round_no)
        adapter = read_adapter(folder / ADAPTER_DIR)
        state = load_file(str(folder / STATE_FILE)) if (folder / STATE_FILE).is_file() else {}
        return GlobalAdapter(adapter.state, adapter.lora), state

    def finish(
        self,
        adapter: GlobalAdapter,
        metrics: dict[str, Any],
        rounds: int,
        extra: dict[str, Any],
        *,
        best: tuple[int, GlobalAdapter] | None = None,
    ) -> Path:
        """final/: the last global model as ONE plain PEFT adapter; best/ (--select best): the chosen round's;
        final/metrics.json: the final metrics (the shared shape) of the adapter the run reports."""
        final = self.tree.final_dir
        save_adapter(
            final / ADAPTER_DIR,
            adapter.state,
            adapter.lora,
            base_model=self.base_model,
            meta=self._meta("final", rounds),
        )
        reported = final / ADAPTER_DIR
        if best is not None:
            chosen, best_adapter = best
            reported = self.tree.best_dir / ADAPTER_DIR
            save_adapter(
                reported,
                best_adapter.state,
                best_adapter.lora,
                base_model=self.base_model,
                meta=self._meta("best", chosen),
            )
        shape = final_metrics(
            "rounds", self.task, metrics=metrics, adapter=reported, rounds=rounds, extra=extra
        )
        write_metrics(final / METRICS, shape)
        return reported


def _check_same_run(previous: RunRecord, record: dict[str, Any]) -> None:
    """--resume must continue the same experiment: same config (bar RESUME_FREE_KEYS) and same data.

    Both configs are read through RoundsConfig first, so a run recorded by an older fedlora (without
    options added since, which had their defaults) compares equal to the same run today."""

    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            if f"{prefix}{k}" in RESUME_FREE_KEYS:
                continue
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    before, after = _normalised(previous.config, previous.cwd), _normalised(record["config"])
    _check_schedule_span(before, after)
    old, new = flat(before), flat(after)
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if differ:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:4])
        raise InputError(
            f"--resume with a different configuration ({detail}): rerun with the original options"
        )
    for key in ("data_fingerprints", "shards_fingerprint"):
        if previous.extra.get(key) != record.get(key):
            raise InputError(
                f"--resume: the {key.replace('_', ' ')} changed since the run started; "
                f"resume with the same data and shards, or start a new run"
            )


def _check_schedule_span(old: dict[str, Any], new: dict[str, Any]) -> None:
    """--rounds may change on --resume because no round depends on the total — unless the learning rate
    follows one schedule over all rounds (--lr-schedule global-*), where the total sets every round's
    rates."""
    from fedlora_cli.training import GLOBAL_SCHEDULES

    train = old.get("train") if isinstance(old.get("train"), dict) else {}
    schedule = train.get("lr_schedule")
    if schedule in GLOBAL_SCHEDULES and old.get("rounds") != new.get("rounds"):
        raise InputError(
            f"--resume with --rounds {new.get('rounds')}: the run's --lr-schedule {schedule} spans its "
            f"{old.get('rounds')} rounds, so the rounds already done would have had other learning rates; "
            f"start a new run for another length (or use --lr-schedule per-turn or constant)"
        )


def _normalised(config: dict[str, Any], cwd: str | None = None) -> dict[str, Any]:
    """A recorded config with every option today's RoundsConfig has (missing ones at their defaults), its
    paths absolute against the folder it was run from (an older fedlora recorded them as typed)."""
    from fedlora_cli.config import from_dict, to_dict
    from fedlora_cli.options import absolute_paths

    try:
        return to_dict(absolute_paths(from_dict(RoundsConfig, config), cwd=cwd))
    except (TypeError, ValueError):
        return config
