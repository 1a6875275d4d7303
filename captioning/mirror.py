"""The mirror view: a caption decoded from an image and its left-right mirror together.

In a domain whose scenes mean the same mirrored (once "left" and "right" swap), the mirror is a
second look at the same objects. With DecodeOptions(mirror_view=True) the image and its mirror are
encoded into two feature slots, and every decode slot of the search runs as two decoder rows, one
per view. Each step the mirror's next-word log-probabilities (its words swapped back by
MIRRORED_WORDS) are averaged with the image's, the strategy (greedy, beam, sample) chooses from the
average, and both rows are fed the choice, the mirror row in its own words. It costs two encoder
images and twice the decoder rows. On default/3 and default/4 it fixed errors on small and degraded
objects (docs/MODEL-EXPERIMENTS.md, section 3); on default/7, greedy, it moves the wild split by
about a picture in a thousand (docs/MODEL.md, section 3). Training's flip augmentation swaps the same words.
"""

from __future__ import annotations

import numpy as np

from captioning.decoding import Search
from captioning.tokenizer import Tokenizer

MIRRORED_WORDS = (("left", "right"),)  # what a left-right mirror turns into each other


def mirror_ids(tokenizer: Tokenizer) -> tuple[tuple[int, int], ...]:
    """Token id pairs of MIRRORED_WORDS, for the pairs the vocabulary has. A vocabulary with only one
    word of a pair cannot say the mirrored caption: ValueError."""
    pairs = []
    for a, b in MIRRORED_WORDS:
        if (a in tokenizer.ids) != (b in tokenizer.ids):
            raise ValueError(f"the vocabulary has only one of {a!r} and {b!r}: mirrored captions cannot be written")
        if a in tokenizer.ids:
            pairs.append((tokenizer.ids[a], tokenizer.ids[b]))
    return tuple(pairs)


def mirror_permutation(tokenizer: Tokenizer) -> np.ndarray:
    """Token id -> the id of the word the mirror turns it into (itself for most words); an involution."""
    permutation = np.arange(len(tokenizer))
    for a, b in mirror_ids(tokenizer):
        permutation[a], permutation[b] = b, a
    return permutation


def mirrored(images: np.ndarray) -> np.ndarray:
    """The left-right mirror of one image [S, S, 3] or of each of a batch [B, S, S, 3]."""
    return np.ascontiguousarray(np.flip(images, axis=-2))


def views(image: np.ndarray) -> list[np.ndarray]:
    """The two images a mirror-view search reads: [S, S, 3] -> [image, its left-right mirror]."""
    return [image, mirrored(image)]


class MirrorSearch(Search):
    """Wraps a search of `inner.width` slots into 2 x that many rows: rows [0, w) read the image
    (view 0), rows [w, 2w) its mirror (view 1), row w + i shadowing row i. Answers are the inner
    search's."""

    def __init__(self, inner: Search, permutation: np.ndarray, grid_shape: tuple[int, int]):
        self.inner = inner
        self.options = inner.options
        self.max_steps = inner.max_steps
        self.permutation = permutation
        self.grid_shape = grid_shape
        self.width = 2 * inner.width

    @property
    def finished(self) -> bool:
        return self.inner.finished

    def view_of_row(self) -> np.ndarray:
        return np.repeat(np.arange(2), self.inner.width)

    def start_tokens(self) -> np.ndarray:
        tokens = self.inner.start_tokens()
        return np.concatenate([tokens, self.permutation[tokens]])

    def advance(self, log_probs: np.ndarray, attention: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = self.inner.width
        averaged = (log_probs[:w] + log_probs[w:][:, self.permutation]) / 2
        if self.options.return_attention:  # the mirror's grid columns run the other way
            height, width = self.grid_shape
            unmirrored = attention[w:].reshape(w, height, width)[:, :, ::-1].reshape(w, -1)
            attention = (attention[:w] + unmirrored) / 2
        else:
            attention = attention[:w]
        tokens, parents = self.inner.advance(averaged, attention)
        return np.concatenate([tokens, self.permutation[tokens]]), np.concatenate([parents, parents + w])

    def results(self, tokenizer):
        return self.inner.results(tokenizer)
