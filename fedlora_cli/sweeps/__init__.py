"""Sweeps: a grid of runs from one TOML file, run one after another, then a mean ± std table and a figure.

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
"""

from fedlora_cli.sweeps.figures import _legend, plot_sweep
from fedlora_cli.sweeps.record import REPORTS, SWEEP_RECORD, check_reports
from fedlora_cli.sweeps.reporting import CellReport, markdown_table, pivot, report, report_rows, write_report
from fedlora_cli.sweeps.running import RESUMABLE, PlannedRun, SweepOutcome, plan, run_sweep
from fedlora_cli.sweeps.spec import COMMANDS, MAX_RUNS, OWNED, Cell, Sweep, TableSpec, load_sweep

__all__ = [
    "COMMANDS", "MAX_RUNS", "OWNED", "REPORTS", "RESUMABLE", "SWEEP_RECORD", "Cell", "CellReport", "PlannedRun",
    "Sweep", "SweepOutcome", "TableSpec", "_legend", "check_reports", "load_sweep", "markdown_table", "pivot",
    "plan", "plot_sweep", "report", "report_rows", "run_sweep", "write_report",
]  # fmt: skip
