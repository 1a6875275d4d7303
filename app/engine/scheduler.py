"""Batching policy: which waiting requests enter the decode slots, when, and where their rows live.

Pure Python, no TensorFlow: the engine asks a policy how many requests to take from the head of
the admission queue, and a `SlotTable` where their rows go. Three policies share one interface:

  continuous  admit into free slots at every decode step (Orca / vLLM style iteration batching),
              images encoded ahead by a second thread, or inline by the decoding thread
  static      request-level batching: gather up to max_slots within a delay, then decode the batch
              to completion before admitting again (TF Serving / Triton / Ray Serve dynamic batchers)
  none        one request at a time

A request occupies `width` consecutive rows (1 for greedy, beam_size for beam search, ...).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

# The largest decode batch the model runner supports (captioning.buckets.BATCH_BUCKETS[-1]).
MAX_ROWS = 64


@dataclass(frozen=True)
class Admission:
    count: int  # requests to admit from the head of the queue now
    wait_s: float | None = None  # with count 0 and nothing decoding: sleep at most this long; None: until an arrival


def _count_fitting(widths: Sequence[int], free_slots: int, max_requests: int, idle: bool) -> int:
    """How many head-of-queue requests fit, in order. A request wider than the whole slot budget
    still runs when the engine is idle, alone, so no option combination can wedge the queue."""
    count, used = 0, 0
    for width in widths:
        if count >= max_requests:
            break
        if used + width > free_slots:
            if idle and count == 0 and width <= MAX_ROWS:
                count = 1
            break
        used += width
        count += 1
    return count


class ContinuousPolicy:
    """Iteration-level batching (Orca / vLLM style), with the encoder running ahead in its own thread.

    encodes_ahead: the encoder thread takes up to `max_encode_batch` waiting requests as soon as
    it is free (and feature slots are), and encodes them in one batch; the decoder thread, at
    every step, moves encoded requests into free rows, oldest first. Encoding never stalls the
    active sequences (compare DistServe's split of prefill and decode), at the price of a third
    busy thread. Otherwise (inline) the decoding thread itself encodes, before a step, the
    waiting requests that fit, in one batch: one thread fewer competing for the cores and the
    GIL, which pays where cores are few or shared (see docs/ENGINE.md). `admit` answers how many
    requests (encoded ones, or waiting ones when inline) join now.
    """

    name = "continuous"
    holds_results_until_batch_ends = False

    def __init__(self, max_slots: int, max_encode_batch: int = 16, encodes_ahead: bool = True):
        self.max_slots = max_slots
        self.max_encode_batch = max_encode_batch
        self.encodes_ahead = encodes_ahead

    def admit(self, waiting: Sequence[int], oldest_wait_s: float, used_slots: int) -> Admission:
        return Admission(_count_fitting(waiting, self.max_slots - used_slots, MAX_ROWS, idle=used_slots == 0))


class StaticPolicy:
    """Request-level batching: when the slots are empty, gather up to max_slots rows, waiting at most
    `max_queue_delay_s` after the first arrival, then decode that batch to completion. Results are
    released together when the batch ends, as a batched model call returns them."""

    name = "static"
    holds_results_until_batch_ends = True
    encodes_ahead = False

    def __init__(self, max_slots: int, max_queue_delay_s: float = 0.005):
        self.max_slots = max_slots
        self.max_queue_delay_s = max_queue_delay_s

    def admit(self, waiting: Sequence[int], oldest_wait_s: float, used_slots: int) -> Admission:
        if used_slots or not waiting:
            return Admission(0)
        count = _count_fitting(waiting, self.max_slots, MAX_ROWS, idle=True)
        batch_full = count < len(waiting) or sum(waiting[:count]) >= self.max_slots
        if batch_full or oldest_wait_s >= self.max_queue_delay_s:
            return Admission(count)
        return Admission(0, wait_s=self.max_queue_delay_s - oldest_wait_s)


class SequentialPolicy:
    """No batching: one request at a time, decoded to completion."""

    name = "none"
    holds_results_until_batch_ends = False
    encodes_ahead = False
    max_slots = MAX_ROWS

    def admit(self, waiting: Sequence[int], oldest_wait_s: float, used_slots: int) -> Admission:
        return Admission(1 if waiting and not used_slots else 0)


BatchingPolicy = ContinuousPolicy | StaticPolicy | SequentialPolicy


def make_policy(
    mode: str, *, max_slots: int, max_queue_delay_s: float, max_encode_batch: int, encode_ahead: bool = True
) -> BatchingPolicy:
    if not 1 <= max_slots <= MAX_ROWS:
        raise ValueError(f"max_batch_size must be between 1 and {MAX_ROWS}")
    if mode == "continuous":
        return ContinuousPolicy(max_slots, min(max_encode_batch, max_slots), encode_ahead)
    if mode == "static":
        return StaticPolicy(max_slots, max_queue_delay_s)
    if mode == "none":
        return SequentialPolicy()
    raise ValueError(f"unknown batching mode {mode!r}; expected continuous, static or none")


# ------------------------------------------------------------------------------------ slots

Owner = TypeVar("Owner", bound=Hashable)


@dataclass
class Block(Generic[Owner]):
    owner: Owner
    start: int
    width: int


@dataclass(frozen=True)
class Move:
    """Copy rows [source, source + width) to [destination, destination + width)."""

    source: int
    destination: int
    width: int


class SlotTable(Generic[Owner]):
    """Rows of the decode batch, kept dense: the occupied rows are always [0, used).

    Dense rows mean every decoder step runs on a plain prefix of the runner's arrays, with no
    gather. Releasing leaves holes, which `release` fills by moving blocks from the tail (cheap:
    only as many rows as were freed) or, when widths do not fit the holes, by shifting down.
    """

    def __init__(self, capacity: int = MAX_ROWS):
        self.capacity = capacity
        self.used = 0
        self._blocks: dict[Owner, Block[Owner]] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, owner: Owner) -> bool:
        return owner in self._blocks

    def owners(self) -> list[Owner]:
        return list(self._blocks)

    def block(self, owner: Owner) -> Block[Owner]:
        return self._blocks[owner]

    def blocks(self) -> list[Block[Owner]]:
        return list(self._blocks.values())

    def allocate(self, owner: Owner, width: int) -> int:
        """Appends a block for `owner`; returns its first row."""
        if owner in self._blocks:
            raise ValueError("owner already holds slots")
        if width < 1 or self.used + width > self.capacity:
            raise ValueError(f"cannot allocate {width} rows: {self.used} of {self.capacity} in use")
        self._blocks[owner] = Block(owner, self.used, width)
        self.used += width
        return self.used - width

    def release(self, owners: Sequence[Owner]) -> list[Move]:
        """Frees the owners' rows and re-densifies; returns the row moves to apply, in order."""
        for owner in owners:
            del self._blocks[owner]
        survivors = sorted(self._blocks.values(), key=lambda b: b.start)
        used = sum(b.width for b in survivors)
        moves = self._fill_holes_from_tail(survivors, used)
        if moves is None:
            moves = self._shift_down(survivors)
        self.used = used
        return moves

    @staticmethod
    def _fill_holes_from_tail(survivors: list[Block], used: int) -> list[Move] | None:
        """Moves each block that reaches past `used` into a hole below it; None if one does not fit."""
        holes = collections.deque()  # free (start, width) runs inside [0, used), ascending
        row = 0
        for b in survivors:
            if b.start >= used:
                break
            if b.start > row:
                holes.append([row, b.start - row])
            row = b.start + b.width
        if row < used:
            holes.append([row, used - row])
        tail = [b for b in survivors if b.start + b.width > used]
        planned: list[tuple[Block, int]] = []
        for b in tail:
            if b.start < used:  # straddles the boundary: rows below `used` cannot be moved in place
                return None
            hole = next((h for h in holes if h[1] >= b.width), None)
            if hole is None:
                return None
            planned.append((b, hole[0]))
            hole[0] += b.width
            hole[1] -= b.width
        moves = []
        for b, destination in planned:
            moves.append(Move(b.start, destination, b.width))
            b.start = destination
        return moves

    @staticmethod
    def _shift_down(survivors: list[Block]) -> list[Move]:
        """Stable compaction. Moves go in ascending order, so no move overwrites a later source."""
        moves, row = [], 0
        for b in survivors:
            if b.start != row:
                moves.append(Move(b.start, row, b.width))
                b.start = row
            row += b.width
        return moves


# ------------------------------------------------------------------------------ admission queue


class QueueFull(Exception):
    pass


Item = TypeVar("Item")


@dataclass
class AdmissionQueue(Generic[Item]):
    """Bounded queue between the event loop (producer) and the inference thread (consumer), fair
    between owners (the client's address): an item is placed by its owner's turn, so one client's
    burst is interleaved with other clients' items instead of queued whole ahead of them. Items of
    one owner (and of owner "", everything the engine queues on its own) keep their order.

    Each item gets a turn, one past its owner's previous item's and at least one past the turn of
    the last item taken; the queue is kept sorted by turn, arrival order breaking ties (start-time
    fair queueing with one unit per item). Unlike queue.Queue, the consumer can look at the head
    without taking it, because whether a request fits depends on its width.
    """

    maxsize: int
    _items: collections.deque = field(default_factory=collections.deque)
    _turns: collections.deque = field(default_factory=collections.deque)  # (turn, owner) of each item, in step
    _last_turn: dict = field(default_factory=dict)  # owner -> the turn of its last item queued
    _turn: int = 0  # the turn of the last item taken
    _condition: threading.Condition = field(default_factory=threading.Condition)
    _woken: bool = False  # a wake() not yet consumed by wait(), so a wake-up is never lost

    def __len__(self) -> int:
        return len(self._items)

    def put_nowait(self, item: Item, owner: str = "") -> None:
        """Places the item by its owner's turn, or raises QueueFull."""
        with self._condition:
            if len(self._items) >= self.maxsize:
                raise QueueFull
            turn = max(self._last_turn.get(owner, 0), self._turn) + 1
            self._last_turn[owner] = turn
            if len(self._last_turn) > 4 * self.maxsize:
                # An owner whose turns have all come needs no entry (max(its turn, _turn) is _turn); the
                # others have items queued (remove_if keeps that so), so at most maxsize entries stay.
                self._last_turn = {o: t for o, t in self._last_turn.items() if t > self._turn}
            index = len(self._turns)
            while index and self._turns[index - 1][0] > turn:  # from the back: most items go there
                index -= 1
            self._items.insert(index, item)
            self._turns.insert(index, (turn, owner))
            self._condition.notify()

    def _pop(self) -> Item:
        self._turn = max(self._turn, self._turns.popleft()[0])
        return self._items.popleft()

    def head(self, count: int) -> list[Item]:
        with self._condition:
            return [self._items[i] for i in range(min(count, len(self._items)))]

    def take(self, count: int) -> list[Item]:
        with self._condition:
            return [self._pop() for _ in range(min(count, len(self._items)))]

    def take_within(self, budget: int, cost, most: int) -> list[Item]:
        """Takes head items, in order, while at most `most` of them cost (cost(item)) at most `budget` in all."""
        taken, spent = [], 0
        with self._condition:
            while self._items and len(taken) < most and spent + cost(self._items[0]) <= budget:
                spent += cost(self._items[0])
                taken.append(self._pop())
        return taken

    def remove_if(self, predicate) -> list[Item]:
        """Removes and returns the items for which predicate(item) is true. Their owners' turns go
        back to their last item still queued: a client whose requests expired in the queue is not
        put further back for them."""
        with self._condition:
            kept, kept_turns, removed, owners = collections.deque(), collections.deque(), [], set()
            for item, (turn, owner) in zip(self._items, self._turns):
                if predicate(item):
                    removed.append(item)
                    owners.add(owner)
                else:
                    kept.append(item)
                    kept_turns.append((turn, owner))
            if removed:
                self._items, self._turns = kept, kept_turns
                for owner in owners:
                    self._last_turn.pop(owner, None)
                for turn, owner in kept_turns:
                    if owner in owners:
                        self._last_turn[owner] = turn  # ascending: the last one written is the highest
            return removed

    def drain(self) -> list[Item]:
        with self._condition:
            items = list(self._items)
            self._items.clear()
            self._turns.clear()
            self._last_turn.clear()
            return items

    def wait(self, timeout: float | None) -> None:
        """Blocks until an item arrives, `wake` is called, or the timeout passes."""
        with self._condition:
            if not self._items and not self._woken:
                self._condition.wait(timeout)
            self._woken = False

    def wake(self) -> None:
        with self._condition:
            self._woken = True
            self._condition.notify_all()
