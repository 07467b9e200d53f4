"""Sweeps: a grid of runs from one TOML file, run one after another, then mean ± std tables and figures.

A cell is a command name plus its options (the keys of `--config` files); every (cell, seed) is a
normal run folder, `<root>/<sweep>/<cell>-seed<k>`. Re-running a sweep skips complete runs, starts
failed or interrupted single-machine runs again and resumes interrupted `rounds` runs. The runs
themselves are made by a callable the CLI passes in (it invokes the command exactly as the user
would), so a sweep run is indistinguishable from one typed by hand. The format, by example:

    [sweep]
    name = "sst2-noniid"       # default: the file's name without .toml
    root = "runs/sweeps"       # runs go to <root>/<name>/; default: runs
    seeds = [1, 2, 3]          # each cell runs once per seed (its --seed); default: [42]
    metric = "accuracy"        # what the report averages; default: the task's main metric

    [base]                     # options of every run (long option names, as in --config files)
    task = "sst2"
    max-train-samples = 2000

    [arms.fed]                 # an arm: a command, its options, and a grid over some of them
    command = "rounds"
    shards = "shards/sst2_k5"
    rounds = 5
    grid = { aggregation = ["svd", "naive"], lora-r = [4, 8] }

    [arms.central]             # no grid: one cell
    command = "train"
    epochs = 5                 # the same budget as 5 rounds of 1 local epoch

    [tune]                     # optional: choose options per cell on the validation split first
    seeds = [101]              # the tune seeds (never [sweep] seeds)
    grid = { learning-rate = [1e-3, 2e-3, 5e-3] }   # every tuned arm's grid
    [tune.arms.fed]            # an arm's own, over the common grid key by key ([] leaves a key untuned)
    lora-alpha = [16, 64]

Modules: spec (the file, cells, tune points), running (plan, run_sweep), tuning (scores, the choice), record
(sweep.json), reporting (the tables and files), stats (mean ± std, the paired test), figures.
"""

from fedlora_cli.sweeps.figures import _legend, plot_sweep
from fedlora_cli.sweeps.record import REPORTS, SWEEP_RECORD, check_reports
from fedlora_cli.sweeps.reporting import (
    CellReport,
    ReportTable,
    compare_table,
    markdown_table,
    pivot,
    pivot_table,
    report,
    report_rows,
    report_tables,
    write_report,
)
from fedlora_cli.sweeps.running import RESUMABLE, PlannedRun, SweepOutcome, plan, run_sweep
from fedlora_cli.sweeps.spec import (
    COMMANDS,
    MAX_RUNS,
    OWNED,
    Cell,
    Sweep,
    TableSpec,
    TunePoint,
    TuneSpec,
    load_sweep,
)
from fedlora_cli.sweeps.stats import Paired, paired_test
from fedlora_cli.sweeps.tuning import PointScore, choose, score_cell

__all__ = [
    "COMMANDS", "MAX_RUNS", "OWNED", "REPORTS", "RESUMABLE", "SWEEP_RECORD", "Cell", "CellReport", "Paired",
    "PlannedRun", "PointScore", "ReportTable", "Sweep", "SweepOutcome", "TableSpec", "TunePoint", "TuneSpec",
    "_legend", "check_reports", "choose", "compare_table", "load_sweep", "markdown_table", "paired_test",
    "pivot", "pivot_table", "plan", "plot_sweep", "report", "report_rows", "report_tables", "run_sweep",
    "score_cell", "write_report",
]  # fmt: skip
