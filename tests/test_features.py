"""Tokenization cache, dynamic padding and length-grouped batches."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora_cli.data import load_split
from fedlora_cli.features import make_batches, tokenize_split


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def test_tokenized_split_matches_the_tokenizer(tokenizer, glue_dir):
    raw = load_split("mrpc", "train", data_dir=glue_dir, max_samples=20)
    split = tokenize_split(raw, tokenizer, max_length=16)
    assert len(split) == 20
    for i in (0, 7, 19):
        expected = tokenizer(
            raw.columns["sentence1"][i], raw.columns["sentence2"][i], truncation=True, max_length=16
        )
        assert split.ids[split.offsets[i] : split.offsets[i + 1]].tolist() == expected["input_ids"]
    assert split.lengths.max() <= 16
    assert split.labels.tolist() == raw.labels.tolist()


def test_cache_is_reused_and_keyed(tokenizer, glue_dir, tmp_path, monkeypatch):
    raw = load_split("sst2", "train", data_dir=glue_dir)
    first = tokenize_split(raw, tokenizer, 32, tmp_path)
    files = list((tmp_path / "tokenized" / "sst2").iterdir())
    assert len(files) == 1

    def explode(*a, **k):
        raise AssertionError("tokenized again instead of reading the cache")

    with monkeypatch.context() as m:
        m.setattr(type(tokenizer), "__call__", explode)
        second = tokenize_split(raw, tokenizer, 32, tmp_path)
    assert np.array_equal(first.ids, second.ids) and np.array_equal(first.offsets, second.offsets)
    tokenize_split(raw, tokenizer, 24, tmp_path)  # other max length: other cache entry
    tokenize_split(raw.head(50), tokenizer, 32, tmp_path)  # other data: other entry
    assert len(list((tmp_path / "tokenized" / "sst2").iterdir())) == 3


def test_damaged_cache_is_rebuilt(tokenizer, glue_dir, tmp_path):
    raw = load_split("sst2", "validation", data_dir=glue_dir)
    first = tokenize_split(raw, tokenizer, 32, tmp_path)
    (path,) = list((tmp_path / "tokenized" / "sst2").iterdir())
    path.write_bytes(b"garbage")
    again = tokenize_split(raw, tokenizer, 32, tmp_path)
    assert np.array_equal(first.ids, again.ids)


def test_collate_pads_to_the_longest_in_the_batch(tokenizer, glue_dir):
    split = tokenize_split(load_split("sst2", "train", data_dir=glue_dir), tokenizer, 64)
    idx = np.array([0, 1, 2, 3])
    batch = split.collate(idx)
    width = int(split.lengths[idx].max())
    assert tuple(batch["input_ids"].shape) == (4, width)
    assert batch["attention_mask"].sum().item() == int(split.lengths[idx].sum())
    short = int(np.argmin(split.lengths[idx]))
    assert (batch["input_ids"][short, split.lengths[idx][short] :] == tokenizer.pad_token_id).all()


def test_batches_cover_each_index_once_and_group_lengths():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 120, size=1000)
    idx = np.arange(1000)
    grouped = make_batches(lengths, idx, 16, rng=np.random.default_rng(1))
    plain = make_batches(lengths, idx, 16, rng=np.random.default_rng(1), group_by_length=False)
    for batches in (grouped, plain):
        assert sorted(np.concatenate(batches).tolist()) == idx.tolist()

    def padded(batches):
        return sum(len(b) * lengths[b].max() for b in batches)

    assert padded(grouped) < 0.7 * padded(plain)  # grouping removes most of the padding
    again = make_batches(lengths, idx, 16, rng=np.random.default_rng(1))
    assert all(np.array_equal(a, b) for a, b in zip(grouped, again, strict=True))  # seeded: reproducible
    other = make_batches(lengths, idx, 16, rng=np.random.default_rng(2))
    assert not np.array_equal(np.concatenate(grouped), np.concatenate(other))  # another seed: another order


def test_an_unwritable_cache_is_skipped_with_one_note(tokenizer, glue_dir, tmp_path, monkeypatch):
    import errno
    import os

    from fedlora_cli import atomic
    from fedlora_cli.progress import RecordingProgress

    raw = load_split("sst2", "train", data_dir=glue_dir, max_samples=50)
    expected = tokenize_split(raw, tokenizer, 32)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    progress = RecordingProgress()
    for _ in range(2):  # under a file: mkdir fails (ENOTDIR), for root too
        split = tokenize_split(raw, tokenizer, 32, blocker / "cache", progress)
        assert split.ids.tolist() == expected.ids.tolist()
    assert [m for m in progress.messages() if "cache" in m] == [
        f"note: the tokenized-data cache {blocker / 'cache'} cannot be written (Not a directory): tokenizing in "
        f"memory instead; set FEDLORA_CACHE to a writable folder to keep the cache"
    ]

    def full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic, "_new_temp_file", full)
    progress = RecordingProgress()
    tokenize_split(raw, tokenizer, 32, tmp_path / "full", progress)
    assert "(No space left on device)" in progress.messages()[0]
    assert not list((tmp_path / "full").rglob("*.safetensors"))
