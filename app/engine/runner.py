"""The model runner: per-row decoder inputs in preallocated arrays, and the encode / step calls.

It knows rows, not requests or policies. Row r holds one decode slot: the previous token, the GRU
state and the image features. The engine keeps the occupied rows dense ([0, used)), so a step runs
on a prefix padded up to the next bucket size; the rows past `used` hold stale but finite values,
which is harmless because rows never interact in the decoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from app.engine.scheduler import MAX_ROWS, Move
from captioning.captioner import BATCH_BUCKETS, bucket_for


class ModelRunner:
    def __init__(self, captioner, capacity: int = MAX_ROWS):
        if capacity > BATCH_BUCKETS[-1]:
            raise ValueError(f"capacity {capacity} exceeds the largest batch bucket {BATCH_BUCKETS[-1]}")
        self.captioner = captioner
        rows = bucket_for(capacity)  # a step over `used` rows reads up to the next bucket
        self.tokens = np.zeros(rows, dtype=np.int32)
        self.state = np.zeros((rows, captioner.state_size), dtype=np.float32)
        self.features = np.zeros((rows, captioner.num_positions, captioner.state_size), dtype=np.float32)

    def warmup(self) -> None:
        self.captioner.warmup()

    def encode(self, images: np.ndarray, blocks: Sequence[tuple[int, int, np.ndarray]]) -> None:
        """Encodes images [B, S, S, 3] in one batch and fills the rows of each one's block:
        blocks[i] = (first row, width, start tokens [width]) for images[i]."""
        features = self.captioner.encode(images)
        for (start, width, start_tokens), image_features in zip(blocks, features, strict=True):
            rows = slice(start, start + width)
            self.features[rows] = image_features
            self.state[rows] = 0.0
            self.tokens[rows] = start_tokens

    def step(self, used: int) -> tuple[np.ndarray, np.ndarray]:
        """One decoder step over rows [0, used): advances their state; returns (log_probs, attention)."""
        bucket = bucket_for(used)
        log_probs, new_state, attention = self.captioner.step(
            self.tokens[:bucket], self.state[:bucket], self.features[:bucket]
        )
        self.state[:used] = new_state[:used]
        return log_probs[:used], attention[:used]

    def set_next(self, start: int, tokens: np.ndarray, parents: np.ndarray) -> None:
        """Feeds a block its next tokens; each row continues the state of row start + parents[i]."""
        width = len(tokens)
        self.tokens[start : start + width] = tokens
        if width > 1 and np.any(parents != np.arange(width)):
            self.state[start : start + width] = self.state[start : start + width][parents]

    def apply(self, moves: Sequence[Move]) -> None:
        for move in moves:
            source = slice(move.source, move.source + move.width)
            destination = slice(move.destination, move.destination + move.width)
            for array in (self.tokens, self.state, self.features):
                array[destination] = array[source]
