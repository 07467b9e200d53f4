"""`fedlora sweep`: a 2 × 2 grid × 2 seeds on the fixture; its report equals mean/std computed by hand."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
from clitools import one_error_line, run


def sweep_file(path: Path, tiny_model, glue_dir, shards, root, *, lr: str = "1e-2") -> Path:
    path.write_text(f"""
[sweep]
name = "grid"
root = "{root}"
seeds = [1, 2]

[base]
task = "sst2"
model = "{tiny_model}"
data-dir = "{glue_dir}"
max-train-samples = 64
max-eval-samples = 48
precision = "fp32"
learning-rate = {lr}
batch-size = 16

[arms.central]
command = "train"
epochs = 2
grid = {{ lora-r = [2, 4] }}

[arms.fed]
command = "rounds"
shards = "{shards}"
rounds = 2
local-epochs = 1
grid = {{ aggregation = ["svd", "naive"] }}
""")
    return path


CELLS = ["central_lora-r=2", "central_lora-r=4", "fed_aggregation=svd", "fed_aggregation=naive"]


@pytest.fixture(scope="module")
def swept(tiny_model, glue_dir, tmp_path_factory):
    from test_rounds import write_manifests

    home = tmp_path_factory.mktemp("sweep")
    order = np.random.default_rng(0).permutation(64).tolist()
    shards = write_manifests(home / "shards", [order[:24], order[24:]], total=64)
    file = sweep_file(home / "grid.toml", tiny_model, glue_dir, shards, home / "runs")
    result = run("sweep", file)
    assert result.exit_code == 0, result.stderr
    return home, file, home / "runs" / "grid", result


def _by_hand(folder: Path, cell: str) -> list[float]:
    values = []
    for seed in (1, 2):
        run_dir = folder / f"{cell}-seed{seed}"
        final = run_dir / "final" / "metrics.json"
        if final.is_file():  # rounds: final/metrics.json
            data = json.loads(final.read_text())
            values.append(data["metrics"]["accuracy"] if "metrics" in data else data["accuracy"])
        else:  # train: metrics.json
            values.append(json.loads((run_dir / "metrics.json").read_text())["metrics"]["accuracy"])
    return values


def _report(folder: Path) -> dict[str, dict[str, str]]:
    with open(folder / "report.csv") as f:
        return {row["cell"]: row for row in csv.DictReader(f)}


@pytest.mark.slow
def test_sweep_runs_every_cell_and_seed_as_normal_runs(swept):
    home, file, folder, result = swept
    runs = sorted(p.name for p in folder.iterdir() if p.is_dir())
    assert runs == sorted(f"{c}-seed{s}" for c in CELLS for s in (1, 2))
    assert {"sweep.json", "report.csv", "report.md", "report.png"} <= {p.name for p in folder.iterdir()}
    record = json.loads((folder / "sweep.json").read_text())
    assert record["status"] == "complete" and record["file"] == str(file) and record["seeds"] == [1, 2]
    assert [r["status"] for r in record["runs"]] == ["complete"] * 8
    one = json.loads((folder / "fed_aggregation=naive-seed2" / "run.json").read_text())
    assert one["command"] == "rounds" and one["config"]["aggregation"]["method"] == "naive"
    assert one["config"]["train"]["seed"] == 2 and one["config"]["rounds"] == 2
    assert (
        "--seed 2" in one["shell"]
        and f"--output-dir {folder / 'fed_aggregation=naive-seed2'}" in one["shell"]
    )
    listed = json.loads(run("runs", "list", folder, "--json").stdout)
    assert len(listed) == 8 and {r["status"] for r in listed} == {"complete"}


@pytest.mark.slow
def test_sweep_report_equals_mean_and_std_by_hand(swept):
    _, _, folder, result = swept
    report = _report(folder)
    assert list(report) == CELLS
    for cell in CELLS:
        values = _by_hand(folder, cell)
        row = report[cell]
        assert row["n"] == "2/2" and row["metric"] == "accuracy"
        assert float(row["mean"]) == pytest.approx(statistics.fmean(values), abs=5e-5)
        assert float(row["std"]) == pytest.approx(statistics.stdev(values), abs=5e-5)
        assert [float(row["seed 1"]), float(row["seed 2"])] == pytest.approx(values, abs=5e-5)
    assert (
        report["central_lora-r=4"]["lora-r"] == "4" and report["fed_aggregation=svd"]["aggregation"] == "svd"
    )
    md = (folder / "report.md").read_text()
    assert "| central_lora-r=2 | central | train |" in md
    flat = " ".join(result.stdout.split())
    first = report["central_lora-r=2"]
    assert f"{first['mean']} ± {first['std']}" in flat  # the Rich table says the same
    assert (folder / "report.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_rerunning_skips_complete_runs_and_resumes_interrupted_ones(swept, tmp_path):
    home, file, folder, _ = swept
    before = _report(folder)
    records = {p.name: (p / "run.json").read_text() for p in folder.iterdir() if p.is_dir()}
    again = run("sweep", file)
    assert again.exit_code == 0, again.stderr
    assert "8 of 8 runs complete already" in again.stderr
    assert {p.name: (p / "run.json").read_text() for p in folder.iterdir() if p.is_dir()} == records

    # a train run killed mid-way, and a federated one stopped after its last round but before its end
    train = folder / "central_lora-r=2-seed2"
    (train / "metrics.json").unlink()
    shutil.rmtree(train / "adapter")
    fed = folder / "fed_aggregation=naive-seed1"
    shutil.rmtree(fed / "final")
    for run_dir in (train, fed):
        record = json.loads((run_dir / "run.json").read_text())
        record["status"] = "interrupted"
        (run_dir / "run.json").write_text(json.dumps(record))
    resumed = run("sweep", file)
    assert resumed.exit_code == 0, resumed.stderr
    flat = " ".join(resumed.stderr.split())
    assert "6 of 8 runs complete already" in flat
    assert (
        "starting again central_lora-r=2-seed2 (train)" in flat
        and "resuming fed_aggregation=naive-seed1 (rounds)" in flat
    )
    assert json.loads((fed / "run.json").read_text())["started"] == json.loads(records[fed.name])["started"]
    assert _report(folder) == before  # bit-identical runs: the same table

    only = run("sweep", file, "--report")
    assert only.exit_code == 0 and "report.csv" in only.stdout


@pytest.mark.slow
def test_a_changed_sweep_file_or_a_bad_one_is_refused(swept, tiny_model, glue_dir, tmp_path):
    home, file, folder, _ = swept
    changed = sweep_file(
        tmp_path / "grid.toml", tiny_model, glue_dir, home / "shards", home / "runs", lr="2e-2"
    )
    one_error_line(run("sweep", changed), 2, "made with other options (learning-rate: 0.01 -> 0.02)")
    bad = tmp_path / "bad.toml"
    bad.write_text('[base]\ntask = "sst2"\n[arms.a]\ncommand = "train"\nlearnin-rate = 1\n')
    one_error_line(run("sweep", bad), 2, "unknown option 'learnin-rate' for `fedlora train`")
    bad.write_text('[arms.a]\ncommand = "train"\ntask = "sst2"\nseed = 3\n')
    one_error_line(run("sweep", bad), 2, "'seed' is set by the sweep")
    bad.write_text('[arms.a]\ncommand = "train"\ntask = "sst2"\nlora-r = "four"\n')
    one_error_line(run("sweep", bad), 2, "cell a: Invalid value for '--lora-r'")
    bad.write_text('[arms.a]\ncommand = "shard"\n')
    one_error_line(run("sweep", bad), 2, "command must be one of train, baseline, rounds")


@pytest.mark.slow
def test_a_sweep_rounds_run_reruns_bit_identically(swept):
    _, _, folder, _ = swept
    result = run("runs", "rerun", folder / "fed_aggregation=svd-seed1", "--verify")
    assert result.exit_code == 0, result.stderr
    assert "verified: bit-identical" in result.stdout


def test_the_pivot_table_is_mean_and_std_over_seeds_by_column_with_the_average_and_its_gap(
    tmp_path, monkeypatch
):
    """[sweep.table]: rows = settings, columns = tasks, × 100; the average is over each seed's average."""
    from fedlora_cli.sweeps import CellReport, load_sweep, pivot

    monkeypatch.setenv("FEDLORA_TEST_MODEL", "/models/m")
    data = {
        "sweep": {
            "seeds": [1, 2],
            "table": {"rows": ["arm", "aggregation"], "columns": "task", "reference": "central"},
        },
        "base": {"model": "${FEDLORA_TEST_MODEL}"},
        "arms": {
            "central": {"command": "train", "grid": {"task": ["sst2", "rte"]}},
            "fed": {"command": "rounds", "grid": {"task": ["sst2", "rte"], "aggregation": ["svd"]}},
        },
    }
    sweep = load_sweep(tmp_path / "t.toml", data)
    assert all(c.options["model"] == "/models/m" for c in sweep.cells)  # ${VAR} from the environment
    values = {  # cell -> seed -> value
        "central_task=sst2": {1: 0.90, 2: 0.92}, "central_task=rte": {1: 0.60, 2: 0.64},
        "fed_task=sst2_aggregation=svd": {1: 0.88, 2: 0.86}, "fed_task=rte_aggregation=svd": {1: 0.58, 2: 0.60},
    }  # fmt: skip
    cells = [CellReport(c, "accuracy", values[c.name], 2) for c in sweep.cells]
    header, rows = pivot(sweep, cells)
    assert header == ["arm", "aggregation", "sst2 (accuracy)", "rte (accuracy)", "average", "Δ vs central"]
    central_avg = [statistics.fmean([0.90, 0.60]), statistics.fmean([0.92, 0.64])]
    fed_avg = [statistics.fmean([0.88, 0.58]), statistics.fmean([0.86, 0.60])]

    def pm(v):
        return f"{100 * statistics.fmean(v):.1f} ± {100 * statistics.stdev(v):.1f}"

    assert rows[0] == ["central", "–", pm([0.90, 0.92]), pm([0.60, 0.64]), pm(central_avg), "+0.0"]
    gap = 100 * (statistics.fmean(fed_avg) - statistics.fmean(central_avg))
    assert rows[1] == ["fed", "svd", pm([0.88, 0.86]), pm([0.58, 0.60]), pm(fed_avg), f"{gap:+.1f}"]
    monkeypatch.delenv("FEDLORA_TEST_MODEL")
    with pytest.raises(Exception, match="needs the environment variable FEDLORA_TEST_MODEL"):
        load_sweep(tmp_path / "t.toml", data)


def test_a_per_value_figure_leaves_the_shared_option_out_of_its_legend():
    from fedlora_cli.sweeps import _legend

    assert _legend("iid3_task=sst2_aggregation=svd", "task=sst2") == "iid3_aggregation=svd"
    assert _legend("central_task=sst2", "task=sst2") == "central"
    assert _legend("central_task=sst2", None) == "central_task=sst2"
    assert _legend("task=sst2", "task=sst2") == "task=sst2"  # never an empty label


def test_one_figure_per_value_and_the_reference_without_that_option_in_each(tmp_path, monkeypatch):
    """figures = "partition": a figure for iid and one for dirichlet, each with the centralised arm (which has no
    --partition) as its reference; no figure for 'no partition'."""
    pytest.importorskip("matplotlib")
    from fedlora_cli import sweeps
    from fedlora_cli.sweeps import reporting

    monkeypatch.chdir(tmp_path)  # the sweep's folder is runs/<name>, under the working directory
    data = {
        "sweep": {"name": "s", "seeds": [1], "table": {"rows": ["arm", "partition"], "columns": "task",
                                                        "reference": "central", "figures": "partition"}},
        "base": {"task": "sst2"},
        "arms": {"central": {"command": "train"},
                 "fed": {"command": "rounds", "grid": {"partition": ["iid", "dirichlet"]}}},
    }  # fmt: skip
    sweep = sweeps.load_sweep(tmp_path / "s.toml", data)
    sweep.folder.mkdir(parents=True, exist_ok=True)
    cells = [sweeps.CellReport(c, "accuracy", {1: 0.8}, 1) for c in sweep.cells]
    drawn = {}
    monkeypatch.setattr(reporting, "plot_sweep", lambda sw, subset, path, **kw: drawn.setdefault(
        path.name, sorted(c.cell.name for c in subset)) and path)  # fmt: skip
    sweeps.write_report(sweep, cells)
    assert drawn["report-iid.png"] == ["central", "fed_partition=iid"]
    assert drawn["report-dirichlet.png"] == ["central", "fed_partition=dirichlet"]
    assert set(drawn) == {"report.png", "report-iid.png", "report-dirichlet.png"}


def test_a_grid_is_counted_before_it_is_built_and_refused_past_the_limit(tmp_path):
    import time

    huge = tmp_path / "huge.toml"
    grid = ", ".join(f"o{i} = [{', '.join(str(v) for v in range(30))}]" for i in range(5))
    huge.write_text(f'[arms.a]\ncommand = "train"\ntask = "sst2"\ngrid = {{ {grid} }}\n')
    started = time.monotonic()
    one_error_line(run("sweep", huge, "--dry-run"), 2, "24,300,000 cells × 1 seed(s) = 24,300,000 runs, more than "
                                                        "the limit of 10,000")  # fmt: skip
    assert time.monotonic() - started < 10
    small = tmp_path / "small.toml"
    body = '[arms.a]\ncommand = "train"\ntask = "sst2"\ngrid = { lora-r = [1, 2, 3], epochs = [1, 2, 3] }\n'
    small.write_text(f'[sweep]\nroot = "{tmp_path}"\nseeds = [1, 2]\nmax-runs = 17\n' + body)
    one_error_line(run("sweep", small, "--dry-run"), 2, "set max-runs = 18 in [sweep] if you mean it")
    small.write_text(f'[sweep]\nroot = "{tmp_path}"\nseeds = [1, 2]\nmax-runs = 18\n' + body)
    listed = run("sweep", small, "--dry-run")
    assert listed.exit_code == 0, listed.stderr
    assert len([line for line in listed.stderr.splitlines() if line.startswith("run ")]) == 18
    small.write_text('[sweep]\nmax-runs = "many"\n' + body)
    one_error_line(run("sweep", small, "--dry-run"), 2, "max-runs must be a whole number >= 1")


def test_a_report_the_sweep_did_not_write_is_never_replaced(swept, tmp_path):
    home, file, folder, _ = swept
    # the sweep's own reports are replaced when it reports again (their digests are in sweep.json)
    again = run("sweep", file, "--report")
    assert again.exit_code == 0, again.stderr
    # a file the user put there, or a report the user edited, is not the sweep's to replace
    mine = tmp_path / "s.toml"
    mine.write_text(
        f'[sweep]\nname = "mine"\nroot = "{tmp_path}"\n[arms.a]\ncommand = "train"\ntask = "sst2"\n'
    )
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "report.md").write_text("my own notes")
    for extra in ([], ["--report"]):
        one_error_line(run("sweep", mine, *extra), 2, f"{tmp_path / 'mine' / 'report.md'} was not written by this "
                                                      "sweep")  # fmt: skip
        assert (tmp_path / "mine" / "report.md").read_text() == "my own notes"
        assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["report.md"]  # nothing ran
    edited = folder / "report.csv"
    before = edited.read_text()
    edited.write_text(before + "my extra row\n")
    one_error_line(run("sweep", file, "--report"), 2, "was not written by this sweep (or was changed since)")
    assert edited.read_text() == before + "my extra row\n"
    edited.write_text(before)  # put back as the sweep wrote it: the sweep's again
    assert run("sweep", file, "--report").exit_code == 0


def test_a_report_made_while_the_sweep_runs_stays_the_sweeps_own(tmp_path):
    """`fedlora sweep F --report` while `fedlora sweep F` runs: the report records the files it wrote in
    sweep.json, and the running sweep's next save keeps them, so the sweep may replace them later."""
    import tomllib

    from fedlora_cli.sweeps import load_sweep, report, run_sweep, write_report
    from fedlora_cli.sweeps.record import REPORTS, SWEEP_RECORD, check_reports

    file = tmp_path / "s.toml"
    file.write_text(f'[sweep]\nname = "race"\nroot = "{tmp_path}"\nseeds = [1, 2]\n'
                    '[arms.a]\ncommand = "train"\ntask = "sst2"\n')  # fmt: skip
    sweep = load_sweep(file, tomllib.loads(file.read_text()))
    calls = []

    def execute(command, options):  # each "run": the first one while a --report is made beside it
        if not calls:
            write_report(sweep, report(sweep), figure=False)
        calls.append(options["seed"])

    run_sweep(sweep, execute)
    assert calls == [1, 2]
    owned = json.loads((sweep.folder / SWEEP_RECORD).read_text())[REPORTS]
    assert "report.csv" in owned
    check_reports(sweep)  # no refusal: every report file there is the sweep's


def test_the_centralised_reference_is_drawn_beside_curves_with_an_aggregation_error(tmp_path, monkeypatch):
    """Three panels (metric, loss, aggregation error) when a curve carries the error; the flat reference
    (a run without rounds) is still drawn on the metric panel, in the colour it has in the legend."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from fedlora_cli import plots
    from fedlora_cli.plots import Curve

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    fed = Curve("fed", [1, 2], [0.6, 0.7], [0.5, 0.4], error=[0.05, 0.04])
    central = Curve("central", final=0.8, final_std=0.01)
    plots.plot_curves([fed, central], tmp_path / "f.png", metric="accuracy", title="t")
    left, _, error = figures[-1].axes[:3]
    assert error.get_title() == "aggregation error per round"
    assert list(error.lines[0].get_ydata()) == [0.05, 0.04]
    flat = [line for line in left.lines if list(line.get_ydata()) == [0.8, 0.8]]
    assert len(flat) == 1 and flat[0].get_label() == "central (final)"
    assert flat[0].get_color() != left.lines[0].get_color()
    # each curve keeps its colour in every panel, whatever the order
    plots.plot_curves([central, fed], tmp_path / "g.png", metric="accuracy", title="t")
    left, loss, error = figures[-1].axes[:3]
    fed_color = next(line.get_color() for line in left.lines if line.get_label() == "fed")
    assert loss.lines[0].get_color() == error.lines[0].get_color() == fed_color
    assert next(line.get_color() for line in left.lines if line.get_label() == "central (final)") != fed_color


def test_the_clients_table_gives_each_statistic_over_seeds_and_the_global_model_before_fine_tuning(tmp_path):
    """Runs evaluated on the clients' local tests: a row per cell with the clients' mean, worst 10 %, worst and
    best (mean ± std over seeds, × 100), for fine-tuned runs the global adapter's mean before it, and the paired
    test against the best cell scored on the same local tests (same seed, same split fingerprint)."""
    from fedlora_cli import sweeps
    from fedlora_cli.sweeps.clients import client_stats

    data = {"sweep": {"name": "p", "seeds": [1, 2, 3]}, "base": {"task": "sst2"},
            "arms": {"ft": {"command": "rounds"}, "fedsa": {"command": "rounds"}, "naive": {"command": "rounds"},
                     "other": {"command": "rounds"}, "central": {"command": "train"}}}  # fmt: skip
    sweep = sweeps.load_sweep(tmp_path / "p.toml", data)
    final = {  # final/metrics.json's fields as `rounds` writes them
        ("ft", 1): {"per_client": {"model": "personal", "mean": 0.9, "worst10": 0.7, "worst": 0.7, "best": 1.0},
                    "per_client_global": {"model": "global", "mean": 0.8}},
        ("ft", 2): {"per_client": {"model": "personal", "mean": 0.8, "worst10": 0.5, "worst": 0.5, "best": 1.0},
                    "per_client_global": {"model": "global", "mean": 0.7}},
        ("fedsa", 1): {"per_client": {"model": "personal", "mean": 0.85, "worst10": 0.6, "worst": 0.6,
                                      "best": float("nan")}},
        ("naive", 1): {"per_client": {"model": "global", "mean": 0.8, "worst10": 0.4, "worst": 0.4, "best": 1.0}},
        ("naive", 2): {"per_client": {"model": "global", "mean": 0.75, "worst10": 0.45, "worst": 0.5, "best": 1.0}},
        ("other", 1): {"per_client": {"model": "global", "mean": 0.99, "worst10": 0.9, "worst": 0.9, "best": 1.0}},
    }  # fmt: skip
    splits = {1: "aaa", 2: "bbb"}  # each seed's local splits, the same for every arm of that seed

    def stats(name, seed):
        return client_stats(final[(name, seed)], "zzz" if name == "other" else splits[seed])

    cells = [
        sweeps.CellReport(c, "accuracy", {}, 3, clients={
            seed: stats(c.name, seed) for seed in (1, 2) if (c.name, seed) in final})
        for c in sweep.cells
    ]  # fmt: skip
    table = next(t for t in sweeps.report_tables(sweep, cells) if t.name == "clients")
    assert table.header == ["cell", "model", "seeds", "clients' mean", "worst 10 %", "worst client",
                            "best client", "before fine-tuning (mean)", "vs best: clients' mean",
                            "vs best: worst 10 %"]  # fmt: skip
    # ft is the best on seeds 1 and 2's tests; naive pairs with it on both seeds, fedsa on seed 1 alone (n/a);
    # `other` scored different tests, so nothing is compared with it, however high it scores
    assert table.rows == [
        ["ft", "personal", "2", "85.0 ± 7.1", "60.0 ± 14.1", "60.0 ± 14.1", "100.0 ± 0.0", "75.0 ± 7.1", "best",
         "best"],
        ["fedsa", "personal", "1", "85.0", "60.0", "60.0", "", "", "-5.0 (n = 1)", "-10.0 (n = 1)"],
        ["naive", "global", "2", "77.5 ± 3.5", "42.5 ± 3.5", "45.0 ± 7.1", "100.0 ± 0.0", "", "-7.5, p = 0.2 (n = 2)",
         "-17.5, p = 0.39 (n = 2)"],
        ["other", "global", "1", "99.0", "90.0", "90.0", "100.0", "", "", ""],
    ]  # a NaN is no value; central has no row  # fmt: skip
    from scipy.stats import ttest_rel

    assert f"{ttest_rel([0.8, 0.75], [0.9, 0.8]).pvalue:.2g}" == "0.2"  # the p-values above, by hand
    assert f"{ttest_rel([0.4, 0.45], [0.7, 0.5]).pvalue:.2g}" == "0.39"
    assert client_stats({"metrics": {"accuracy": 0.9}}) == {}  # no local tests: no statistics
    assert not any(t.name == "clients" for t in sweeps.report_tables(sweep, [c.at_last() for c in cells[4:]]))


@pytest.mark.parametrize(
    "file", sorted((Path(__file__).parent.parent / "benchmarks").glob("*.toml")), ids=lambda p: p.name
)
def test_every_sweep_file_in_benchmarks_names_only_options_its_commands_have(file, tmp_path, monkeypatch):
    """The results' sweep files stay runnable as the options move: `--dry-run` checks every cell's and tune
    point's options against its command, and writes nothing."""
    monkeypatch.chdir(tmp_path)
    listed = run("sweep", file, "--dry-run", env={"MINILM": "some/model", "GLUE": str(tmp_path / "glue")})
    assert listed.exit_code == 0, listed.stderr
    assert "fedlora " in listed.stderr and not any(tmp_path.iterdir())


def test_the_clients_figure_pools_every_seeds_clients_per_cell(tmp_path, monkeypatch):
    """clients.png: one box per cell over the clients of all its seeds' runs, written and owned like every
    report file."""
    pytest.importorskip("matplotlib")
    from fedlora_cli import plots, sweeps
    from fedlora_cli.sweeps.clients import client_stats

    data = {"sweep": {"name": "p", "seeds": [1, 2]}, "base": {"task": "sst2"},
            "arms": {"fedsa": {"command": "rounds"}, "central": {"command": "train"}}}  # fmt: skip
    monkeypatch.chdir(tmp_path)
    sweep = sweeps.load_sweep(tmp_path / "p.toml", data)
    per_seed = {1: {"1": 0.5, "2": 1.0}, 2: {"1": 0.25, "3": float("nan"), "4": 0.75}}
    cells = [
        sweeps.CellReport(sweep.cells[0], "accuracy", {}, 2, clients={
            s: client_stats({"per_client": {"model": "personal", "mean": 0.5, "values": v}}, f"split{s}")
            for s, v in per_seed.items()}),
        sweeps.CellReport(sweep.cells[1], "accuracy", {1: 0.8}, 2),
    ]  # fmt: skip
    drawn, real = [], plots.plot_client_distribution

    def recording(groups, *args, **kwargs):
        drawn.append(groups)
        return real(groups, *args, **kwargs)

    monkeypatch.setattr(plots, "plot_client_distribution", recording)
    written = sweeps.write_report(sweep, cells)
    assert drawn == [[("fedsa", [0.5, 1.0, 0.25, 0.75])]]  # both seeds' clients, a NaN left out; central none
    png = sweep.folder / "clients.png"
    assert written["clients png"] == png and png.read_bytes()[:4] == b"\x89PNG"
    assert "clients.png" in json.loads((sweep.folder / "sweep.json").read_text())["reports"]
    sweeps.write_report(sweep, cells)  # its own figure is replaced on the next report …
    png.write_bytes(b"the user's")
    with pytest.raises(Exception, match="was not written by this sweep"):  # … a changed one never
        sweeps.write_report(sweep, cells)
