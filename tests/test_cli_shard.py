"""`fedlora shard` end to end through the CLI: every mode, bad input, the plot, and real SST-2 when present."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import clitools
import numpy as np
import pytest
from clitools import one_error_line
from conftest import SHARED_GLUE

from fedlora_cli.app import app
from fedlora_cli.config import ShardConfig
from fedlora_cli.data import load_split
from fedlora_cli.errors import InputError
from fedlora_cli.sharding import read_shards, run_shard, validate_shards

runner = clitools.runner
REFERENCE_KEYS = {"client_indices", "size_per_client", "total_train", "task", "mode", "meta"}
needs_glue = pytest.mark.skipif(
    not (SHARED_GLUE / "SST-2" / "train.tsv").is_file(), reason="no ../shared GLUE"
)


def run(*args: str | Path):
    return clitools.run("shard", *args)


def check_shards(out: Path, task: str, k: int, n: int, *, partition: bool = True) -> dict:
    """The folder holds exactly K reference-format client files + summary.json, and they are sound."""
    expected = {f"client_{i}.json" for i in range(1, k + 1)} | {"summary.json"}
    assert {p.name for p in out.iterdir()} == expected
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) >= REFERENCE_KEYS
    assert set(summary["meta"]) == {"seed", "overlap_ratio", "category_key", "bin_stsb"}
    assert summary["task"] == task and summary["total_train"] == n
    for key in ("label_counts", "train_fingerprint", "params", "notes", "fedlora_version", "data_source"):
        assert key in summary, key
    shards = read_shards(out)
    validate_shards(shards, task, n, train_fingerprint=summary["train_fingerprint"])
    assert shards.client_ids == list(range(1, k + 1))
    for i, c in enumerate(shards.clients, start=1):
        assert set(json.loads((out / f"client_{i}.json").read_text())) == {"dataset", "indices"}
        assert c.size > 0 and len(np.unique(c)) == c.size
    assert summary["size_per_client"] == shards.sizes
    assert summary["client_indices"] == [c.tolist() for c in shards.clients]
    everything = np.concatenate(shards.clients)
    if partition:
        assert np.array_equal(np.sort(everything), np.arange(n))
    return summary


@pytest.mark.parametrize(
    ("mode", "extra", "k"),
    [
        ("iid", [], 5),
        ("overlap", ["--overlap-ratio", "0.2"], 5),
        ("category", ["--category-key", "label"], 2),
        ("category_overlap", ["--overlap-ratio", "0.15"], 2),
        ("dirichlet", ["--dirichlet-alpha", "0.5"], 10),
        ("quantity", ["--dirichlet-alpha", "2"], 4),
    ],
)
def test_each_mode_writes_reference_manifests(glue_dir, tmp_path, mode, extra, k):
    out = tmp_path / "s"
    args = ["--task", "sst2", "--data-dir", glue_dir, "--clients", k, "--mode", mode, "--seed", 123]
    result = run(*args, *extra, "--out", out)
    assert result.exit_code == 0, result.stderr + result.stdout
    summary = check_shards(out, "sst2", k, 600, partition=mode not in ("overlap", "category_overlap"))
    assert summary["mode"] == mode and summary["meta"]["seed"] == 123
    flat = " ".join(result.stdout.split())
    assert f"fedlora shard: sst2, {mode}, {k} clients" in flat and f"shards: {out}" in flat
    assert "negative" in flat and "positive" in flat  # the label histogram column
    # same seed, same shards
    again = run(*args, *extra, "--out", tmp_path / "again")
    assert again.exit_code == 0
    assert (
        json.loads((tmp_path / "again" / "summary.json").read_text())["client_indices"]
        == summary["client_indices"]
    )


def test_category_with_more_clients_than_labels_leaves_no_client_empty(glue_dir, tmp_path):
    out = tmp_path / "s"
    result = run("--task", "sst2", "--data-dir", glue_dir, "-k", 5, "--mode", "category", "--out", out)
    assert result.exit_code == 0, result.stderr
    summary = check_shards(out, "sst2", 5, 600)
    assert all(len(held) == 1 for held in summary["client_categories"])
    assert all(sum(1 for v in counts.values() if v) == 1 for counts in summary["label_counts"])
    flat = " ".join(result.stdout.split())
    assert "5 clients but 2 categories" in flat and "split across clients" in flat


def test_mnli_iid_stratifies_by_label_and_genre(glue_dir, tmp_path):
    out = tmp_path / "s"
    assert run("--task", "mnli", "--data-dir", glue_dir, "-k", 3, "--out", out).exit_code == 0
    check_shards(out, "mnli", 3, 150)
    raw = load_split("mnli", "train", data_dir=glue_dir)
    keys = [f"{lab}|{g}" for lab, g in zip(raw.columns["label"], raw.columns["genre"], strict=True)]
    keys = np.asarray(keys)
    for c in read_shards(out).clients:
        for key in np.unique(keys):
            assert abs((keys[c] == key).sum() - (keys == key).sum() / 3) < 1


def test_genre_categories_and_stsb_scores(glue_dir, tmp_path):
    result = run("--task", "mnli", "--data-dir", glue_dir, "-k", 2, "--mode", "category", "--category-key",
                 "genre", "--out", tmp_path / "g")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    summary = check_shards(tmp_path / "g", "mnli", 2, 150)
    held = summary["client_categories"]
    assert not set(held[0]) & set(held[1]) and len(held[0]) + len(held[1]) == 5  # five genres, whole
    result = run("--task", "stsb", "--data-dir", glue_dir, "-k", 3, "--out", tmp_path / "st")
    assert result.exit_code == 0, result.stderr
    summary = check_shards(tmp_path / "st", "stsb", 3, 150)
    assert set(summary["label_counts"][0]) == {"min", "max", "mean", "histogram"}
    assert "score range" in result.stdout


def test_legacy_flag_names(glue_dir, tmp_path):
    result = run("--task_name", "sst2", "--data_dir", glue_dir, "--clients", 3, "--mode", "overlap",
                 "--overlap_ratio", "0.3", "--out", tmp_path / "s")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["meta"]["overlap_ratio"] == 0.3


@pytest.mark.parametrize(
    ("args", "pattern"),
    [
        (["--clients", "0"], "--clients must be >= 1, got 0"),
        (["--clients", "601"], "--clients 601 is more than the 600 training examples"),
        (["--mode", "random"], "--mode must be one of iid, overlap, category"),
        (["--mode", "overlap", "--overlap-ratio", "1.0"], "--overlap-ratio must be in [0, 1), got 1.0"),
        (["--mode", "overlap", "--overlap-ratio", "-0.1"], "--overlap-ratio must be in [0, 1)"),
        (
            ["--mode", "category", "--category-key", "topic"],
            "unknown --category-key 'topic' for sst2: the train split has columns sentence, label",
        ),
        (
            ["--mode", "dirichlet", "--dirichlet-alpha", "0"],
            "--dirichlet-alpha must be a finite number > 0, got 0.0",
        ),
        (["--mode", "quantity", "--dirichlet-alpha", "-1"], "--dirichlet-alpha must be a finite number > 0"),
        (
            ["--mode", "dirichlet", "--dirichlet-alpha", "inf"],
            "--dirichlet-alpha must be a finite number > 0, got inf",
        ),
        (
            ["--mode", "quantity", "--dirichlet-alpha", "nan"],
            "--dirichlet-alpha must be a finite number > 0, got nan",
        ),
        (["--mode", "overlap", "--overlap-ratio", "nan"], "--overlap-ratio must be in [0, 1), got nan"),
        (["--seed", "-1"], "--seed must be an integer in 0..4,294,967,295, got -1"),
        (["--seed", str(2**32)], "--seed must be an integer in 0..4,294,967,295"),
        (["--task", "sst3"], "unknown task 'sst3'"),
        (["--min-size", "200"], "lower --min-size or use fewer clients"),
        (["--plot", "figure.jpg"], "--plot must end in .png, .pdf or .svg"),
        (["--data-dir", "/no/such/dir"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(glue_dir, tmp_path, args, pattern):
    base = {"--task": "sst2", "--data-dir": str(glue_dir), "--clients": "4", "--out": str(tmp_path / "s")}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    result = run(*[x for pair in base.items() for x in pair])
    one_error_line(result, 2, pattern)
    assert list(tmp_path.iterdir()) == []


def test_existing_out_needs_overwrite_and_only_ever_replaces_fedlora_shards(glue_dir, tmp_path):
    out = tmp_path / "s"
    args = ["--task", "sst2", "--data-dir", glue_dir, "-k", 3, "--out", out]
    assert run(*args).exit_code == 0
    before = (out / "summary.json").read_text()
    one_error_line(
        run(*args),
        2,
        f"{out} already holds a fedlora shard folder: choose another --out, or pass --overwrite",
    )
    assert (out / "summary.json").read_text() == before
    assert run(*args, "-k", 2, "--overwrite").exit_code == 0  # fewer clients: no stale client_3.json
    check_shards(out, "sst2", 2, 600)
    assert run(*args, "--force").exit_code == 0  # the old name stays as a hidden alias
    check_shards(out, "sst2", 3, 600)
    assert "--force" not in " ".join(runner.invoke(app, ["shard", "--help"]).stdout.split())
    # files fedlora did not write: a figure of the user's, a hand-made manifest, notes beside shards
    for name, content in (("figure.png", b"\x89PNG mine"), ("client_9.json", b'{"indices": [1]}')):
        (out / name).write_bytes(content)
        one_error_line(run(*args, "--overwrite"), 2, f"holds files that fedlora did not write ({name})")
        assert (out / name).read_bytes() == content
        (out / name).unlink()
    handmade = tmp_path / "reference"
    handmade.mkdir()
    (handmade / "client_1.json").write_text(
        '{"dataset": "sst2", "indices": [0]}'
    )  # the reference's, not ours
    one_error_line(run(*args[:-1], handmade, "--overwrite"), 2, "fedlora did not write (client_1.json)")
    (tmp_path / "notes.txt").write_text("mine")
    one_error_line(run(*args[:-1], tmp_path, "--overwrite"), 2, "fedlora did not write")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_plot_is_replaced_only_when_fedlora_drew_it(glue_dir, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "s"
    args = ["--task", "sst2", "--data-dir", glue_dir, "-k", 3, "--out", out]
    inside = out / "labels.svg"
    assert run(*args, "--plot", inside).exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["client_1.json", "client_2.json", "client_3.json",
                                                     "labels.svg", "summary.json"]  # fmt: skip
    first = inside.read_bytes()
    assert run(*args, "--plot", inside, "-k", 2, "--overwrite").exit_code == 0  # ours: replaced
    assert inside.read_bytes() != first and not (out / "client_3.json").exists()
    mine = tmp_path / "mine.pdf"
    mine.write_bytes(b"%PDF-1.4 a paper")
    result = run(*args, "--plot", mine, "--overwrite")
    one_error_line(result, 2, f"{mine} was not written by fedlora")
    assert mine.read_bytes() == b"%PDF-1.4 a paper"
    one_error_line(run(*args[:-1], tmp_path / "t", "--plot", inside), 2, "pass --overwrite")


def test_dirichlet_that_cannot_meet_min_size_says_what_to_change(glue_dir, tmp_path):
    result = run("--task", "rte", "--data-dir", glue_dir, "-k", 100, "--mode", "dirichlet", "--dirichlet-alpha",
                 "0.01", "--min-size", "1", "--out", tmp_path / "s")  # fmt: skip
    one_error_line(result, 2, "raise --dirichlet-alpha, lower --min-size or use fewer clients")
    assert list(tmp_path.iterdir()) == []


def test_plot_writes_a_png(glue_dir, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "fig" / "labels.png"
    result = run("--task", "sst2", "--data-dir", glue_dir, "-k", 4, "--mode", "dirichlet", "--out",
                 tmp_path / "s", "--plot", png)  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {png}" in " ".join(result.stdout.split())
    from fedlora_cli.plots import plot_label_distribution

    # the summary.json of a regression task plots too (score histogram)
    assert run("--task", "stsb", "--data-dir", glue_dir, "-k", 3, "--out", tmp_path / "st").exit_code == 0
    summary = json.loads((tmp_path / "st" / "summary.json").read_text())
    assert plot_label_distribution(summary, tmp_path / "st.svg").read_text().startswith("<?xml")


@pytest.mark.parametrize(("task", "mode", "k"), [("mnli", "category_overlap", 2), ("stsb", "quantity", 1)])
def test_plot_title_fits_the_figure_and_counts_what_the_table_counts(
    glue_dir, tmp_path, monkeypatch, task, mode, k
):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    titles = []
    real_close = plt.close

    def close(fig):  # look at the figure just before it is closed
        fig.canvas.draw()
        ax = fig.axes[0]
        box, frame = ax.title.get_window_extent(fig.canvas.get_renderer()), fig.bbox
        titles.append((ax.get_title(), box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y1 <= frame.y1))
        real_close(fig)

    monkeypatch.setattr(plt, "close", close)
    result = run("--task", task, "--data-dir", glue_dir, "-k", k, "--mode", mode, "--out", tmp_path / "s", "--plot",
                 tmp_path / "f.png")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    ((title, inside),) = titles
    assert inside, f"title clipped: {title!r}"
    total = json.loads((tmp_path / "s" / "summary.json").read_text())["total_train"]
    assert f"{total:,} training examples" in title and f"{total:,} examples split" in result.stdout
    assert title.endswith(f"{k} clients" if k > 1 else "1 client")


def test_paths_are_printed_whole_in_a_narrow_terminal(glue_dir, tmp_path):
    out = tmp_path / ("shards-of-a-long-experiment-name-" * 3)
    result = clitools.run("shard", "--task", "sst2", "--data-dir", glue_dir, "-k", 2, "--out", out,
                          env={"COLUMNS": "40"})  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert f"shards: {out}" in result.stdout.splitlines()


def test_plot_without_matplotlib_says_how_to_install(glue_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    result = run(
        "--task",
        "sst2",
        "--data-dir",
        glue_dir,
        "-k",
        2,
        "--out",
        tmp_path / "s",
        "--plot",
        tmp_path / "f.png",
    )
    # The CLI's error printer reads the message as Rich markup, which swallows "[plot]"; match up to it.
    one_error_line(result, 2, "--plot needs matplotlib: pip install 'fedlora[plot]'")
    assert list(tmp_path.iterdir()) == []
    config = ShardConfig(
        task="sst2", clients=2, data_dir=str(glue_dir), out=str(tmp_path / "s"), plot="f.png"
    )
    with pytest.raises(InputError, match=re.escape("pip install 'fedlora[plot]'")):
        run_shard(config)


def test_shard_is_listed_in_help():
    result = runner.invoke(app, ["--help"])
    assert "shard" in result.stdout
    result = runner.invoke(app, ["shard", "--help"])
    assert result.exit_code == 0 and "--dirichlet-alpha" in result.stdout


# ---------------------------------------------------------------------------------------------------
# the "done when", on the real SST-2


@needs_glue
@pytest.mark.real_data
@pytest.mark.parametrize(
    ("k", "mode", "extra"),
    [
        (5, "iid", []),
        (5, "overlap", ["--overlap-ratio", "0.2"]),
        (2, "category", ["--category-key", "label"]),
        (5, "category", ["--category-key", "label"]),
        (2, "category_overlap", []),
        (10, "dirichlet", ["--dirichlet-alpha", "0.5"]),
    ],
)
def test_real_sst2_done_when(tmp_path, k, mode, extra):
    out = tmp_path / "D"
    result = run("--task", "sst2", "--data-dir", SHARED_GLUE, "--clients", k, "--mode", mode, "--seed", 123,
                 *extra, "--out", out)  # fmt: skip
    assert result.exit_code == 0, result.stderr + result.stdout
    summary = check_shards(out, "sst2", k, 67_349, partition=mode not in ("overlap", "category_overlap"))
    if mode == "iid":
        global_counts = np.asarray([29_780, 37_569])  # negative, positive in SST-2 train
        for counts in summary["label_counts"]:
            assert np.all(np.abs(np.asarray(list(counts.values())) - global_counts / k) < 1)


@needs_glue
@pytest.mark.real_data
@pytest.mark.parametrize("mode", ["iid", "overlap", "category", "category_overlap", "dirichlet", "quantity"])
def test_real_sst2_100_clients_under_two_seconds(tmp_path, mode):
    config = ShardConfig(
        task="sst2", clients=100, mode=mode, data_dir=str(SHARED_GLUE), out=str(tmp_path / "s")
    )
    t0 = time.perf_counter()
    result = run_shard(config)
    total = time.perf_counter() - t0
    assert len(result.sizes) == 100 and min(result.sizes) >= 1
    assert result.seconds < 2.0, result.seconds  # the sharding itself
    assert total < 5.0, total  # read the TSV, shard, write 101 files
