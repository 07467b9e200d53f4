"""Tasks as data, and the local GLUE readers (every layout), against generated and real files."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED_GLUE

from fedlora_cli.data import load_split
from fedlora_cli.errors import InputError
from fedlora_cli.tasks import TASKS, get_task


def test_task_lookup_accepts_hub_and_folder_names():
    assert get_task("SST-2").name == "sst2"
    assert get_task("sts_b").name == "stsb"
    assert get_task("MNLI").eval_splits == ("validation_matched", "validation_mismatched")
    with pytest.raises(ValueError, match="unknown task 'sst3'"):
        get_task("sst3")


def test_label_orders_are_the_hubs():
    assert TASKS["rte"].label_names == ("entailment", "not_entailment")
    assert TASKS["wnli"].label_names == ("not_entailment", "entailment")
    assert TASKS["mnli"].label_names == ("entailment", "neutral", "contradiction")
    assert TASKS["stsb"].is_regression and TASKS["stsb"].num_labels == 1
    assert len(TASKS) == 9


@pytest.mark.parametrize(
    ("task", "split", "n"),
    [
        ("sst2", "train", 600), ("sst2", "validation", 200),
        ("cola", "train", 150), ("mrpc", "train", 150), ("stsb", "validation", 50),
        ("qqp", "train", 150), ("qnli", "validation", 50), ("rte", "train", 150), ("wnli", "train", 150),
        ("mnli", "train", 150), ("mnli", "validation_matched", 50), ("mnli", "validation_mismatched", 50),
    ],
)  # fmt: skip
def test_every_local_layout_reads(glue_dir, task, split, n):
    raw = load_split(task, split, data_dir=glue_dir)
    t = get_task(task)
    assert len(raw) == n
    for field in t.text_fields:
        assert all(isinstance(s, str) and s for s in raw.texts(field))
    labels = raw.labels
    if t.is_regression:
        assert labels.dtype == np.float64 and labels.min() >= 0 and labels.max() <= 5
    else:
        assert set(np.unique(labels)) <= set(range(t.num_labels))


def test_string_labels_map_to_hub_ids(glue_dir):
    # RTE's file says "entailment"/"not_entailment"; the hub's ids are 0/1 in that order
    text = (glue_dir / "RTE" / "train.tsv").read_text().splitlines()[1].split("\t")
    raw = load_split("rte", "train", data_dir=glue_dir)
    assert raw.labels[0] == ("entailment", "not_entailment").index(text[3])


def test_mrpc_bom_and_cola_headerless(glue_dir):
    assert (glue_dir / "MRPC" / "train.tsv").read_bytes().startswith(b"\xef\xbb\xbf")
    mrpc = load_split("mrpc", "train", data_dir=glue_dir)
    first = (glue_dir / "MRPC" / "train.tsv").read_text(encoding="utf-8-sig").splitlines()[1].split("\t")
    assert mrpc.columns["sentence1"][0] == first[3] and mrpc.labels[0] == int(first[0])
    cola_line = (glue_dir / "CoLA" / "train.tsv").read_text().splitlines()[0].split("\t")
    cola = load_split("cola", "train", data_dir=glue_dir)
    assert cola.columns["sentence"][0] == cola_line[3]  # the first line is data, not a header


def test_mnli_keeps_genre_and_max_samples_takes_the_first(glue_dir):
    raw = load_split("mnli", "train", data_dir=glue_dir, max_samples=7)
    assert len(raw) == 7 and len(raw.columns["genre"]) == 7
    full = load_split("mnli", "train", data_dir=glue_dir)
    assert raw.columns["premise"] == full.columns["premise"][:7]


def test_fingerprint_tracks_content(glue_dir):
    a = load_split("sst2", "train", data_dir=glue_dir)
    assert a.fingerprint() == load_split("sst2", "train", data_dir=glue_dir).fingerprint()
    assert a.head(10).fingerprint() != a.fingerprint()


def test_missing_data_dir_and_files_say_what_to_do(tmp_path, glue_dir):
    with pytest.raises(InputError, match="does not exist"):
        load_split("sst2", "train", data_dir=tmp_path / "nope")
    with pytest.raises(InputError, match=r"SST-2/train.tsv not found.*original GLUE layout"):
        load_split("sst2", "train", data_dir=tmp_path)
    bad = tmp_path / "RTE"
    bad.mkdir()
    (bad / "train.tsv").write_text("idx\tpremise\thypothesis\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(InputError, match="lacks column"):
        load_split("rte", "train", data_dir=tmp_path)
    (bad / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n")
    with pytest.raises(InputError, match=r"train.tsv:2: label 'maybe'"):
        load_split("rte", "train", data_dir=tmp_path)


@pytest.mark.real_data
@pytest.mark.skipif(not SHARED_GLUE.is_dir(), reason="../shared/data/glue not present")
@pytest.mark.parametrize(
    ("task", "train", "dev"),
    [("cola", 8551, 1043), ("sst2", 67349, 872), ("mrpc", 3668, 408), ("stsb", 5749, 1500),
     ("rte", 2490, 277), ("wnli", 635, 71)],
)  # fmt: skip
def test_real_glue_row_counts_match_the_hub(task, train, dev):
    assert len(load_split(task, "train", data_dir=SHARED_GLUE)) == train
    assert len(load_split(task, "validation", data_dir=SHARED_GLUE)) == dev


def test_hub_split_maps_columns_and_offline_failure_says_what_to_do(monkeypatch):
    import datasets

    from fedlora_cli.errors import FedloraError

    seen = {}

    def fake_load_dataset(path, name, split, cache_dir=None):
        seen.update(path=path, name=name, split=split)
        return datasets.Dataset.from_dict(
            {"premise": ["a b", "c"], "hypothesis": ["d", "e f"], "label": [2, 0], "idx": [0, 1]}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    raw = load_split("mnli", "validation_matched", max_samples=1)
    assert seen == {"path": "nyu-mll/glue", "name": "mnli", "split": "validation_matched"}
    assert raw.source == "hub" and raw.columns == {"premise": ["a b"], "hypothesis": ["d"], "label": [2]}

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FedloraError, match=r"fedlora download --task rte.*--data-dir"):
        load_split("rte", "train")


def test_a_row_without_a_valid_label_is_an_error_never_dropped_in_silence(tmp_path, glue_dir):
    """An SST-2 row labelled "-" once vanished (the shard said 199 of 200 examples); only MultiNLI's "-" (no gold
    label: the annotators did not agree) means a row that is no example."""
    (tmp_path / "SST-2").mkdir()
    (tmp_path / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood\t1\nodd\t-\nbad\t0\n")
    with pytest.raises(InputError, match=r"SST-2/train.tsv:3: label '-' is neither 0..1 nor one of negative"):
        load_split("sst2", "train", data_dir=tmp_path)
    header = (glue_dir / "MNLI" / "train.tsv").read_text().splitlines()[:3]
    (tmp_path / "MNLI").mkdir()
    no_gold = header[2].rsplit("\t", 1)[0] + "\t-"
    (tmp_path / "MNLI" / "train.tsv").write_text("\n".join([*header, no_gold]) + "\n")
    assert len(load_split("mnli", "train", data_dir=tmp_path)) == 2
