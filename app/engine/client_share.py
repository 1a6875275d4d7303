"""Each client's share of the engine (CLIENT_QUEUE_SHARE): one client address holds at most `limit`
places, a place being one image waiting in the queue or being captioned. Turns in the queue
(scheduler.AdmissionQueue) keep a flood from delaying the others; this keeps it from filling the
queue, after which everyone else's requests were refused.

Two doors, both on the event loop:
  - wait_for_room(): before a body is read. A client at its share waits a little for room, then is
    refused (429 at the door); nothing of it is held meanwhile but its connection.
  - take(): an image of a request already let in. It waits, first come first served within its
    client, for one of the client's places, until the request's deadline; it is never refused for
    the share, so accepted work is not thrown away after its upload and decode.
A place given back goes to the client's next image waiting in take(), else wakes the door.
Images waiting in take() count against the room at the door, so what one client can have waiting
outside the queue is what was let in before its share filled: at most MAX_UPLOADS_PER_CLIENT
bodies being read (each of at most MAX_IMAGES_PER_REQUEST images) and the images being decoded,
which UPLOAD_MEMORY_MB and DECODE_MEMORY_MB hold.

Owner "" (no address known, and the engine's own requests) is not limited: it may be many clients.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import math
import weakref
from collections import Counter

from app import metrics

logger = logging.getLogger("app.engine")
# Every ClientShares in the process (one per model), read when Prometheus scrapes (GET /metrics).
_ALL: weakref.WeakSet = weakref.WeakSet()
metrics.CLIENT_SHARE_WAITING.set_function(lambda: sum(shares.waiting() for shares in list(_ALL)))


class ClientShares:
    """One for every served version of a model together (app.model_repository), so that a client
    does not get a share from each."""

    def __init__(self, limit: int | None):
        self.limit = limit  # None: no limit
        self._places: Counter[str] = Counter()  # client -> places held
        self._takers: dict[str, collections.deque[asyncio.Future]] = {}  # client -> images waiting in take()
        self._at_door: dict[str, list[asyncio.Future]] = {}  # client -> requests waiting at the door for room
        _ALL.add(self)

    @classmethod
    def for_queue(cls, share: float, max_queue_size: int, max_batch_size: int) -> ClientShares:
        """Each client's places: its share of the queue, plus a batch being decoded so that a lone
        client still fills one; no limit for a share of 1."""
        if share >= 1:
            return cls(None)
        limit = math.ceil(share * max_queue_size) + max_batch_size
        if limit >= max_queue_size:
            logger.warning(
                "CLIENT_QUEUE_SHARE=%g lets one client hold %d places (its share of MAX_QUEUE_SIZE=%d plus "
                "MAX_BATCH_SIZE=%d), as many as the queue has: while other clients' images take the decode rows, "
                "its own can fill the queue. Raise MAX_QUEUE_SIZE above MAX_BATCH_SIZE / (1 - CLIENT_QUEUE_SHARE).",
                share,
                limit,
                max_queue_size,
                max_batch_size,
            )
        return cls(limit)

    def _limited(self, client: str) -> bool:
        return bool(client) and self.limit is not None

    def has_room(self, client: str) -> bool:
        if not self._limited(client):
            return True
        return self._places[client] + len(self._takers.get(client, ())) < self.limit

    def held(self, client: str) -> int:
        return self._places[client]

    def waiting(self) -> int:
        """Images waiting in take(), every client together."""
        return sum(len(takers) for takers in list(self._takers.values()))

    async def wait_for_room(self, client: str, timeout_s: float, until: asyncio.Future | None = None) -> bool:
        """True once there is room after waiting, False if there was room at once; TimeoutError
        if none came within `timeout_s`, or once `until` is done (the engine has stopped)."""
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + timeout_s
        waited = False
        while not self.has_room(client):
            remaining = give_up_at - loop.time()
            if remaining <= 0 or (until is not None and until.done()):
                raise TimeoutError
            waited = True
            woken = loop.create_future()
            self._at_door.setdefault(client, []).append(woken)
            timer = loop.call_later(remaining, _settle, woken)
            stop = functools.partial(_stop_waiting, woken)
            if until is not None:
                until.add_done_callback(stop)
            try:
                await woken  # woken by _wake_door, or by the timer: then has_room() decides
            finally:
                timer.cancel()
                if until is not None:
                    until.remove_done_callback(stop)
                door = self._at_door.get(client)
                if door is not None and woken in door:
                    door.remove(woken)
                    if not door:
                        del self._at_door[client]
        return waited

    async def take(self, client: str, timeout_s: float, until: asyncio.Future | None = None) -> None:
        """Takes one of the client's places, waiting for it if they are all held; TimeoutError past
        `timeout_s`, or once `until` is done (the engine it waits for has stopped). Each take() that
        returns is matched by one give_back()."""
        if not self._limited(client):
            return
        takers = self._takers.get(client)
        if not takers and self._places[client] < self.limit:
            self._places[client] += 1
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._takers.setdefault(client, collections.deque()).append(waiter)
        # A timer, not asyncio.wait_for: on Python 3.11 wait_for returns the result and drops a
        # cancel that arrives after the place was handed over (the client left as it came).
        timer = loop.call_later(max(timeout_s, 0.0), _time_out, waiter)
        stop = functools.partial(_stop_waiting, waiter)
        if until is not None:
            until.add_done_callback(stop)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.give_back(client)  # handed a place as it gave up: pass it on
            else:  # cancelled or timed out while waiting
                waiter.cancel()
                self._forget(client, waiter)
                self._wake_door(client)
            raise
        finally:
            timer.cancel()
            if until is not None:
                until.remove_done_callback(stop)

    def give_back(self, client: str) -> None:
        if not self._limited(client):
            return
        takers = self._takers.get(client)
        handed = False
        while takers and not handed:
            waiter = takers.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the place moves to it, so the count stays
                handed = True
        self._forget(client, None)
        if not handed:
            self._places[client] -= 1
            if not self._places[client]:
                del self._places[client]
        self._wake_door(client)  # one fewer waiting image counts at the door as a place given back

    def _wake_door(self, client: str) -> None:
        if self.has_room(client):
            for woken in self._at_door.pop(client, ()):  # they look again; those still without room wait anew
                _settle(woken)

    def _forget(self, client: str, waiter: asyncio.Future | None) -> None:
        takers = self._takers.get(client)
        if takers is None:
            return
        if waiter is not None:
            try:
                takers.remove(waiter)
            except ValueError:
                pass
        if not takers:
            del self._takers[client]


def _settle(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def _stop_waiting(waiter: asyncio.Future, _until: asyncio.Future) -> None:
    _time_out(waiter)


def _time_out(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
