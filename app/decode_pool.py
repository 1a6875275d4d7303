"""Decoding uploads under a memory budget, in a bounded pool of worker threads.

    pool = DecodePool(threads=4, budget_bytes=512 * 2**20)
    result = await pool.run(cost_bytes, decode, image, owner=client)  # waits its turn and budget, runs in a worker

An image's cost is the peak memory its decode takes, known from its header (app.images.decode_bytes),
so the budget is weighted by pixels and bit depth, not a count of images: a 40-megapixel 16-bit
picture holds the budget that many small photos would share. Waiting decodes take turns by client
(MemoryBudget), and no more are granted than there are threads, so the turns are the only queue.
A decode's share is given back only when its worker thread has really finished: cancelling the
caller (a deadline, a disconnect) does not stop Pillow, so releasing on cancellation would let the
next decodes start on top of the one still running. When the pool falls idle after a big decode,
freed memory is handed back to the system (glibc keeps it in per-thread arenas otherwise);
MALLOC_ARENAS can also cap the arena count.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

logger = logging.getLogger("app.decode_pool")

T = TypeVar("T")

# glibc's mallopt parameter for the arena count (malloc.h); a thread that finds every arena busy
# waits for one instead of creating another that would keep its freed pages.
_M_ARENA_MAX = -8
# Hand memory back to the system after an idle pool has decoded at least this much since the last trim.
TRIM_AFTER_BYTES = 64 * 2**20


def _glibc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim, libc.mallopt  # noqa: B018 - both exist on glibc only
        return libc
    except (OSError, AttributeError, TypeError):
        return None


_LIBC = _glibc()


def limit_malloc_arenas(arenas: int) -> bool:
    """Caps glibc's malloc arenas (like MALLOC_ARENA_MAX); True if applied. 0 leaves glibc's default."""
    return bool(arenas and _LIBC is not None and _LIBC.mallopt(_M_ARENA_MAX, arenas) == 1)


def release_free_memory() -> None:
    """Returns freed heap pages to the system (glibc malloc_trim); a no-op elsewhere."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class MemoryBudget:
    """A weighted async semaphore, fair between owners: acquire(n, owner) waits until n more bytes
    fit and fewer than `holders` grants are out. Waiters are served one owner at a time in turn
    (first come first served within an owner), so one client's queue of costly decodes cannot hold
    every other client's decode behind it. The owner whose turn it is waits for its request to fit
    rather than being skipped, so a large request is never starved by small ones; one larger than
    the whole budget runs alone. Event-loop only."""

    def __init__(self, capacity: int, holders: int):
        self.capacity = capacity
        self.in_use = 0
        self.holders = holders  # the pool's threads: a grant is a thread too, so no work queues behind the turns
        self.granted = 0
        # owner -> its waiters in arrival order; the dict's order is the turn (dicts keep insertion order)
        self._waiters: dict[str, collections.deque[tuple[int, asyncio.Future]]] = {}

    def _fits(self, amount: int) -> bool:
        return self.granted < self.holders and (self.in_use == 0 or self.in_use + amount <= self.capacity)

    async def acquire(self, amount: int, owner: str = "") -> None:
        if not self._waiters and self._fits(amount):
            self._grant(amount)
            return
        waiter = asyncio.get_running_loop().create_future()
        entry = (amount, waiter)
        self._waiters.setdefault(owner, collections.deque()).append(entry)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # granted just as we were cancelled
                self.release(amount)
            else:
                queue = self._waiters.get(owner)
                if queue is not None and entry in queue:  # else _wake has already dropped it
                    queue.remove(entry)
                    if not queue:
                        del self._waiters[owner]
                self._wake()
            raise

    def release(self, amount: int) -> None:
        self.in_use -= amount
        self.granted -= 1
        self._wake()

    def _grant(self, amount: int) -> None:
        self.in_use += amount
        self.granted += 1

    def _wake(self) -> None:
        while self._waiters:
            owner, queue = next(iter(self._waiters.items()))
            amount, waiter = queue[0]
            if waiter.done():  # cancelled, its task not yet unwound (a request's images are cancelled together)
                queue.popleft()
                if not queue:
                    del self._waiters[owner]
                continue
            if not self._fits(amount):
                return
            queue.popleft()
            del self._waiters[owner]
            if queue:  # the owner's next waiter goes to the back of the turn
                self._waiters[owner] = queue
            self._grant(amount)
            waiter.set_result(None)


class DecodePool:
    def __init__(self, threads: int, budget_bytes: int):
        self.budget = MemoryBudget(budget_bytes, holders=threads)
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        self._running = 0
        self._since_trim = 0
        self._lock = threading.Lock()

    async def run(self, cost_bytes: int, function: Callable[..., T], *args, owner: str = "") -> T:
        """function(*args) in a worker thread, once cost_bytes of the budget are free; `owner` (the
        client's address) takes its turn with the other owners waiting."""
        loop = asyncio.get_running_loop()
        await self.budget.acquire(cost_bytes, owner)
        try:
            future = self._executor.submit(self._call, cost_bytes, function, *args)
        except BaseException:
            self.budget.release(cost_bytes)
            raise
        # Done = the thread returned (or the work never started): only then is the memory free.
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self.budget.release, cost_bytes))
        return await asyncio.wrap_future(future)

    async def run_unbudgeted(self, function: Callable[..., T], *args) -> T:
        """For cheap work that must not block the event loop (reading a large upload's header)."""
        return await asyncio.wrap_future(self._executor.submit(function, *args))

    def _call(self, cost_bytes: int, function: Callable[..., T], *args) -> T:
        with self._lock:
            self._running += 1
        try:
            return function(*args)
        finally:
            with self._lock:
                self._running -= 1
                self._since_trim += cost_bytes
                trim = self._running == 0 and self._since_trim >= TRIM_AFTER_BYTES
                if trim:
                    self._since_trim = 0
            if trim:
                release_free_memory()

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
