"""`python -m distlstm.prep`: raw text / JSONL / CSV -> Parquet or tar shards + manifest.json.

Two streaming passes over the input: pass 1 builds the vocabulary and label set and counts records;
pass 2 tokenises, splits train/valid and writes shards. Memory holds one document's token ids at a
time (4 bytes per token): split huge single-document text with --doc-per line or blank-line.
"""

from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from distlstm.data.plan.chunks import LENGTHS_KEY, encode_block, histogram_block
from distlstm.data.plan.stream import DOC_START_COLUMN
from distlstm.data.shards.manifest import Manifest, ShardInfo
from distlstm.data.shards.tar import write_sidecar
from distlstm.data.sources import file_digest
from distlstm.data.vocab import TOKENIZERS, UNK, Vocab, tokenize
from distlstm.tasks import TASKS, get_task, npy_bytes

_OUTPUTS = ("train", "valid", "vocab.json", "labels.json")

EXAMPLES = """examples:
  # character-level language modelling on one text file, 256-token sequences, Parquet shards
  python -m distlstm.prep --text data/tinyshakespeare.txt --tokenizer char --seq-len 256 --out data/shakespeare
  # same, nanoGPT-style split (last 10%% of the text is the validation set), tar shards
  python -m distlstm.prep --text book.txt --split tail --valid-fraction 0.1 --format tar --out data/book
  # word-level corpus distributed pre-tokenised (PTB, WikiText): split on whitespace, <eos> at each line end
  python -m distlstm.prep --text ptb.train.txt --tokenizer whitespace --seq-len 35 --out data/ptb
  # sequence classification from JSONL: {"text": "...", "label": "positive"}
  python -m distlstm.prep --jsonl reviews.jsonl --tokens-field text --tokenizer word --label-field label \\
      --task classify --out data/reviews
  # regression from CSV with pre-tokenised ids in a JSON cell: ids,y  ->  "[3, 17, 5]",0.25
  python -m distlstm.prep --csv rows.csv --tokens-field ids --label-field y --task regress --out data/rows
  # per-step tagging of float feature vectors: {"x": [[0.1, 2.0], ...], "tags": [0, 1, ...]}
  python -m distlstm.prep --jsonl sensors.jsonl --features-field x --label-field tags --task tag --out data/s
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m distlstm.prep", description=__doc__, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("input (exactly one of --text, --jsonl, --csv)")
    src.add_argument("--text", nargs="+", metavar="FILE", help="plain UTF-8 text files (task lm only)")
    src.add_argument("--jsonl", nargs="+", metavar="FILE", help="JSON Lines files, one record per line")
    src.add_argument("--csv", nargs="+", metavar="FILE", help="CSV files with a header row; list-valued cells "
                     "are JSON (\"[1, 2, 3]\"), any other sequence cell is text for --tokenizer")
    src.add_argument("--tokens-field", metavar="NAME", help="JSONL/CSV field holding token ids (a list of ints) "
                     "or text (tokenised with --tokenizer)")
    src.add_argument("--features-field", metavar="NAME", help="JSONL/CSV field holding float feature vectors, "
                     "a list of T lists of F floats")
    src.add_argument("--label-field", metavar="NAME", help="JSONL/CSV field holding the label: an int or a "
                     "string class (classify), a float or list of floats (regress), a list per step (tag)")
    src.add_argument("--doc-per", choices=("file", "line", "blank-line"), default="file",
                     help="--text: what one document is; lm chunks never cross documents (default: file)")
    task = p.add_argument_group("task and tokenisation")
    task.add_argument("--task", choices=TASKS,
                      help="what the labels are for; default lm for --text, required otherwise")
    task.add_argument("--tokenizer", choices=TOKENIZERS, default="char",
                      help="for text: char = every character is a token; word = words and punctuation "
                      "(regex \\w+|[^\\w\\s]); whitespace = pre-tokenised text: split on whitespace, <eos> "
                      "at the end of every line (as word-level corpora such as PTB and WikiText are "
                      "distributed). Vocabulary ids start at 1, id 0 is <unk>/pad, and a literal <unk> in "
                      "the text maps to it (default: char)")
    task.add_argument("--min-count", type=int, default=1, help="tokens seen fewer times map to <unk> (default: 1)")
    task.add_argument("--max-vocab", type=int, default=0, help="keep only the most frequent N tokens; 0 = all")
    task.add_argument("--vocab", metavar="FILE", help="reuse this vocabulary (the vocab.json of an earlier prep, "
                      "e.g. of the training text) instead of building one, so that splits prepped from separate "
                      "files share token ids; tokens not in it map to <unk> (text inputs only)")
    task.add_argument("--lm-layout", choices=("stream", "windows"), default="stream",
                      help="lm: stream = each document's tokens in consecutive rows of --seq-len tokens, "
                      "no overlap, with a 'doc_start' flag on a document's first row (for data.lm_mode=stream; "
                      "data.lm_mode=windows reads each row as one sample); windows = independent training "
                      "windows of seq_len + 1 tokens, overlapping by one (data.lm_mode=windows only) "
                      "(default: stream)")
    task.add_argument("--seq-len", type=int, default=256, help="lm: tokens per row (stream layout) or per "
                      "training window, each stored as seq_len + 1 tokens (windows layout) (default: 256)")
    task.add_argument("--stride", type=int, default=0, help="lm windows layout: tokens between starts of "
                      "consecutive samples, 1..seq_len; < seq_len overlaps samples (default: seq_len)")
    task.add_argument("--max-len", type=int, default=0, help="classify/regress/tag: truncate longer sequences "
                      "to this many steps; 0 = keep whole (default: 0)")
    out = p.add_argument_group("output")
    out.add_argument("--out", required=True, metavar="DIR", help="output directory (local); gets train/, valid/, "
                     "vocab.json (text inputs), labels.json (string labels)")
    out.add_argument("--format", choices=("parquet", "tar"), default="parquet", help="shard format (default: parquet)")
    out.add_argument("--shard-size-mb", type=float, default=128.0, help="target shard size in MB (default: 128)")
    out.add_argument("--rows-per-group", type=int, default=1024, help="Parquet rows per row group, the unit "
                     "the loader reads (default: 1024)")
    out.add_argument("--valid-fraction", type=float, default=0.05, help="fraction of samples in valid/; "
                     "0 = no valid/ directory (default: 0.05)")
    out.add_argument("--split", choices=("random", "tail"), default="random",
                     help="random = every block of --split-block samples goes to valid with the given fraction, "
                     "stratified so the fraction is exact; tail = the last fraction of every document (lm only) "
                     "(default: random)")
    out.add_argument("--split-block", type=int, default=1, help="random split unit in consecutive samples; raise "
                     "it with overlapping --stride so that valid text is not seen in training (default: 1)")
    out.add_argument("--seed", type=int, default=0, help="seed of the train/valid split (default: 0)")
    out.add_argument("--overwrite", action="store_true", help="replace a previous prep output in --out")
    out.add_argument("--skip-bad", action="store_true", help="skip records with missing or malformed fields "
                     "(counted and reported) instead of stopping at the first")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


class PrepError(SystemExit):
    """A user error: `main` prints it as one line and exits 2 (str() is the line)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2


def _fail(message: str) -> None:
    raise PrepError(f"distlstm.prep: error: {message}")


def _not_text(path: str, where: str, reason: str) -> None:
    _fail(f"input file {path} is not UTF-8 text ({reason}{where}); give a text, JSONL or CSV file "
          f"(convert another encoding first, e.g. iconv -f latin1 -t utf-8)")


def _check_args(a: argparse.Namespace) -> None:
    inputs = [name for name in ("text", "jsonl", "csv") if getattr(a, name)]
    if len(inputs) != 1:
        _fail(f"give exactly one of --text, --jsonl, --csv (got {', '.join('--' + i for i in inputs) or 'none'})")
    a.input_kind = inputs[0]
    a.files = getattr(a, a.input_kind)
    for path in a.files:
        if not os.path.isfile(path):
            _fail(f"input file {path} does not exist")
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        nul = head.find(b"\0")
        if nul >= 0:  # valid UTF-8, but no text file has NUL bytes: a binary file
            _not_text(path, "", f"a NUL byte at offset {nul}: a binary file?")
    if a.input_kind == "text":
        if a.task is not None and get_task(a.task).has_labels:
            _fail(f"--task {a.task} needs labels; plain --text supports only --task lm (use --jsonl/--csv)")
        a.task = "lm"
    else:
        if bool(a.tokens_field) == bool(a.features_field):
            _fail("give exactly one of --tokens-field, --features-field for --jsonl/--csv")
        if a.task is None:
            _fail("--task is required for --jsonl/--csv (classify, regress, tag or lm)")
        if get_task(a.task).has_labels and not a.label_field:
            _fail(f"--task {a.task} needs --label-field")
        if get_task(a.task).predicts_tokens and a.features_field:
            _fail("--task lm needs token ids (--tokens-field), not --features-field")
    a.kind = get_task(a.task)
    if a.stride and a.kind.predicts_tokens and a.lm_layout == "stream" and a.stride != a.seq_len:
        _fail(f"--stride {a.stride} applies to --lm-layout windows; the stream layout never overlaps rows")
    a.stride = a.stride or a.seq_len
    if a.seq_len < 1 or not 1 <= a.stride <= a.seq_len:
        _fail(f"--seq-len {a.seq_len} / --stride {a.stride}: need seq_len >= 1 and 1 <= stride <= seq_len")
    if not 0.0 <= a.valid_fraction < 1.0:
        _fail(f"--valid-fraction {a.valid_fraction}: must be in [0, 1)")
    if a.split == "tail" and not a.kind.predicts_tokens:
        _fail("--split tail is for --task lm; use --split random")
    for flag in ("shard_size_mb", "rows_per_group", "split_block"):
        if getattr(a, flag) <= 0:
            _fail(f"--{flag.replace('_', '-')} must be > 0")


# ---------------------------------------------------------------------------------------------- reading


def _text_documents(paths: list[str], doc_per: str) -> Iterator[tuple[str, list[str]]]:
    """(where, lines) per document; for doc_per=file the lines come in pieces of at most 64k lines."""
    for path in paths:
        with open(path, encoding="utf-8", newline="") as f:
            lines, start = [], 1
            for lineno, line in _decoded(f, path):
                if doc_per == "line":
                    yield f"{path}:{lineno}", [line]
                elif doc_per == "blank-line" and not line.strip():
                    if lines:
                        yield f"{path}:{start}", lines + [line]
                    lines, start = [], lineno + 1
                else:
                    lines.append(line)
                    if doc_per == "file" and len(lines) >= 65536:
                        yield f"{path}:{start}+", lines  # "+": the same document continues
                        lines, start = [], lineno + 1
            if lines:
                yield f"{path}:{start}", lines


def _decoded(f, path: str) -> Iterator:
    """enumerate(f, 1), with a decoding error as one line naming the file, line and byte."""
    lines = enumerate(f, 1)
    while True:
        try:
            yield next(lines)
        except StopIteration:
            return
        except UnicodeDecodeError:
            _not_text(path, *_first_bad_byte(path))


def _first_bad_byte(path: str) -> tuple[str, str]:
    """(where, what) of the first byte in `path` that is not UTF-8 (only after a decoding error: the
    text reader decodes ahead in chunks, so its line number is not the line at fault)."""
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):  # a multi-byte character never spans b"\n"
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return f" at line {number}, byte offset {offset + exc.start}", f"byte {line[exc.start]:#04x}"
            offset += len(line)
    return "", "a decoding error"


def _parse_cell(value: Any, where: str, name: str) -> Any:
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError(f"{where}: field '{name}' starts with '[' but is not valid JSON") from None
    return value


def _records(a) -> Iterator[tuple[str, Any, Any]]:
    """(where, sequence field, label field) per JSONL/CSV record."""
    seq_field = a.tokens_field or a.features_field
    for path in a.files:
        with open(path, encoding="utf-8", newline="") as f:
            lines = (line for _, line in _decoded(f, path))
            rows = (json.loads(line) if line.strip() else None for line in lines) if a.input_kind == "jsonl" \
                else csv.DictReader(lines)
            for number, row in enumerate(rows, 1 if a.input_kind == "jsonl" else 2):
                where = f"{path}:{number}"
                if row is None:
                    continue
                if not isinstance(row, dict) or seq_field not in row or (a.label_field and a.label_field not in row):
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    wanted = f"'{seq_field}'" + (f" and '{a.label_field}'" if a.label_field else "")
                    yield where, ValueError(f"{where}: needs fields {wanted}, has {keys}"), None
                    continue
                try:
                    seq = _parse_cell(row[seq_field], where, seq_field)
                    label = _parse_cell(row[a.label_field], where, a.label_field) if a.label_field else None
                except ValueError as exc:
                    yield where, exc, None
                    continue
                yield where, seq, label


# ---------------------------------------------------------------------------------------------- pass 1


@dataclass
class Survey:
    """What pass 1 learns: vocabulary, label classes, sizes."""

    counts: collections.Counter = field(default_factory=collections.Counter)
    max_token_id: int = -1
    labels: set = field(default_factory=set)
    max_label: int = -1
    input_size: int | None = None
    doc_tokens: list[int] = field(default_factory=list)
    records: int = 0
    itos: list[str] | None = None
    label_ids: dict | None = None


def _survey(a) -> Survey:
    s = Survey()
    if a.input_kind == "text":
        last_doc = None
        for where, lines in tqdm(_text_documents(a.files, a.doc_per), desc="pass 1/2", unit="doc", disable=a.quiet):
            n = 0
            for line in lines:
                tokens = tokenize(line, a.tokenizer)
                s.counts.update(tokens)
                n += len(tokens)
            if last_doc is not None and last_doc.endswith("+") and where.split(":")[0] == last_doc.split(":")[0]:
                s.doc_tokens[-1] += n
            else:
                s.doc_tokens.append(n)
            last_doc = where
            s.records += 1
    else:
        for where, seq, label in tqdm(_records(a), desc="pass 1/2", unit="rec", disable=a.quiet):
            s.records += 1
            if isinstance(seq, Exception):
                continue
            if isinstance(seq, str):
                tokens = tokenize(seq, a.tokenizer)
                s.counts.update(tokens)
                s.doc_tokens.append(len(tokens))
            elif a.tokens_field and isinstance(seq, list):
                s.max_token_id = max([s.max_token_id] + [t for t in seq if isinstance(t, int)])
                s.doc_tokens.append(len(seq))
            elif a.features_field and isinstance(seq, list) and seq and isinstance(seq[0], list):
                s.input_size = s.input_size or len(seq[0])
            for value in a.kind.label_values(label):
                if isinstance(value, str) and a.kind.named_labels:
                    try:
                        value = int(value)
                    except ValueError:
                        s.labels.add(value)
                        continue
                if isinstance(value, int) and not isinstance(value, bool):
                    s.max_label = max(s.max_label, value)
    if a.vocab:
        s.itos = _reused_vocab(a, s)
    elif s.counts:
        # A literal <unk> (pre-tokenised corpora mark rare words with it) is id 0, not a second entry.
        ranked = sorted(((t, c) for t, c in s.counts.items() if c >= a.min_count and t != UNK),
                        key=lambda tc: (-tc[1], tc[0]))
        if a.max_vocab:
            ranked = ranked[: a.max_vocab]
        s.itos = [UNK] + [t for t, _ in ranked]
    if s.labels:
        if s.max_label >= 0:
            _fail(f"labels in '{a.label_field}' mix integers and strings ({sorted(s.labels)[:3]}...); use one kind")
        s.label_ids = {name: i for i, name in enumerate(sorted(s.labels))}
    return s


def _reused_vocab(a, s: Survey) -> list[str]:
    """--vocab FILE: its tokens, checked against this prep's tokenizer and inputs."""
    if s.max_token_id >= 0:
        _fail(f"--vocab {a.vocab}: the records hold token ids, not text; ids need no vocabulary (give training "
              f"--model.vocab_size if the splits' largest ids differ)")
    if a.min_count != 1 or a.max_vocab:
        _fail(f"--vocab {a.vocab} fixes the vocabulary; drop --min-count / --max-vocab")
    try:
        vocab = Vocab.read(a.vocab)
    except (OSError, ValueError) as exc:
        _fail(f"--vocab {a.vocab}: {exc}")
    if vocab.tokenizer != a.tokenizer:
        _fail(f"--vocab {a.vocab} was built with --tokenizer {vocab.tokenizer}; pass --tokenizer {vocab.tokenizer}")
    if vocab.unk_id != 0 or not vocab.tokens or vocab.tokens[0] != UNK:
        _fail(f"--vocab {a.vocab}: id 0 is not {UNK}; give a vocab.json written by distlstm.prep")
    return vocab.tokens


# ---------------------------------------------------------------------------------------------- pass 2


def _to_sample(a, s: Survey, stoi: dict, seq: Any, label: Any, where: str) -> tuple[np.ndarray, Any]:
    """One record as (sequence array, label); ValueError naming `where` if malformed."""
    if isinstance(seq, str):
        if a.features_field:
            raise ValueError(f"{where}: '{a.features_field}' is text, expected a list of float lists")
        array = np.fromiter((stoi.get(t, 0) for t in tokenize(seq, a.tokenizer)), np.int32)
    elif a.tokens_field:
        if not isinstance(seq, list) or not all(isinstance(t, int) and t >= 0 for t in seq):
            raise ValueError(f"{where}: '{a.tokens_field}' must be text or a list of non-negative ints")
        array = np.asarray(seq, np.int32)
    else:
        try:
            array = np.asarray(seq, np.float32)
        except (ValueError, TypeError):
            array = np.zeros(0)
        if array.ndim != 2 or array.shape[1] != s.input_size:
            raise ValueError(f"{where}: '{a.features_field}' must be T lists of {s.input_size} floats")
        if not np.isfinite(array).all():
            raise ValueError(f"{where}: '{a.features_field}' contains NaN or inf")
    if a.max_len and a.kind.has_labels:
        array = array[: a.max_len]
    if not a.kind.has_labels:
        return array, None
    if len(array) == 0:
        raise ValueError(f"{where}: empty sequence")
    try:
        return array, a.kind.parse_label(label, length=len(array), names=s.label_ids)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"{where}: field '{a.label_field}' = {str(label)[:40]!r}: {exc}") from None


def _lm_chunks(tokens: np.ndarray, seq_len: int, stride: int) -> Iterator[np.ndarray]:
    """Samples of seq_len + 1 tokens, starting every `stride`; a shorter tail if it adds new targets."""
    n, start = len(tokens), 0
    while start + seq_len + 1 <= n:
        yield tokens[start: start + seq_len + 1]
        start += stride
    covered = start - stride + seq_len + 1 if start else 0  # tokens already used as targets
    if n - start >= 2 and n > covered:
        yield tokens[start:]


class Splitter:
    """Train/valid assignment: stratified by blocks of samples, exact fraction, streaming, seeded."""

    def __init__(self, fraction: float, seed: int, block: int):
        self.fraction, self.seed, self.block = fraction, seed, block

    def _stratum(self, block: int) -> int:
        return int(np.floor(block * self.fraction))

    def _first_block(self, stratum: int) -> int:
        b = int(np.ceil(stratum / self.fraction))  # then fix float rounding against _stratum
        while self._stratum(b) < stratum:
            b += 1
        while b > 0 and self._stratum(b - 1) >= stratum:
            b -= 1
        return b

    def _chosen(self, stratum: int) -> int:
        lo, hi = self._first_block(stratum), self._first_block(stratum + 1)
        digest = hashlib.blake2b(f"{self.seed}:{stratum}".encode(), digest_size=8).digest()
        return lo + int.from_bytes(digest, "little") % max(1, hi - lo)

    def is_valid(self, sample_index: int) -> bool:
        if self.fraction <= 0:
            return False
        block = sample_index // self.block
        return self._chosen(self._stratum(block)) == block


# ---------------------------------------------------------------------------------------------- writing


class ShardWriter:
    """Writes one split's samples into shards of about `shard_bytes`, returning manifest entries."""

    def __init__(self, directory: str, split: str, fmt: str, task: str, features: bool,
                 shard_bytes: int, rows_per_group: int):
        self.directory, self.split, self.fmt, self.features = directory, split, fmt, features
        self.task = get_task(task)
        self.shard_bytes, self.rows_per_group = shard_bytes, rows_per_group
        self.shards: list[dict] = []
        self.pending: list[tuple[np.ndarray, Any]] = []
        self.file = self.writer = None
        self.keys: list[str] = []
        self.lengths: list[int] = []
        self.doc_start: list[bool] = []
        self.count = 0
        os.makedirs(directory, exist_ok=True)

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.{self.fmt}"
        self.name, self.path = name, os.path.join(self.directory, name)
        self.file = open(self.path, "wb")
        self.keys, self.lengths, self.doc_start, self.group_rows = [], [], [], []
        if self.fmt == "tar":
            from webdataset import TarWriter

            self.writer = TarWriter(self.file, encoder=False, mtime=0.0)  # fixed mtime: reproducible bytes

    def add(self, seq: np.ndarray, label: Any) -> None:
        if self.file is None:
            self._open()
        key = f"{self.count:010d}"
        self.count += 1
        self.keys.append(key)
        self.lengths.append(len(seq))
        if not self.task.has_labels and label is not None:
            self.doc_start.append(bool(label))
        if self.fmt == "tar":
            sample = {"__key__": key, ("features.npy" if self.features else "tokens.npy"): npy_bytes(seq)}
            if self.task.has_labels:
                sample[self.task.tar_label] = self.task.tar_label_bytes(label)
            self.writer.write(sample)
        else:
            self.pending.append((seq, label))
            if len(self.pending) >= self.rows_per_group:
                self._write_group()
        if self.file.tell() >= self.shard_bytes:
            self._close_shard()

    def _write_group(self) -> None:
        seqs, labels = zip(*self.pending)
        self.pending = []
        offsets = np.zeros(len(seqs) + 1, np.int32)
        np.cumsum([len(x) for x in seqs], out=offsets[1:])
        flat = np.concatenate(seqs)
        if self.features:
            width = flat.shape[1]
            steps = pa.ListArray.from_arrays(pa.array(np.arange(0, flat.size + 1, width, dtype=np.int32)),
                                             pa.array(flat.reshape(-1)))
            columns = {"features": pa.ListArray.from_arrays(pa.array(offsets), steps)}
        else:
            columns = {"tokens": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat.astype(np.int32)))}
        if self.task.has_labels:
            columns[self.task.label_column] = self.task.label_array(list(labels))
        elif labels[0] is not None:
            columns[DOC_START_COLUMN] = pa.array(np.asarray(labels, bool))
        table = pa.table(columns)
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.file, table.schema)
        self.writer.write_table(table, row_group_size=len(seqs))
        self.group_rows.append(len(seqs))

    def _close_shard(self) -> None:
        if self.file is None:
            return
        if self.pending:
            self._write_group()
        if self.fmt != "tar":  # the index reads the row groups' length histograms from the footer
            block = histogram_block(0, self.group_rows, np.asarray(self.lengths, np.int64))
            self.writer.add_key_value_metadata({LENGTHS_KEY: encode_block(block, "features" if self.features
                                                                          else "tokens")})
        self.writer.close()
        self.file.close()
        size = os.path.getsize(self.path)
        if self.fmt == "tar":

            write_sidecar(self.path, self.keys, self.lengths, size,
                          extra={DOC_START_COLUMN: [int(f) for f in self.doc_start]} if self.doc_start else None)
        self.shards.append({"path": self.name, "num_samples": len(self.keys), "num_tokens": int(sum(self.lengths)),
                            "bytes": size, "sha256": file_digest(self.path)[1]})
        self.file = self.writer = None

    def close(self) -> list[dict]:
        self._close_shard()
        return self.shards


def _write_manifest(directory: str, a, s: Survey, shards: list[dict]) -> Manifest:
    features = bool(a.features_field)
    task = get_task(a.task)
    if task.needs_classes:
        num_classes = len(s.label_ids) if s.label_ids else s.max_label + 1
    else:
        num_classes = None
    manifest = Manifest(
        format=a.format, task=a.task, sequence_column="features" if features else "tokens",
        label_column=task.label_column, vocab_size=None if features else (len(s.itos) if s.itos else s.max_token_id + 1),
        num_classes=num_classes, input_size=s.input_size if features else None,
        num_samples=sum(x["num_samples"] for x in shards), num_tokens=sum(x["num_tokens"] for x in shards),
        vocab="../vocab.json" if s.itos else None, labels="../labels.json" if s.label_ids else None,
        shards=[ShardInfo(**x) for x in shards], extra={"lm_layout": a.lm_layout} if a.kind.predicts_tokens else {})
    manifest.write(directory)  # the manifest appears last: a commit marker
    return manifest


def _check_out(a) -> None:
    """Before reading the input: --out is a new folder, an empty one, or (--overwrite) a prep output."""
    if os.path.exists(a.out) and not os.path.isdir(a.out):
        _fail(f"--out {a.out} is a file; give a folder (created if missing)")
    if os.path.isdir(a.out) and os.listdir(a.out):
        if not a.overwrite:
            _fail(f"output directory {a.out} is not empty; pass --overwrite to replace a previous prep output")
        foreign = sorted(set(os.listdir(a.out)) - set(_OUTPUTS))
        if foreign:
            _fail(f"--overwrite refused: {a.out} holds files prep did not write ({', '.join(foreign[:5])}); "
                  f"remove them yourself or choose another --out")


def _prepare_out(a) -> None:
    """After the input was read: clear a previous prep output (--overwrite), create --out."""
    if os.path.isdir(a.out):
        for name in _OUTPUTS:
            path = os.path.join(a.out, name)
            shutil.rmtree(path) if os.path.isdir(path) else (os.path.exists(path) and os.remove(path))
    os.makedirs(a.out, exist_ok=True)


# ---------------------------------------------------------------------------------------------- main


def _samples(a, s: Survey) -> Iterator[tuple[str, np.ndarray, Any, bool | None]]:
    """(where, sequence, label, forced split or None) in input order."""
    stoi = {t: i for i, t in enumerate(s.itos)} if s.itos else {}
    document = 0
    if a.input_kind == "text":
        docs = _text_documents(a.files, a.doc_per)
        def encode(lines: list[str]) -> np.ndarray:
            return np.fromiter((stoi.get(t, 0) for line in lines for t in tokenize(line, a.tokenizer)), np.int32)

        records = ((where, encode(lines), None) for where, lines in docs)
        records = _merge_continued(records)
    else:
        records = _records(a)
    for where, seq, label in records:
        if isinstance(seq, Exception):
            yield where, seq, None, None
            continue
        try:
            array, value = _to_sample(a, s, stoi, seq, label, where) if not isinstance(seq, np.ndarray) else (seq, None)
        except ValueError as exc:
            yield where, exc, None, None
            continue
        if not a.kind.predicts_tokens:
            yield where, array, value, None
            continue
        cut = len(array) - int(round(len(array) * a.valid_fraction)) if a.split == "tail" else len(array)
        for part, forced in ((array[:cut], False if a.split == "tail" else None), (array[cut:], True)):
            if a.lm_layout == "windows":
                for chunk in _lm_chunks(part, a.seq_len, a.stride):
                    yield where, chunk, None, forced
                continue
            # Stream layout: the label is (document part, piece number); run() turns it into doc_start.
            document += 1
            for piece, start in enumerate(range(0, len(part), a.seq_len)):
                yield where, part[start:start + a.seq_len], (document, piece), forced


def _merge_continued(records):
    """Join the pieces of one long --text document (where ends with '+') back into one array."""
    pending = []
    for where, array, label in records:
        pending.append(array)
        if not where.endswith("+"):
            yield where, np.concatenate(pending), label
            pending = []
    if pending:
        yield "end", np.concatenate(pending), None


def run(a) -> dict[str, dict]:
    """Prep with parsed arguments; returns {split: manifest}."""
    _check_args(a)
    _check_out(a)
    s = _survey(a)
    if not s.records:
        _fail(f"the input ({', '.join(a.files)}) holds no {'text' if a.input_kind == 'text' else 'records'}: "
              f"nothing to prepare; give a file with some")
    _prepare_out(a)
    if s.itos:
        with open(os.path.join(a.out, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump({"version": 1, "tokenizer": a.tokenizer, "unk_id": 0, "pad_id": 0, "tokens": s.itos}, f,
                      ensure_ascii=False)
    if s.label_ids:
        with open(os.path.join(a.out, "labels.json"), "w", encoding="utf-8") as f:
            json.dump({"version": 1, "labels": sorted(s.label_ids, key=s.label_ids.get)}, f, ensure_ascii=False)
    splits = ["train"] + (["valid"] if a.valid_fraction > 0 else [])
    writers = {name: ShardWriter(os.path.join(a.out, name), name, a.format, a.task, bool(a.features_field),
                                 int(a.shard_size_mb * 1e6), a.rows_per_group) for name in splits}
    splitter = Splitter(a.valid_fraction, a.seed, a.split_block)
    skipped, index = [], 0
    last_piece: dict[str, tuple] = {}  # stream layout: the (document, piece) each split wrote last
    bar = tqdm(total=s.records, desc="pass 2/2", unit="rec" if a.input_kind != "text" else "doc", disable=a.quiet)
    last_where = None
    for where, seq, label, forced in _samples(a, s):
        if where != last_where:
            bar.update(1)
            last_where = where
        if isinstance(seq, Exception):
            if not a.skip_bad:
                bar.close()
                _fail(f"{seq}; fix the record or pass --skip-bad")
            skipped.append(str(seq))
            continue
        valid = forced if forced is not None else splitter.is_valid(index)
        index += forced is None
        split = "valid" if valid and "valid" in writers else "train"
        if a.kind.predicts_tokens and label is not None:
            # A row continues a document only if this split's previous row is its previous piece
            # (a random split may have sent that one to the other split).
            document, piece = label
            label = last_piece.get(split) != (document, piece - 1)
            last_piece[split] = (document, piece)
        writers[split].add(seq, label)
    bar.close()
    manifests = {name: _write_manifest(w.directory, a, s, w.close()).to_dict() for name, w in writers.items()}
    if skipped:
        print(f"distlstm.prep: skipped {len(skipped)} bad records, e.g. {skipped[0]}", file=sys.stderr)
    for name, m in manifests.items():
        print(f"{name}: {m['num_samples']} samples, {m['num_tokens']} tokens, {len(m['shards'])} shards "
              f"-> {os.path.join(a.out, name)}", file=sys.stderr)
    return manifests


def main(argv: list[str] | None = None) -> int:
    try:
        run(build_parser().parse_args(argv))
    except PrepError as exc:
        print(exc, file=sys.stderr)
        return 2
    except OSError as exc:  # unreadable input, unwritable --out, a full disk: one line, not a traceback
        print(f"distlstm.prep: error: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
