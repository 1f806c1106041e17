"""The vocabulary of a text dataset and the one tokenizer: `distlstm.prep` tokenises the training
text with `tokenize` and writes the token strings to vocab.json; `Vocab` reads that file back and
encodes new text the same way (generate, predict on raw text)."""

from __future__ import annotations

import json
import re
from pathlib import Path

_WORD = re.compile(r"\w+|[^\w\s]")
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
UNK, EOS = "<unk>", "<eos>"
TOKENIZERS = ("char", "word", "whitespace")


def tokenize(text: str, tokenizer: str) -> list[str]:
    """Tokens of `text`: characters (char), words and punctuation marks (word), or whitespace-separated
    tokens with <eos> ending each line (whitespace: pre-tokenised corpora such as WikiText)."""
    if tokenizer == "whitespace":
        lines = _LINE_BREAK.split(text)
        if lines[-1] == "":
            lines.pop()  # text that ends with a line break (or is empty) has no line after it
        return [token for line in lines for token in line.split() + [EOS]]
    return list(text) if tokenizer == "char" else _WORD.findall(text)


class Vocab:
    """Token strings of a prepared text dataset (prep's vocab.json): `encode(text)` -> ids the way
    prep tokenised the training text, `decode(ids)` -> text. Id `unk_id` stands for unknown tokens."""

    def __init__(self, tokens: list[str], *, tokenizer: str, unk_id: int = 0):
        self.tokens, self.tokenizer, self.unk_id = list(tokens), tokenizer, unk_id
        self._ids = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def read(cls, path: str | Path) -> "Vocab":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls(data["tokens"], tokenizer=data.get("tokenizer", "char"), unk_id=int(data.get("unk_id", 0)))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:  # ValueError: not JSON, not UTF-8
            raise ValueError(f"{path}: not a distlstm vocabulary ({exc}); expected vocab.json as written by "
                             f"distlstm.prep") from None

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(t, self.unk_id) for t in tokenize(text, self.tokenizer)]

    def decode(self, ids) -> str:
        """Text of `ids`: characters joined; words joined by spaces (whitespace: <eos> ends a line)."""
        tokens = [self.tokens[int(i)] for i in ids]
        if self.tokenizer == "char":
            return "".join(tokens)
        if self.tokenizer == "whitespace":
            return " ".join(tokens).replace(" <eos> ", "\n").replace(" <eos>", "\n").replace("<eos> ", "\n")
        return " ".join(tokens)
