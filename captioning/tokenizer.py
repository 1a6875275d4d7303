"""Word tokenizer with a JSON vocabulary (never pickle).

Standardisation follows the reference design: lower-case, punctuation stripped, whitespace
collapsed. Ids 0-3 are reserved: <pad>=0, <unk>=1, <start>=2, <end>=3.
"""

from __future__ import annotations

import json
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np

PAD, UNK, START, END = "<pad>", "<unk>", "<start>", "<end>"
SPECIAL_TOKENS = (PAD, UNK, START, END)
PAD_ID, UNK_ID, START_ID, END_ID = range(4)

_PUNCTUATION = re.compile("[" + re.escape(string.punctuation) + "]")


def standardize(text: str) -> str:
    """Lower case, punctuation and symbols turned into spaces, whitespace collapsed. Beyond ASCII,
    every character Unicode calls punctuation or a symbol counts (curly quotes and apostrophes,
    dashes, ellipses, guillemets, CJK punctuation, emoji), so that text from word processors gives
    the words the same text typed in ASCII does; letters and marks of every script stay. The rest is
    then brought to Unicode's NFKC form, so that one word is one entry however it was typed (an
    accent composed or as a combining mark, as macOS and some exporters write it; full-width
    letters; ligatures such as "ﬁ")."""
    if not text.isascii():
        # Symbols part words before NFKC, which would turn some into letters ("™" into "tm", "№" into "no")
        text = unicodedata.normalize("NFKC", _parted(text)).lower()
        if not text.isascii():  # NFKC can make separators of other characters ("¼" has a fraction slash)
            text = _parted(text)
    else:
        text = text.lower()
    text = _PUNCTUATION.sub(" ", text)
    return " ".join(text.split())


def _parted(text: str) -> str:
    """The text with every separating character (_separates) a space."""
    return "".join(" " if _separates(char) else char for char in text)


def _separates(char: str) -> bool:
    """Punctuation, symbols, and what travels with emoji: format characters (the zero-width joiner),
    enclosing marks (a keycap) and variation selectors, which would otherwise be left as words."""
    category = unicodedata.category(char)
    return (
        category[0] in "PS"
        or category in ("Cf", "Me")
        or "\ufe00" <= char <= "\ufe0f"
        or "\U000e0100" <= char <= "\U000e01ef"
    )


class Tokenizer:
    def __init__(self, words: list[str]):
        if tuple(words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"vocabulary must start with {SPECIAL_TOKENS}")
        if len(set(words)) != len(words):
            raise ValueError("vocabulary has duplicate words")
        self.words = list(words)
        self.ids = {word: i for i, word in enumerate(self.words)}

    @classmethod
    def build(cls, captions: Iterable[str], max_size: int = 20000, min_count: int = 1) -> Tokenizer:
        """Most frequent words first (ties alphabetical, so the result is deterministic)."""
        counts = Counter(word for caption in captions for word in standardize(caption).split())
        ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(list(SPECIAL_TOKENS) + ranked[: max(0, max_size - len(SPECIAL_TOKENS))])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, caption: str, max_length: int) -> list[int]:
        """<start> words <end>, cut to max_length (the cut keeps <end> last)."""
        ids = [self.ids.get(word, UNK_ID) for word in standardize(caption).split()]
        return [START_ID] + ids[: max_length - 2] + [END_ID]

    def encode_batch(self, captions: list[str], max_length: int) -> np.ndarray:
        out = np.full((len(captions), max_length), PAD_ID, dtype=np.int32)
        for row, caption in enumerate(captions):
            ids = self.encode(caption, max_length)
            out[row, : len(ids)] = ids
        return out

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first <end>, without special tokens other than <unk>."""
        words = []
        for i in ids:
            i = int(i)
            if i == END_ID:
                break
            if i in (PAD_ID, START_ID):
                continue
            words.append(self.words[i] if 0 <= i < len(self.words) else UNK)
        return words

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"format": "word-vocab-v1", "words": self.words}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        data = json.loads(Path(path).read_text())
        if data.get("format") != "word-vocab-v1" or not isinstance(data.get("words"), list):
            raise ValueError(f"{path}: not a word-vocab-v1 vocabulary file")
        return cls([str(w) for w in data["words"]])
