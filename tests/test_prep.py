"""`python -m distlstm.prep`: raw text / JSONL / CSV -> shards + manifest.

A failure here means prepared datasets lose or duplicate tokens, mislabel samples, leak between
train and valid, write manifests whose counts or checksums do not match the files (so the index and
resume logic are built on wrong numbers), or clobber a directory the user did not mean to replace.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from distlstm.data.prep import prep
from distlstm.data.shards.paths import expand_paths

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def _run(*args: str) -> dict:
    return prep.run(prep.build_parser().parse_args([*args, "--quiet"]))


def _rows(directory: Path, column: str) -> list:
    out = []
    for shard in json.loads((directory / "manifest.json").read_text())["shards"]:
        out += pq.read_table(directory / shard["path"]).column(column).to_pylist()
    return out


def _check_manifest(directory: Path) -> dict:
    manifest = json.loads((directory / "manifest.json").read_text())
    for shard in manifest["shards"]:
        data = (directory / shard["path"]).read_bytes()
        assert shard["bytes"] == len(data) and shard["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["num_samples"] == sum(s["num_samples"] for s in manifest["shards"])
    assert manifest["num_tokens"] == sum(s["num_tokens"] for s in manifest["shards"])
    return manifest


def _expected_lm_samples(n_tokens: int, seq_len: int) -> int:
    full = max(0, (n_tokens - 1) // seq_len)
    return full + (1 if n_tokens - full * seq_len >= 2 else 0)


def test_char_lm_text_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list("abcdefg hij\n")) for _ in range(3000))
    (tmp_path / "t.txt").write_text(text)
    out = tmp_path / "o"
    manifests = _run("--text", str(tmp_path / "t.txt"), "--seq-len", "50", "--valid-fraction", "0",
                     "--rows-per-group", "16", "--lm-layout", "windows", "--out", str(out))
    assert set(manifests) == {"train"} and not (out / "valid").exists()
    m = _check_manifest(out / "train")
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab["tokens"][0] == "<unk>" and sorted(vocab["tokens"][1:]) == sorted(set(text))
    assert m["vocab_size"] == len(vocab["tokens"]) and m["task"] == "lm" and m["label_column"] is None
    assert m["num_samples"] == _expected_lm_samples(3000, 50) == 60
    assert pq.ParquetFile(out / "train" / m["shards"][0]["path"]).metadata.row_group(0).num_rows == 16
    chunks = _rows(out / "train", "tokens")
    assert all(len(c) == 51 for c in chunks[:-1])
    # Consecutive samples share one token (the last target is the next input): undo that.
    ids = chunks[0] + [t for c in chunks[1:] for t in c[1:]]
    assert "".join(vocab["tokens"][i] for i in ids) == text


@pytest.mark.parametrize("fmt", ["parquet", "tar"])
def test_lm_stream_layout_keeps_every_token_once_and_marks_document_starts(tmp_path, fmt):
    """Stream layout: rows are consecutive, non-overlapping pieces of each document; `doc_start` is
    set exactly on each document's first row (in each split), so the rows concatenated give back the
    text, and the tail split's valid part starts a document of its own."""
    docs = ["first document, long enough for several rows\n" * 3, "second\n", "third one here\n" * 2]
    (tmp_path / "t.txt").write_text("\n".join(docs))
    out = tmp_path / "o"
    manifests = _run("--text", str(tmp_path / "t.txt"), "--doc-per", "blank-line", "--seq-len", "16",
                     "--split", "tail", "--valid-fraction", "0.2", "--format", fmt, "--out", str(out))
    vocab = json.loads((out / "vocab.json").read_text())["tokens"]
    texts = {}
    for split in ("train", "valid"):
        m = _check_manifest(out / split)
        assert m["lm_layout"] == "stream" and manifests[split]["lm_layout"] == "stream"
        if fmt == "parquet":
            rows, flags = _rows(out / split, "tokens"), _rows(out / split, "doc_start")
        else:
            rows, flags = [], []
            for shard in m["shards"]:
                side = json.loads((out / split / (shard["path"] + ".idx.json")).read_text())
                flags += [bool(f) for f in side["doc_start"]]
                with tarfile.open(out / split / shard["path"]) as tf:
                    for member in tf.getmembers():
                        rows.append(np.load(io.BytesIO(tf.extractfile(member).read())).tolist())
        assert all(1 <= len(r) <= 16 for r in rows)
        # Rebuild the documents from the flags: a new one at each doc_start.
        pieces: list[str] = []
        for r, f in zip(rows, flags):
            text = "".join(vocab[i] for i in r)
            pieces.append(text) if f else pieces.__setitem__(-1, pieces[-1] + text)
        texts[split] = pieces
    whole = [d + ("\n" if i < len(docs) - 1 else "") for i, d in enumerate(docs)]
    assert len(texts["train"]) == len(texts["valid"]) == 3
    assert [t + v for t, v in zip(texts["train"], texts["valid"])] == whole


def test_lm_stream_random_split_restarts_documents_in_each_split(tmp_path):
    (tmp_path / "t.txt").write_text("abcdefghij" * 40)
    out = tmp_path / "o"
    _run("--text", str(tmp_path / "t.txt"), "--seq-len", "4", "--valid-fraction", "0.25", "--out", str(out))
    for split in ("train", "valid"):
        flags = _rows(out / split, "doc_start")
        # Each split is one stream: a row continues the previous one only when that is the previous
        # piece of the document, so every row after a gap (a piece in the other split) starts anew.
        assert flags[0] and 1 < sum(flags) < len(flags)
    total = sum(len(r) for split in ("train", "valid") for r in _rows(out / split, "tokens"))
    assert total == 400
    with pytest.raises(SystemExit, match="--stride 2 applies to --lm-layout windows"):
        _run("--text", str(tmp_path / "t.txt"), "--seq-len", "4", "--stride", "2", "--out", str(tmp_path / "x"))


def test_valid_split_is_exact_deterministic_and_disjoint(tmp_path):
    rows = [{"x": [i + 1] * 3, "y": i % 2} for i in range(1000)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--jsonl", str(tmp_path / "in.jsonl"), "--tokens-field", "x", "--label-field", "y", "--task",
            "classify", "--valid-fraction", "0.1", "--seed", "3"]
    a = _run(*args, "--out", str(tmp_path / "a"))
    b = _run(*args, "--out", str(tmp_path / "b"))
    _run(*args[:-1], "4", "--out", str(tmp_path / "c"))
    assert a["valid"]["num_samples"] == 100 and a["train"]["num_samples"] == 900
    assert [s["sha256"] for s in a["valid"]["shards"]] == [s["sha256"] for s in b["valid"]["shards"]]
    va, ta = _rows(tmp_path / "a/valid", "tokens"), _rows(tmp_path / "a/train", "tokens")
    assert {r[0] for r in va}.isdisjoint({r[0] for r in ta}) and len(va) + len(ta) == 1000
    assert {r[0] for r in va} != {r[0] for r in _rows(tmp_path / "c/valid", "tokens")}  # the seed matters


def test_splitter_fraction_is_exact_for_many_fractions():
    for fraction in (0.01, 0.05, 0.1, 0.3, 0.5, 0.9):
        splitter = prep.Splitter(fraction, seed=1, block=1)
        picked = sum(splitter.is_valid(i) for i in range(10_000))
        assert abs(picked - fraction * 10_000) <= 1, fraction


def test_jsonl_word_tokens_and_string_labels(tmp_path):
    rows = [{"text": "the cat sat.", "label": "pos"}, {"text": "a dog, barking", "label": "neg"},
            {"text": "the end", "label": "pos"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    m = _run("--jsonl", str(tmp_path / "in.jsonl"), "--tokens-field", "text", "--tokenizer", "word",
             "--label-field", "label", "--task", "classify", "--valid-fraction", "0", "--out", str(tmp_path / "o"))
    train = m["train"]
    assert train["num_samples"] == 3 and train["num_classes"] == 2 and train["num_tokens"] == 4 + 4 + 2
    vocab = json.loads((tmp_path / "o/vocab.json").read_text())["tokens"]
    labels = json.loads((tmp_path / "o/labels.json").read_text())["labels"]
    assert labels == ["neg", "pos"] and _rows(tmp_path / "o/train", "label") == [1, 0, 1]
    assert [vocab[i] for i in _rows(tmp_path / "o/train", "tokens")[1]] == ["a", "dog", ",", "barking"]


def test_csv_regression_with_json_cells(tmp_path):
    with open(tmp_path / "in.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ids", "y"])
        for i in range(10):
            w.writerow([json.dumps(list(range(1, i + 2))), i / 4])
    m = _run("--csv", str(tmp_path / "in.csv"), "--tokens-field", "ids", "--label-field", "y",
             "--task", "regress", "--valid-fraction", "0", "--format", "tar", "--out", str(tmp_path / "o"))["train"]
    assert (m["format"], m["label_column"], m["vocab_size"], m["num_classes"]) == ("tar", "label", 11, None)
    from distlstm.data.shards.tar import read_tar_chunk

    chunk = read_tar_chunk(str(tmp_path / "o/train" / m["shards"][0]["path"]), task="regress")
    assert chunk.labels.tolist() == [i / 4 for i in range(10)] and chunk.lengths.tolist() == list(range(1, 11))
    _check_manifest(tmp_path / "o/train")


def test_features_tagging_to_parquet(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"x": rng.normal(size=(n, 4)).round(3).tolist(), "tags": rng.integers(0, 3, size=n).tolist()}
            for n in (3, 1, 7)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = _run("--jsonl", str(tmp_path / "in.jsonl"), "--features-field", "x", "--label-field", "tags",
             "--task", "tag", "--valid-fraction", "0", "--out", str(tmp_path / "o"))["train"]
    assert (m["sequence_column"], m["label_column"], m["input_size"], m["num_classes"]) == ("features", "tags", 4, 3)
    table = pq.read_table(tmp_path / "o/train" / m["shards"][0]["path"])
    assert str(table.schema.field("features").type) == "list<element: list<element: float>>"
    assert np.allclose(np.asarray(table.column("features").to_pylist()[2]), rows[2]["x"])
    assert table.column("tags").to_pylist() == [r["tags"] for r in rows]


def test_bad_records_fail_with_location_or_are_skipped(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"x": [1, 2], "y": 0}\n{"x": [3]}\n{"x": [4, 5], "y": 1}\n')
    args = ["--jsonl", str(tmp_path / "in.jsonl"), "--tokens-field", "x", "--label-field", "y", "--task",
            "classify", "--valid-fraction", "0"]
    with pytest.raises(SystemExit, match=r"in\.jsonl:2: needs fields 'x' and 'y'"):
        _run(*args, "--out", str(tmp_path / "a"))
    assert _run(*args, "--skip-bad", "--out", str(tmp_path / "b"))["train"]["num_samples"] == 2


def test_overwrite_refusal_and_safety(tmp_path):
    (tmp_path / "t.txt").write_text("hello world " * 50)
    args = ["--text", str(tmp_path / "t.txt"), "--seq-len", "16", "--out", str(tmp_path / "o")]
    first = _run(*args)
    with pytest.raises(SystemExit, match="not empty; pass --overwrite"):
        _run(*args)
    again = _run(*args, "--overwrite")
    assert [s["sha256"] for s in again["train"]["shards"]] == [s["sha256"] for s in first["train"]["shards"]]
    (tmp_path / "o" / "my_notes.txt").write_text("precious")
    with pytest.raises(SystemExit, match="did not write .*my_notes.txt"):
        _run(*args, "--overwrite")
    assert (tmp_path / "o" / "my_notes.txt").exists()


def test_output_feeds_expand_paths(tmp_path):
    (tmp_path / "t.txt").write_text("abcdefgh" * 400)
    m = _run("--text", str(tmp_path / "t.txt"), "--seq-len", "8", "--shard-size-mb", "0.001",
             "--rows-per-group", "32", "--out", str(tmp_path / "o"))["train"]
    assert len(m["shards"]) > 1
    assert expand_paths(str(tmp_path / "o/train")) == [str(tmp_path / "o/train" / s["path"]) for s in m["shards"]]


def test_cli_help_and_tinyshakespeare(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "distlstm.prep", "--help"], capture_output=True, text=True,
                         timeout=60, env=env, cwd=tmp_path)
    assert out.returncode == 0 and "examples:" in out.stdout and "--shard-size-mb" in out.stdout
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} not present")
    text = SHAKESPEARE.read_text(encoding="utf-8")
    cmd = [sys.executable, "-m", "distlstm.prep", "--text", str(SHAKESPEARE), "--seq-len", "256", "--split",
           "tail", "--valid-fraction", "0.1", "--lm-layout", "windows", "--out", str(tmp_path / "shakespeare"),
           "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    train, valid = (_check_manifest(tmp_path / "shakespeare" / split) for split in ("train", "valid"))
    n_valid = round(len(text) * 0.1)
    assert train["num_samples"] == _expected_lm_samples(len(text) - n_valid, 256)
    assert valid["num_samples"] == _expected_lm_samples(n_valid, 256)
    assert train["vocab_size"] == valid["vocab_size"] == len(set(text)) + 1 == 66


def _textbook_words(path: Path) -> list[str]:
    """How word-level corpora (PTB, WikiText) are read in the classic LM code: every line of the
    file, split on whitespace, then <eos>."""
    words = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            words += line.split() + ["<eos>"]
    return words


def test_whitespace_tokenizer_reads_pretokenised_corpora_like_the_textbook(tmp_path):
    """A pre-tokenised corpus: whitespace splits, <eos> at every line end (blank lines too, and a last
    line without a newline), a literal <unk> is id 0, and the ids decode back to the textbook stream."""
    text = " the cat <unk> sat \n\nthe  dog\tsat on the <unk>\r\n a mat\nthe end"
    (tmp_path / "w.txt").write_bytes(text.encode())
    out = tmp_path / "o"
    m = _run("--text", str(tmp_path / "w.txt"), "--tokenizer", "whitespace", "--seq-len", "4",
             "--valid-fraction", "0", "--out", str(out))["train"]
    vocab = json.loads((out / "vocab.json").read_text())
    assert vocab["tokenizer"] == "whitespace" and vocab["tokens"].count("<unk>") == 1 and vocab["tokens"][0] == "<unk>"
    chunks = _rows(out / "train", "tokens")
    ids = [t for c in chunks for t in c]  # the stream layout: consecutive rows, no overlap
    words = ["the", "cat", "<unk>", "sat", "<eos>", "<eos>", "the", "dog", "sat", "on", "the", "<unk>", "<eos>",
             "a", "mat", "<eos>", "the", "end", "<eos>"]
    assert [vocab["tokens"][i] for i in ids] == words
    assert m["vocab_size"] == len(vocab["tokens"]) == len(set(words))


def test_whitespace_tokenizer_on_tinyshakespeare_matches_the_textbook_count(tmp_path):
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} not present")
    words = _textbook_words(SHAKESPEARE)
    out = tmp_path / "w"
    manifests = _run("--text", str(SHAKESPEARE), "--tokenizer", "whitespace", "--seq-len", "35", "--split", "tail",
                     "--valid-fraction", "0.1", "--lm-layout", "windows", "--out", str(out))
    train, valid = manifests["train"], manifests["valid"]
    n_valid = round(len(words) * 0.1)
    assert train["num_samples"] == _expected_lm_samples(len(words) - n_valid, 35)
    assert valid["num_samples"] == _expected_lm_samples(n_valid, 35)
    assert train["vocab_size"] == len(set(words)) + 1  # + id 0 (<unk>/pad); the text has no literal <unk>
    vocab = json.loads((out / "vocab.json").read_text())["tokens"]
    chunks = _rows(out / "valid", "tokens")
    assert [vocab[i] for i in chunks[0] + [t for c in chunks[1:] for t in c[1:]]] == words[-n_valid:]
    # The stream layout (the default) holds the same words, in rows of 35 that do not overlap.
    stream = _run("--text", str(SHAKESPEARE), "--tokenizer", "whitespace", "--seq-len", "35", "--split", "tail",
                  "--valid-fraction", "0.1", "--out", str(tmp_path / "s"))
    assert stream["valid"]["num_samples"] == -(-n_valid // 35) and stream["valid"]["num_tokens"] == n_valid
    assert [vocab[i] for c in _rows(tmp_path / "s" / "valid", "tokens") for i in c] == words[-n_valid:]


@pytest.mark.parametrize("case", ["binary", "latin1", "out_is_a_file", "empty_text", "empty_jsonl", "overwrite_empty"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    """Issue 20 class 6: binary or non-UTF-8 input, --out naming a file, and empty input end in one
    error line naming the file or flag, exit 2, no traceback; nothing is written (a previous output
    kept under --overwrite)."""
    (tmp_path / "good.txt").write_text("hello world " * 50)
    (tmp_path / "data.bin").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    (tmp_path / "latin1.txt").write_bytes("first line\ncaf\u00e9 au lait\n".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "taken").write_text("mine")
    out = tmp_path / "out"
    args, expect = {
        "binary": (["--text", "data.bin"], "input file data.bin is not UTF-8 text (a NUL byte at offset 7"),
        "latin1": (["--text", "latin1.txt"], "input file latin1.txt is not UTF-8 text (byte 0xe9 at line 2, "),
        "out_is_a_file": (["--text", "good.txt", "--out", "taken"], "--out taken is a file; give a folder"),
        "empty_text": (["--text", "empty.txt"], "the input (empty.txt) holds no text"),
        "empty_jsonl": (["--jsonl", "empty.jsonl", "--tokens-field", "t", "--task", "lm"],
                        "the input (empty.jsonl) holds no records"),
        "overwrite_empty": (["--text", "empty.txt", "--overwrite"], "the input (empty.txt) holds no text"),
    }[case]
    if case == "overwrite_empty":
        _run("--text", str(tmp_path / "good.txt"), "--seq-len", "16", "--out", str(out))
    if "--out" not in args:
        args += ["--out", "out"]
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    proc = subprocess.run([sys.executable, "-m", "distlstm.prep", *args, "--quiet"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"distlstm.prep: error: {expect}"), lines[0]
    assert {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert out.exists() == (case == "overwrite_empty")
