"""The model runner: per-row decoder inputs, and the encode / step calls.

It knows rows, not requests or policies. Row r holds one decode slot: the previous token and the
GRU state (numpy arrays here), and the feature slot of its image (the features themselves stay
resident in the model's FeatureSlots; the rows of one beam search share their image's slot). The
engine keeps the occupied rows dense ([0, used)), so a step runs on a prefix padded up to the next
bucket size; rows never interact in the decoder, so what the padding rows hold does not matter.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from app import metrics
from app.engine import os_tuning
from app.engine.scheduler import MAX_ROWS, Move
from captioning.buckets import BATCH_BUCKETS, bucket_for

logger = logging.getLogger("app.engine")

WARMUP_NICE = 19  # the background compilation of the multi-step programs
# The domain statistics' thread runs below the event loop: at nice 0 it took CPU and the GIL from the
# loop under overload (503s answered in seconds, not milliseconds: docs/ENGINE-HISTORY.md, round 5). Under
# full load the encoder then waits for this starved thread, which also leaves the loop the CPU it
# needs to refuse requests. Round 22 measured three other placements, none kept: the decoder waiting
# instead (slower), the encoding thread (worse in overload beside a CPU-bound neighbour) and the
# encoder's graph (the loop starved, overload no longer refused).
STATISTICS_NICE = 10


class FeatureSlotPool:
    """The free feature slots. Thread-safe: the encoder takes slots, the decoder gives them back."""

    def __init__(self, capacity: int):
        self._free = collections.deque(range(capacity))
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._free)

    def take(self, count: int) -> list[int]:
        with self._lock:
            return [self._free.popleft() for _ in range(min(count, len(self._free)))]

    def give_back(self, slots: Iterable[int]) -> None:
        with self._lock:
            self._free.extend(slots)


class ModelRunner:
    def __init__(self, captioner, capacity: int = MAX_ROWS, greedy_steps: int = 1, nice: int = 0):
        if capacity > BATCH_BUCKETS[-1]:
            raise ValueError(f"capacity {capacity} exceeds the largest batch bucket {BATCH_BUCKETS[-1]}")
        # A request holds a feature slot per view from its encode to its end, and a row per view at least.
        self.features = captioner.feature_slots(capacity)
        self.greedy_steps_per_call = greedy_steps  # 1: greedy rows step one token per call like the others
        self.greedy_buckets: set[int] = set()  # buckets whose multi-step program is compiled
        self.warmup_thread: threading.Thread | None = None  # compiles them after the engine is ready
        self._warmup_cancelled = threading.Event()
        self.domain = captioner.domain  # captioning.domain.DomainModel, or None
        # The domain check's image statistics (numpy, ~0.5 ms an image) need only the pixels: a
        # thread of their own computes them while the encoder's compiled call (which releases the
        # GIL) runs, instead of after it on the encoder's thread, which is the engine's busiest.
        self._statistics = (
            None
            if self.domain is None
            else ThreadPoolExecutor(
                1,
                "engine-domain-statistics",
                initializer=os_tuning.lower_this_thread,
                initargs=(max(nice, STATISTICS_NICE),),
            )
        )
        self.free_slots = FeatureSlotPool(capacity)
        rows = bucket_for(capacity)  # a step over `used` rows reads up to the next bucket size
        self.tokens = np.zeros(rows, dtype=np.int32)
        self.state = np.zeros((rows, captioner.state_size), dtype=np.float32)
        self.slot_of_row = np.zeros(rows, dtype=np.int32)

    def warmup(self) -> None:
        """Compiles what every request needs before the engine is ready; the multi-step greedy
        programs (several seconds in all) compile afterwards in a background thread, and until a
        bucket's is ready, steps over that many rows take one token per call."""
        self.features.warmup(greedy_steps=None)
        if self.greedy_steps_per_call > 1:
            self.features.trace_greedy(self.greedy_steps_per_call)  # now, so the compilation cache finds them
            self.warmup_thread = threading.Thread(target=self._warmup_greedy, name="engine-warmup-greedy", daemon=True)
            metrics.PROGRAMS_COMPILING.inc()  # here, not in the thread: it must show before readiness does
            try:
                self.warmup_thread.start()
            except BaseException:
                metrics.PROGRAMS_COMPILING.dec()
                raise

    def close(self) -> None:
        """The engine has stopped: ends the statistics thread (a stopped engine encodes nothing more)."""
        if self._statistics is not None:
            self._statistics.shutdown(wait=False)

    def cancel_warmup(self) -> None:
        """The engine is stopping: the background compilation ends after the bucket in progress
        (the caller joins warmup_thread; until it ends, it holds the model)."""
        self._warmup_cancelled.set()

    def _warmup_greedy(self) -> None:
        try:
            self._compile_greedy_programs()
        finally:
            metrics.PROGRAMS_COMPILING.dec()

    def _compile_greedy_programs(self) -> None:
        os_tuning.lower_this_thread(WARMUP_NICE)  # requests served meanwhile come first
        start = time.perf_counter()
        for rows in self.features.buckets():  # small buckets first: low load needs them first
            if self._warmup_cancelled.is_set():
                return
            try:
                self.features.warmup_greedy(rows, self.greedy_steps_per_call)
            except Exception:  # the single-step program keeps serving this bucket
                logger.exception("compiling the %d-row multi-step greedy program failed", rows)
                return
            self.greedy_buckets.add(rows)
        # Seconds here tell a cold start (compiling: tens of seconds under load) from one that
        # found the compilation cache (a second or two).
        logger.info(
            "multi-step greedy programs ready",
            extra={"buckets": len(self.greedy_buckets), "seconds": round(time.perf_counter() - start, 2)},
        )

    def greedy_ready(self, used: int) -> bool:
        """Whether greedy_steps() over `used` rows runs a compiled multi-step program already
        (never with GREEDY_STEPS_PER_CALL=1: nothing is compiled then)."""
        return bucket_for(used) in self.greedy_buckets

    def encode(self, images: np.ndarray) -> tuple[list[int], np.ndarray | None, np.ndarray | None]:
        """Encodes images [B, S, S, 3] in one batch into free feature slots; returns the slot of
        each, when the model has a domain check each image's domain score, and when it has a scene
        head each image's cell labels (captioning.grounding), all from the same features (no second
        encoder pass). Safe to call from another thread than the decoder's. On failure the slots go
        back."""
        slots = self.free_slots.take(len(images))
        try:
            if len(slots) < len(images):
                raise RuntimeError(f"{len(images)} images to encode, {len(slots)} free feature slots")
            statistics = (
                None if self._statistics is None else self._statistics.submit(self.domain.image_statistics, images)
            )
            pooled, scene_cells = self.features.encode(images, np.array(slots))
            scores = None if statistics is None else self.domain.combined_scores(pooled, statistics.result())
        except BaseException:
            self.free_slots.give_back(slots)
            raise
        return slots, scores, scene_cells

    def read_scenes(self, images: np.ndarray, scene_cells: np.ndarray) -> list:
        """Grounded decoding's reading of encoded images [B, S, S, 3] from their scene cells
        (encode's): Captioner.read_scenes, with the bundle's object reader when it has one."""
        return self.features.captioner.read_scenes(images, scene_cells)

    def place(self, start: int, slot_of_row: np.ndarray, start_tokens: np.ndarray) -> None:
        """Starts a search in rows [start, start + len(slot_of_row)), row start + i reading the
        features in slot_of_row[i] (the rows of one view share its slot)."""
        rows = slice(start, start + len(slot_of_row))
        self.slot_of_row[rows] = slot_of_row
        self.state[rows] = 0.0
        self.tokens[rows] = start_tokens

    def free(self, slots: Iterable[int]) -> None:
        self.free_slots.give_back(slots)

    def step(self, used: int) -> tuple[np.ndarray, np.ndarray]:
        """One decoder step over rows [0, used): advances their state; returns (log_probs, attention).
        The step runs on the whole bucket, padding rows included, straight from these arrays: no copy."""
        bucket = bucket_for(used)
        log_probs, new_state, attention = self.features.step(
            self.slot_of_row[:bucket], self.tokens[:bucket], self.state[:bucket]
        )
        self.state[:used] = new_state[:used]
        return log_probs[:used], attention[:used]

    def greedy_steps(
        self, used: int, words: np.ndarray, min_words: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """greedy_steps_per_call greedy steps over rows [0, used), every one of them greedy: advances
        their state and feeds them their last chosen token; returns the chosen tokens [K, used],
        their log-probabilities [K, used] and attention [K, used, N]."""
        bucket = bucket_for(used)
        chosen, log_probs, attention, new_state = self.features.greedy_steps(
            self.slot_of_row[:bucket],
            self.tokens[:bucket],
            self.state[:bucket],
            words,
            min_words,
            self.greedy_steps_per_call,
        )
        self.state[:used] = new_state[:used]
        self.tokens[:used] = chosen[-1, :used]
        return chosen[:, :used], log_probs[:, :used], attention[:, :used]

    def set_tokens(self, used: int, tokens: np.ndarray) -> None:
        """Feeds rows [0, used) their next tokens (greedy rows: their argmax), states unchanged."""
        self.tokens[:used] = tokens

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
