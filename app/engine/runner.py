"""The model runner: per-row decoder inputs, and the encode / step calls.

It knows rows, not requests or policies. Row r holds one decode slot: the previous token and the
GRU state (numpy arrays here), and the feature slot of its image (the features themselves stay
resident in the model's FeatureSlots; the rows of one beam search share their image's slot). The
engine keeps the occupied rows dense ([0, used)), so a step runs on a prefix padded up to the next
bucket size; rows never interact in the decoder, so what the padding rows hold does not matter.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from app.engine.scheduler import MAX_ROWS, Move
from captioning.captioner import BATCH_BUCKETS


class ModelRunner:
    def __init__(self, captioner, capacity: int = MAX_ROWS):
        if capacity > BATCH_BUCKETS[-1]:
            raise ValueError(f"capacity {capacity} exceeds the largest batch bucket {BATCH_BUCKETS[-1]}")
        self.capacity = capacity
        self.features = captioner.feature_slots(capacity)  # a request holds at most one slot and one row
        self.tokens = np.zeros(capacity, dtype=np.int32)
        self.state = np.zeros((capacity, captioner.state_size), dtype=np.float32)
        self.slot_of_row = np.zeros(capacity, dtype=np.int32)

    def warmup(self) -> None:
        self.features.warmup()

    def encode(self, images: np.ndarray, blocks: Sequence[tuple[int, int, np.ndarray]]) -> None:
        """Encodes images [B, S, S, 3] in one batch and fills the rows of each one's block:
        blocks[i] = (first row, width, start tokens [width]) for images[i]. The blocks are the
        newest rows: every row below the first of them is in use, and keeps its feature slot."""
        in_use = set(self.slot_of_row[: min(start for start, _, _ in blocks)].tolist())
        free = [slot for slot in range(self.capacity) if slot not in in_use][: len(blocks)]
        self.features.encode(images, np.array(free))
        for (start, width, start_tokens), slot in zip(blocks, free, strict=True):
            rows = slice(start, start + width)
            self.slot_of_row[rows] = slot
            self.state[rows] = 0.0
            self.tokens[rows] = start_tokens

    def step(self, used: int) -> tuple[np.ndarray, np.ndarray]:
        """One decoder step over rows [0, used): advances their state; returns (log_probs, attention)."""
        log_probs, new_state, attention = self.features.step(
            self.slot_of_row[:used], self.tokens[:used], self.state[:used])
        self.state[:used] = new_state
        return log_probs, attention

    def set_next(self, start: int, tokens: np.ndarray, parents: np.ndarray) -> None:
        """Feeds a block its next tokens; each row continues the state of row start + parents[i]."""
        width = len(tokens)
        self.tokens[start : start + width] = tokens
        if width > 1 and np.any(parents != np.arange(width)):
            self.state[start : start + width] = self.state[start : start + width][parents]

    def apply(self, moves: Sequence[Move]) -> None:
        """Carries out a SlotTable's row moves (numpy copies; the features stay in their slots)."""
        for move in moves:
            source = slice(move.source, move.source + move.width)
            destination = slice(move.destination, move.destination + move.width)
            for array in (self.tokens, self.state, self.slot_of_row):
                array[destination] = array[source]
