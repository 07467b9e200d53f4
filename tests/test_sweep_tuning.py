"""Sweeps that tune and report honestly: [tune] chooses each cell's point on the validation split over tune seeds
(never on dev), records it and never re-tunes it; the report shows reported and last-round tables, a paired
t-test between methods over the same seeds, and tasks whose reference does not learn marked and left out."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
from clitools import one_error_line, run

from fedlora_cli.errors import FedloraError, InputError
from fedlora_cli.sweeps import (
    CellReport,
    compare_table,
    load_sweep,
    pivot,
    plan,
    report,
    run_sweep,
    write_report,
)
from fedlora_cli.sweeps.stats import paired_test

# ---------------------------------------------------------------------------------------------------
# a fake `execute`: run folders with the scores a table says, so every choice is hand-checkable


def fake_execute(score):
    """`execute(command, options)` writing a complete run folder whose reported adapter scores
    score(options) = (validation, dev, last round's dev) in accuracy."""
    calls: list[tuple[str, dict]] = []

    def execute(command: str, options: dict) -> None:
        calls.append((command, dict(options)))
        folder = Path(options["output-dir"])
        folder.mkdir(parents=True, exist_ok=True)
        validation, dev, last = score(options)
        record = {"command": command, "config": {"data": {"task": options["task"]}}, "status": "complete"}
        (folder / "run.json").write_text(json.dumps(record))
        metrics = {"command": command, "task": options["task"], "main_metric": "accuracy",
                   "metrics": {"accuracy": dev}, "validation": {"accuracy": validation},
                   "majority": {"accuracy": 0.5},
                   "selected": {"rule": "best", "metric": "accuracy", "round": 1, "dev": {"accuracy": dev},
                                "validation": {"accuracy": validation}},
                   "last": {"round": 3, "dev": {"accuracy": last}, "validation": {"accuracy": validation}}}  # fmt: skip
        path = folder / "final" / "metrics.json" if command == "rounds" else folder / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics))

    execute.calls = calls  # type: ignore[attr-defined]
    return execute


def to_toml(data: dict) -> str:
    """A sweep's tables as TOML (JSON's strings, numbers and lists are TOML's; tables become inline ones)."""

    def value(v):
        return (
            "{ " + ", ".join(f'"{k}" = {value(x)}' for k, x in v.items()) + " }"
            if isinstance(v, dict)
            else json.dumps(v)
        )

    return "".join(
        f"[{table}]\n" + "".join(f'"{k}" = {value(v)}\n' for k, v in body.items())
        for table, body in data.items()
    )


def tuned_sweep(tmp_path: Path, **tune) -> dict:
    data = {
        "sweep": {"name": "t", "root": str(tmp_path / "runs"), "seeds": [1, 2]},
        "base": {"task": "sst2", "validation-fraction": 0.1},
        "arms": {
            "fed": {"command": "rounds", "grid": {"aggregation": ["svd", "naive"]}},
            "central": {"command": "train"},
        },
        "tune": {"seeds": [11, 12], "grid": {"learning-rate": [0.001, 0.002, 0.005]}, **tune},
    }
    return data


# validation score per (cell, learning rate, tune seed); dev scores rank the points the other way round, so a
# choice that read dev would differ
VALIDATION = {
    ("svd", 0.001): (0.70, 0.72), ("svd", 0.002): (0.80, 0.78), ("svd", 0.005): (0.75, 0.79),   # 0.79 best
    ("naive", 0.001): (0.60, 0.60), ("naive", 0.002): (0.62, 0.66), ("naive", 0.005): (0.70, 0.69),  # 0.695
    ("central", 0.001): (0.5, 0.5), ("central", 0.002): (0.875, 0.625), ("central", 0.005): (0.75, 0.75),  # tie
}  # fmt: skip


def score(options: dict) -> tuple[float, float, float]:
    key = (options.get("aggregation", "central"), options["learning-rate"])
    if options["seed"] in (11, 12):
        validation = VALIDATION[key][options["seed"] - 11]
        return validation, 1.0 - validation, 0.5
    base = {"svd": 0.8, "naive": 0.7, "central": 0.9}[key[0]]  # report runs: dev by seed, last round lower
    return 0.6, base + 0.01 * options["seed"], base - 0.05


def test_the_chosen_point_is_the_best_mean_validation_score_and_runs_on_the_sweep_seeds(tmp_path):
    sweep = load_sweep(tmp_path / "t.toml", tuned_sweep(tmp_path))
    execute = fake_execute(score)
    outcome = run_sweep(sweep, execute)
    assert not outcome.failed
    record = json.loads((sweep.folder / "sweep.json").read_text())
    chosen = {cell: c["point"] for cell, c in record["tuning"].items()}
    assert chosen == {"fed_aggregation=svd": {"learning-rate": 0.002}, "fed_aggregation=naive": {"learning-rate": 0.005},
                      "central": {"learning-rate": 0.002}}  # central: 0.75 twice (exactly), the first of them  # fmt: skip
    assert record["tuning"]["fed_aggregation=svd"]["score"] == pytest.approx(0.79)
    # every tune run first (3 points × 2 tune seeds × 3 cells), then the cells on the sweep seeds
    commands = [
        (o["seed"], Path(o["output-dir"]).relative_to(sweep.folder).as_posix()) for _, o in execute.calls
    ]
    assert len(commands) == 18 + 6 and all(seed in (11, 12) for seed, _ in commands[:18])
    assert commands[0][1] == "tune/fed_aggregation=svd__learning-rate=0.001-seed11"
    report_runs = {path: o for (_, o), (_, path) in zip(execute.calls[18:], commands[18:], strict=True)}
    assert report_runs["fed_aggregation=naive-seed2"]["learning-rate"] == 0.005
    assert report_runs["central-seed1"]["learning-rate"] == 0.002
    assert {o["seed"] for o in report_runs.values()} == {1, 2}
    # the report: the chosen value per cell, and the whole tuning table with the choice marked
    write_report(sweep, report(sweep), figure=False)
    with open(sweep.folder / "report.csv") as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    assert rows["fed_aggregation=svd"]["learning-rate (tuned)"] == "0.002"
    with open(sweep.folder / "tuning.csv") as f:
        tuning = list(csv.DictReader(f))
    assert len(tuning) == 9
    svd = [r for r in tuning if r["cell"] == "fed_aggregation=svd"]
    assert [r["learning-rate"] for r in svd] == ["0.001", "0.002", "0.005"]
    assert [r["chosen"] for r in svd] == ["", "✓", ""]
    assert float(svd[2]["validation mean"]) == pytest.approx(0.77)
    assert float(svd[2]["validation std"]) == pytest.approx(statistics.stdev([0.75, 0.79]), abs=5e-5)
    assert "✓" in (sweep.folder / "tuning.md").read_text()


def test_a_resumed_sweep_never_retunes_and_interrupted_tune_runs_resume(tmp_path):
    data = tuned_sweep(tmp_path)
    sweep = load_sweep(tmp_path / "t.toml", data)

    def interrupt_on_the_fourth(options):
        if len(first.calls) == 4:
            raise KeyboardInterrupt
        return score(options)

    first = fake_execute(interrupt_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, first)
    assert json.loads((sweep.folder / "sweep.json").read_text())["status"] == "interrupted"
    # the three complete tune runs are kept; the fourth is planned again
    tune_plan = [p for p in plan(sweep) if p.stage == "tune"]
    assert [p.action for p in tune_plan[:4]] == ["skip", "skip", "skip", "run"]
    assert [p for p in plan(sweep) if p.waits]  # the cells' runs wait for their choice
    second = fake_execute(score)
    run_sweep(sweep, second)
    assert len(second.calls) == 18 - 3 + 6
    choices = json.loads((sweep.folder / "sweep.json").read_text())["tuning"]
    # run again: nothing is tuned again, not even planned, even with the tune folders gone
    import shutil

    shutil.rmtree(sweep.folder / "tune")
    assert [p.stage for p in plan(sweep)] == ["report"] * 6 and not any(p.waits for p in plan(sweep))
    third = fake_execute(score)
    outcome = run_sweep(sweep, third)
    assert third.calls == [] and len(outcome.skipped) == 6
    assert {
        k: v["point"] for k, v in json.loads((sweep.folder / "sweep.json").read_text())["tuning"].items()
    } == {k: v["point"] for k, v in choices.items()}
    # a [tune] table changed since: the recorded choice is not reused, nor silently replaced
    data["tune"]["grid"]["learning-rate"] = [0.001, 0.01]
    with pytest.raises(InputError, match="was tuned with other points"):
        plan(load_sweep(tmp_path / "t.toml", data))


def test_runs_made_before_tune_was_added_are_refused_before_anything_runs(tmp_path):
    data = tuned_sweep(tmp_path)
    data["base"]["learning-rate"] = 0.001  # what the points of [tune] replace
    plain = {k: v for k, v in data.items() if k != "tune"}
    run_sweep(load_sweep(tmp_path / "t.toml", plain), fake_execute(score))
    execute = fake_execute(score)
    with pytest.raises(InputError, match="its cell's tuning is not recorded"):
        run_sweep(load_sweep(tmp_path / "t.toml", data), execute)
    assert execute.calls == []


def test_a_failed_tune_run_holds_back_its_cell_only_until_it_succeeds(tmp_path):
    sweep = load_sweep(tmp_path / "t.toml", tuned_sweep(tmp_path))

    def fail_one(options):
        if (
            options.get("aggregation") == "naive"
            and options["learning-rate"] == 0.002
            and options["seed"] == 12
        ):
            raise FedloraError("out of memory")
        return score(options)

    execute = fake_execute(fail_one)
    outcome = run_sweep(sweep, execute)
    assert list(outcome.failed) == ["fed_aggregation=naive__learning-rate=0.002-seed12"]
    assert outcome.waiting == ["fed_aggregation=naive"]
    ran = {Path(o["output-dir"]).name for _, o in execute.calls}
    assert "fed_aggregation=naive-seed1" not in ran and "fed_aggregation=svd-seed1" in ran
    record = json.loads((sweep.folder / "sweep.json").read_text())
    assert record["status"] == "failed" and "fed_aggregation=naive" not in record["tuning"]
    again = fake_execute(score)
    outcome = run_sweep(sweep, again)
    assert [Path(o["output-dir"]).name for _, o in again.calls] == [
        "fed_aggregation=naive__learning-rate=0.002-seed12", "fed_aggregation=naive-seed1",
        "fed_aggregation=naive-seed2"]  # fmt: skip
    assert json.loads((sweep.folder / "sweep.json").read_text())["tuning"]["fed_aggregation=naive"][
        "point"
    ] == {"learning-rate": 0.005}


def test_tune_grids_per_arm_and_what_is_refused(tmp_path):
    data = tuned_sweep(tmp_path, arms={"fed": {"lora-alpha": [16, 64], "learning-rate": [0.01]},
                                       "central": {"learning-rate": []}})  # fmt: skip
    sweep = load_sweep(tmp_path / "t.toml", data)
    fed = sweep.cells[0]
    # the arm's list replaces the common one for that option, a new option adds a dimension, [] drops one
    assert [p.options for p in sweep.tune_points(fed)] == [{"learning-rate": 0.01, "lora-alpha": 16},
                                                           {"learning-rate": 0.01, "lora-alpha": 64}]  # fmt: skip
    assert sweep.tune_points(sweep.cells[2]) == ()  # central: not tuned
    assert sweep.at_point(fed, {"learning_rate": 0.5}).options["learning_rate"] == 0.5

    def refused(change, pattern):
        bad = tuned_sweep(tmp_path)
        change(bad)
        with pytest.raises(InputError, match=pattern):
            load_sweep(tmp_path / "t.toml", bad)

    refused(lambda d: d["base"].pop("validation-fraction"), "tuning chooses on the validation split")
    refused(lambda d: d["tune"].update(seeds=[2, 11]), "seed 2 is also a \\[sweep\\] seed")
    refused(lambda d: d["tune"]["grid"].update(aggregation=["svd"]), "'aggregation' is both in the grid")
    refused(lambda d: d["tune"].update(arms={"nope": {"lora-r": [2]}}), "names no arm")
    refused(lambda d: d["tune"].update(metric="pearson"), "sst2 does not score")
    refused(lambda d: d["tune"]["grid"].update(seed=[1, 2]), "is set by the sweep")
    refused(lambda d: d["tune"].update(grid={}), "no option to tune")
    refused(lambda d: d["tune"]["grid"].update({"learning-rate": [0.001, 0.0010]}), "share the folder name")
    refused(
        lambda d: d["sweep"].update({"max-runs": 20}), "3 cells × 2 seed\\(s\\) \\+ 18 tune runs = 24 runs"
    )


def test_without_a_validation_split_the_cli_refuses_before_anything_runs(tmp_path):
    file = tmp_path / "s.toml"
    file.write_text(f'[sweep]\nroot = "{tmp_path}"\nseeds = [1]\n[base]\ntask = "sst2"\n'
                    '[arms.a]\ncommand = "train"\n[tune]\nseeds = [9]\ngrid = { learning-rate = [1e-3, 2e-3] }\n')  # fmt: skip
    one_error_line(run("sweep", file), 2, "set validation-fraction (or validation-examples)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"]
    file.write_text(file.read_text().replace('task = "sst2"', 'task = "sst2"\nvalidation-fraction = 0.1'))
    listed = run("sweep", file, "--dry-run")
    assert listed.exit_code == 0, listed.stderr
    lines = [" ".join(line.split()) for line in listed.stderr.splitlines()]
    assert [line.split()[1].split("/s/")[1] for line in lines] == [
        "tune/a__learning-rate=0.001-seed9", "tune/a__learning-rate=0.002-seed9", "a-seed1"]  # fmt: skip
    assert lines[2].endswith("--seed 1 (with the point its tuning chooses)")
    bad = file.read_text().replace("learning-rate = [1e-3, 2e-3]", 'learning-rate = ["fast"]')
    file.write_text(bad)
    one_error_line(
        run("sweep", file, "--dry-run"),
        2,
        "tune point learning-rate=fast: Invalid value for '--learning-rate'",
    )


# ---------------------------------------------------------------------------------------------------
# honest reporting


def test_the_paired_t_test_by_hand():
    from scipy.stats import t as student

    svd, naive = {1: 0.80, 2: 0.82, 3: 0.84}, {1: 0.78, 2: 0.81, 3: 0.80}
    d = [-0.02, -0.01, -0.04]
    t = statistics.fmean(d) / (statistics.stdev(d) / math.sqrt(3))
    result = paired_test(naive, svd)
    assert result.n == 3 and result.difference == pytest.approx(statistics.fmean(d))
    assert result.t == pytest.approx(t) and result.p == pytest.approx(2 * student.sf(abs(t), 2))
    assert result.p > 0.05 and result.verdict == "within noise"
    clear = paired_test({1: 0.70, 2: 0.71, 3: 0.69, 4: 0.70}, {1: 0.80, 2: 0.82, 3: 0.80, 4: 0.81})
    assert clear.p < 0.05 and clear.verdict == "worse"
    assert paired_test({1: 0.7, 3: 0.8}, {1: 0.8, 2: 0.8}).verdict == "n/a"  # one paired seed
    assert paired_test({1: 0.7, 2: 0.8}, {1: 0.7, 2: 0.8}).verdict == "within noise"  # the same results
    assert paired_test({1: 0.5, 2: 0.75}, {1: 0.75, 2: 1.0}).verdict == "n/a"  # a constant offset: no spread


def table_sweep(tmp_path, **table):
    data = {
        "sweep": {"seeds": [1, 2, 3], "table": {"rows": ["arm", "aggregation"], "columns": "task",
                                                 "reference": "central", **table}},
        "arms": {"central": {"command": "train", "grid": {"task": ["sst2", "rte"]}},
                 "fed": {"command": "rounds", "grid": {"task": ["sst2", "rte"], "aggregation": ["svd", "naive"]}}},
    }  # fmt: skip
    return load_sweep(tmp_path / "t.toml", data)


VALUES = {  # cell -> seed -> accuracy; rte's majority class scores 0.527
    "central_task=sst2": {1: 0.90, 2: 0.92, 3: 0.91}, "central_task=rte": {1: 0.53, 2: 0.54, 3: 0.52},
    "fed_task=sst2_aggregation=svd": {1: 0.80, 2: 0.82, 3: 0.84},
    "fed_task=sst2_aggregation=naive": {1: 0.78, 2: 0.81, 3: 0.80},
    "fed_task=rte_aggregation=svd": {1: 0.50, 2: 0.52, 3: 0.53},
    "fed_task=rte_aggregation=naive": {1: 0.47, 2: 0.47, 3: 0.47},
}  # fmt: skip
MAJORITY = {"sst2": 0.51, "rte": 0.527}


def cell_reports(sweep, last=None):
    return [CellReport(c, "accuracy", VALUES[c.name], 3, last=(last or {}).get(c.name, {}),
                       majority=MAJORITY[c.options["task"]], has_last=bool(last)) for c in sweep.cells]  # fmt: skip


def pm(values):
    return f"{100 * statistics.fmean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def test_a_task_the_reference_does_not_learn_is_marked_and_left_out_of_the_average(tmp_path):
    sweep = table_sweep(tmp_path)
    header, rows = pivot(sweep, cell_reports(sweep))
    # central on rte: 53.0 against a majority class of 52.7, less than 2 points above it
    assert header == ["arm", "aggregation", "sst2 (accuracy)", "rte (accuracy): does not learn at this budget",
                      "average (without rte)", "Δ vs central"]  # fmt: skip
    assert rows[0][2:5] == [
        pm([0.90, 0.92, 0.91]),
        pm([0.53, 0.54, 0.52]),
        pm([0.90, 0.92, 0.91]),
    ]  # still shown
    assert rows[1][4] == pm([0.80, 0.82, 0.84])  # svd's average is its sst2 alone
    gap = 100 * (statistics.fmean([0.80, 0.82, 0.84]) - statistics.fmean([0.90, 0.92, 0.91]))
    assert rows[1][5] == f"{gap:+.1f}"
    from fedlora_cli.sweeps import pivot_table

    note = " ".join(pivot_table(sweep, cell_reports(sweep)).notes)
    assert "by 2 points (learn-margin = 0.02)" in note and "rte: central 53.0, majority class 52.7" in note
    # a smaller margin: rte counts, and the average is over both tasks again
    lenient = table_sweep(tmp_path, **{"learn-margin": 0.001})
    header, rows = pivot(lenient, cell_reports(lenient))
    assert header[3] == "rte (accuracy)" and header[4] == "average"
    assert rows[0][4] == pm([statistics.fmean([a, b]) for a, b in zip([0.90, 0.92, 0.91], [0.53, 0.54, 0.52],
                                                                        strict=True)])  # fmt: skip


def test_the_paired_comparison_within_each_group_against_its_best(tmp_path):
    sweep = table_sweep(tmp_path, compare="aggregation")
    table = compare_table(sweep, cell_reports(sweep))
    assert table.header == ["arm", "task", "aggregation", "metric", "seeds", "mean ± std", "Δ vs best", "t", "p",
                            "verdict"]  # fmt: skip
    assert "scipy.stats.ttest_rel, two-sided" in table.notes[0]
    rows = {(r[1], r[2]): r for r in table.rows}
    assert len(table.rows) == 4  # central has no aggregation: nothing to compare
    assert rows[("sst2", "svd")][-1] == "best" and rows[("rte", "svd")][-1] == "best"
    sst2 = paired_test(VALUES["fed_task=sst2_aggregation=naive"], VALUES["fed_task=sst2_aggregation=svd"])
    assert rows[("sst2", "naive")][6:] == [f"{100 * sst2.difference:+.1f}", f"{sst2.t:.2f}", f"{sst2.p:.3g}",
                                           "within noise"]  # fmt: skip
    rte = paired_test(VALUES["fed_task=rte_aggregation=naive"], VALUES["fed_task=rte_aggregation=svd"])
    assert rte.p < 0.05 and rows[("rte", "naive")][-1] == "worse"


def test_the_last_round_tables_beside_the_reported_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep = table_sweep(tmp_path)
    last = {name: {s: v - 0.1 for s, v in values.items()} for name, values in VALUES.items()}
    cells = cell_reports(sweep, last)
    sweep.folder.mkdir(parents=True)
    written = write_report(sweep, cells, figure=False)
    assert {p.name for p in written.values()} == {"report.csv", "report.md", "report-last.csv", "table.csv",
                                                  "table-last.csv", "table.md"}  # fmt: skip
    with open(sweep.folder / "report-last.csv") as f:
        rows = {r["cell"]: r for r in csv.DictReader(f)}
    assert float(rows["central_task=sst2"]["mean"]) == pytest.approx(
        statistics.fmean([0.80, 0.82, 0.81]), abs=5e-5
    )
    header, last_rows = pivot(sweep, cells, last=True)
    assert last_rows[0][2] == pm([0.80, 0.82, 0.81])
    assert header[3].endswith("does not learn at this budget")  # decided on the reported values, for both
    md = (sweep.folder / "report.md").read_text()
    assert "## the last round" in md


def test_run_folders_give_the_reported_last_and_majority_values_and_report_reprints_them(tmp_path):
    data = tuned_sweep(tmp_path)
    data["sweep"]["table"] = {"rows": ["arm", "aggregation"], "columns": "task", "reference": "central",
                              "compare": "aggregation"}  # fmt: skip
    file = tmp_path / "t.toml"
    file.write_text(to_toml(data))
    sweep = load_sweep(file, data)
    run_sweep(sweep, fake_execute(score))
    cells = {c.cell.name: c for c in report(sweep)}
    svd = cells["fed_aggregation=svd"]
    assert svd.values == {1: pytest.approx(0.81), 2: pytest.approx(0.82)} and svd.last == {1: 0.75, 2: 0.75}
    assert svd.majority == 0.5 and svd.tuned == {"learning-rate": 0.002}
    result = run("sweep", file, "--report")
    assert result.exit_code == 0, result.stderr
    flat = " ".join(result.stdout.split())
    for text in ("last round", "tuning: validation", "paired comparison of aggregation", "ttest_rel",
                 "learning-rate=0.002", "tuning.csv", "compare.csv", "table-last.csv"):  # fmt: skip
        assert text in flat, text


# ---------------------------------------------------------------------------------------------------
# end to end on the tiny model: the dev split never enters the choice


@pytest.mark.slow
def test_permuting_dev_labels_changes_no_tuning_choice(tiny_model, glue_dir, tmp_path):
    from test_selection import permuted_dev

    shuffled = permuted_dev(glue_dir, tmp_path / "permuted")
    folders = {}
    for name, glue in (("real", glue_dir), ("permuted", shuffled)):
        file = tmp_path / f"{name}.toml"
        file.write_text(f"""
[sweep]
root = "{tmp_path / "runs"}"
seeds = [1]
[base]
task = "sst2"
model = "{tiny_model}"
data-dir = "{glue}"
precision = "fp32"
batch-size = 16
validation-fraction = 0.15
select = "best"
[arms.central]
command = "train"
epochs = 3
[tune]
seeds = [7]
grid = {{ learning-rate = [2e-3, 2e-2] }}
""")
        result = run("sweep", file)
        assert result.exit_code == 0, result.stderr
        folders[name] = tmp_path / "runs" / name
    records = {k: json.loads((f / "sweep.json").read_text()) for k, f in folders.items()}
    assert records["real"]["tuning"]["central"]["name"] == records["permuted"]["tuning"]["central"]["name"]
    assert (
        records["real"]["tuning"]["central"]["scores"] == records["permuted"]["tuning"]["central"]["scores"]
    )

    def final(kind, point):
        path = folders[kind] / "tune" / f"central__learning-rate={point}-seed7" / "metrics.json"
        return json.loads(path.read_text())

    for point in ("0.002", "0.02"):  # same validation scores, other dev scores
        assert final("real", point)["validation"] == final("permuted", point)["validation"]
    assert any(final("real", p)["metrics"] != final("permuted", p)["metrics"] for p in ("0.002", "0.02"))
    # the choice is what the validation scores say
    scores = {p: final("real", p)["validation"]["accuracy"] for p in ("0.002", "0.02")}
    best = max(scores, key=lambda p: (scores[p], p == "0.002"))  # a tie: the first in grid order
    assert records["real"]["tuning"]["central"]["name"] == f"learning-rate={best}"
    run_options = json.loads((folders["real"] / "central-seed1" / "run.json").read_text())["shell"]
    assert f"--learning-rate {float(best)}" in run_options or f"--learning-rate {best}" in run_options


def test_a_per_client_comparison_chooses_on_the_clients_local_validation_splits(tmp_path):
    """With --client-validation-fraction the score is the clients' mean on their own validation splits (local
    tests and dev rank the points the other way round)."""
    clients = {0.001: (0.9, 0.6), 0.002: (0.7, 0.8)}  # lr -> (validation mean, local-test mean)

    def execute(command: str, options: dict) -> None:
        folder = Path(options["output-dir"])
        (folder / "final").mkdir(parents=True, exist_ok=True)
        (folder / "run.json").write_text(json.dumps({"command": command, "status": "complete",
                                                     "config": {"data": {"task": "sst2"}}}))  # fmt: skip
        held, test = clients[options["learning-rate"]]
        stats = {"metric": "accuracy", "model": "personal", "n": 3, "mean": test,
                 "validation": {"metric": "accuracy", "model": "personal", "n": 3, "mean": held}}  # fmt: skip
        (folder / "final" / "metrics.json").write_text(json.dumps(
            {"command": command, "task": "sst2", "main_metric": "accuracy", "metrics": {},
             "validation": {"accuracy": 1.0 - held}, "per_client": stats}))  # fmt: skip

    data = {
        "sweep": {"name": "p", "root": str(tmp_path / "runs"), "seeds": [1]},
        "base": {"task": "sst2", "client-test-fraction": 0.2, "client-validation-fraction": 0.2},
        "arms": {"fedsa": {"command": "rounds", "aggregation": "fedsa"}},
        "tune": {"seeds": [11], "grid": {"learning-rate": [0.001, 0.002]}},
    }
    sweep = load_sweep(tmp_path / "p.toml", data)
    assert not run_sweep(sweep, execute).failed
    record = json.loads((sweep.folder / "sweep.json").read_text())["tuning"]["fedsa"]
    assert record["point"] == {"learning-rate": 0.001} and record["score"] == pytest.approx(0.9)
    del data["base"]["client-validation-fraction"]
    with pytest.raises(InputError, match="client-validation-fraction"):
        load_sweep(tmp_path / "q.toml", {**data, "sweep": {**data["sweep"], "name": "q"}})
