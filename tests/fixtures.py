"""Self-contained test material: a tiny RoBERTa, a BPE tokenizer trained here, GLUE-format files with a signal.

Nothing is downloaded. The generated SST-2 has a learnable rule (a sentence is positive iff it
contains a positive word), so tests can assert that training *learns*, not only that it runs.
"""

from __future__ import annotations

import random
from pathlib import Path

POSITIVE = ["good", "great", "superb", "lovely", "brilliant", "wonderful", "fine", "charming"]
NEGATIVE = ["bad", "awful", "boring", "dull", "terrible", "weak", "poor", "clumsy"]
FILLER = (  # noqa: SIM905 - a sentence of filler words reads better than a list
    "the a movie film plot actor story scene music camera script cast it was is and of with "
    "this that very quite rather long short new old director screen ending"
).split()
GENRES = ["fiction", "government", "slate", "telephone", "travel"]


def sentence(rng: random.Random, positive: bool, n_words: int | None = None) -> str:
    """Filler words with two or three words of one polarity mixed in: a clear but non-trivial signal."""
    n = n_words or rng.randint(3, 12)
    words = [rng.choice(FILLER) for _ in range(n)]
    for _ in range(rng.randint(2, 3)):
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if positive else NEGATIVE))
    return " ".join(words)


def build_tokenizer_and_model(folder: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Train a byte-level BPE on the fixture vocabulary and save a random-weight RoBERTa beside it."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    corpus = [sentence(rng, rng.random() < 0.5) for _ in range(2000)] + [
        " ".join(FILLER + POSITIVE + NEGATIVE)
    ]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        corpus, vocab_size=400, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    bpe.save_model(str(folder))
    tokenizer = RobertaTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=hidden * 2,
        max_position_embeddings=160,  # >= max_seq_length + padding offset (2) for RoBERTa positions
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        type_vocab_size=1,
    )
    RobertaForMaskedLM(config).save_pretrained(str(folder))
    return folder


def _write(path: Path, rows: list[list[str]], header: list[str] | None, bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(map(str, r)) for r in rows]
    text = "\n".join(lines) + "\n"
    path.write_text(("\ufeff" if bom else "") + text, encoding="utf-8")


def write_glue_dir(root: Path, n_train: int = 600, n_dev: int = 200, seed: int = 0) -> Path:
    """All nine tasks in the original GLUE layout, each with the quirks of the real files."""
    rng = random.Random(seed)

    def pairs(n: int) -> list[tuple[str, str, bool]]:
        out = []
        for _ in range(n):
            pos = rng.random() < 0.5
            out.append((sentence(rng, pos), sentence(rng, rng.random() < 0.5), pos))
        return out

    for split, n in (("train", n_train), ("dev", n_dev)):
        # SST-2: header, int labels — the learnable task the training tests use
        sst = [(sentence(rng, pos), int(pos)) for pos in (rng.random() < 0.5 for _ in range(n))]
        _write(root / "SST-2" / f"{split}.tsv", [[s, label] for s, label in sst], ["sentence", "label"])
        # CoLA: no header; source, label, original label marker, sentence
        cola = [[rng.choice(["gj04", "bc01"]), int(pos), "" if pos else "*", sentence(rng, pos)]
                for pos in (rng.random() < 0.5 for _ in range(n // 4))]  # fmt: skip
        _write(root / "CoLA" / f"{split}.tsv", cola, None)
        # MRPC: BOM before the header, "Quality" is the label
        mrpc = [[int(p), 1000 + i, 2000 + i, a, b] for i, (a, b, p) in enumerate(pairs(n // 4))]
        _write(
            root / "MRPC" / f"{split}.tsv",
            mrpc,
            ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
            bom=True,
        )
        # STS-B: ten columns, float score
        stsb = [[i, rng.choice(GENRES), "f", "2012", f"{i:04d}", "none", "none", a, b, f"{(4.2 if p else 0.8) + rng.random() * 0.8:.3f}"]
                for i, (a, b, p) in enumerate(pairs(n // 4))]  # fmt: skip
        _write(root / "STS-B" / f"{split}.tsv", stsb,
               ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"])  # fmt: skip
        # QQP: id, qid1, qid2, question1, question2, is_duplicate
        qqp = [[i, 2 * i, 2 * i + 1, a, b, int(p)] for i, (a, b, p) in enumerate(pairs(n // 4))]
        _write(
            root / "QQP" / f"{split}.tsv",
            qqp,
            ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
        )
        # QNLI / RTE: string labels; WNLI: int labels
        for folder, names, fields in (
            ("QNLI", ("entailment", "not_entailment"), ["index", "question", "sentence", "label"]),
            ("RTE", ("entailment", "not_entailment"), ["index", "sentence1", "sentence2", "label"]),
            ("WNLI", None, ["index", "sentence1", "sentence2", "label"]),
        ):
            rows = [
                [i, a, b, (names[0] if p else names[1]) if names else int(p)]
                for i, (a, b, p) in enumerate(pairs(n // 4))
            ]
            _write(root / folder / f"{split}.tsv", rows, fields)
    # MNLI: train.tsv, dev_matched.tsv, dev_mismatched.tsv; genre column; gold_label last
    header = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]  # fmt: skip
    labels = ["entailment", "neutral", "contradiction"]
    for name, n in (("train", n_train // 4), ("dev_matched", n_dev // 4), ("dev_mismatched", n_dev // 4)):
        rows = []
        for i, (a, b, _) in enumerate(pairs(n)):
            gold = rng.choice(labels)
            rows.append([i, i, f"{i}e", rng.choice(GENRES), "(x)", "(y)", "(X)", "(Y)", a, b, gold, gold])
        _write(root / "MNLI" / f"{name}.tsv", rows, header)
    return root
