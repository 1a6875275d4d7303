"""The encoder stage (continuous mode): a thread that encodes waiting images ahead of the decoder.

It takes up to `max_batch` requests from the admission queue as soon as it is free (and feature
slots are), encodes them in one batch into free feature slots, and hands them to the core through
`encoded`. Encoding thus never stalls the sequences being decoded, and on a multi-core CPU the two
overlap (each TensorFlow call releases the GIL). What it holds meanwhile (`in_flight`) and
`encoded` change under `handoff`, so that "nothing left anywhere" is one atomic check.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import numpy as np

from app import metrics
from app.engine import os_tuning
from app.engine.errors import InferenceError
from app.engine.request import Request, each_failed
from app.engine.scheduler import MAX_ROWS, AdmissionQueue
from captioning.mirror import views

logger = logging.getLogger("app.engine")

IDLE_POLL_S = 0.5  # an idle thread re-checks for shutdown at least this often (wake-ups are not lost)


def encode_requests(
    runner, requests: list[Request], now: float
) -> tuple[list[Request], list[tuple[Request, Exception]]]:
    """Encodes the requests' images into feature slots. Returns (the requests encoded, which hold
    their slots; the outcomes of those that failed, each_failed, which hold none): all fail when the
    encode call fails; only the grounded ones when reading their scenes fails, since the others do
    not need the reading."""
    for request in requests:
        request.admitted = now
        metrics.QUEUE_WAIT_SECONDS.observe(now - request.submitted)
    started = time.perf_counter()
    try:
        images = [view for request in requests for view in request_views(request)]
        slots, domain_scores, scene_cells = runner.encode(np.stack(images))
    except Exception as exc:
        logger.exception("encoding a batch of %d images failed", len(requests))
        return [], each_failed(requests, InferenceError(f"encoding the image failed: {exc}"))
    firsts = np.cumsum([0] + [request.views for request in requests[:-1]])
    unread: set[int] = set()  # the requests whose reading failed
    failed: list[tuple[Request, Exception]] = []
    grounded = [n for n, request in enumerate(requests) if request.options.grounded]
    if grounded:  # what grounded decoding reranks by: the upload's reading, not its mirror's
        rows = firsts[grounded]
        try:  # (the reader passed a probe call when it was loaded)
            scenes = runner.read_scenes(np.stack([images[row] for row in rows]), scene_cells[rows])
            for n, scene in zip(grounded, scenes, strict=True):
                requests[n].scene = scene
        except Exception as exc:
            logger.exception("reading the scenes of %d images failed", len(grounded))
            unread = set(grounded)
            failed = each_failed(
                [requests[n] for n in grounded], InferenceError(f"reading the image's scene failed: {exc}")
            )
    metrics.ENCODE_SECONDS.observe(time.perf_counter() - started)
    encoded = []
    for n, (request, first) in enumerate(zip(requests, firsts, strict=True)):
        if n in unread:
            runner.free(slots[first : first + request.views])
            continue
        request.feature_slots = slots[first : first + request.views]
        if domain_scores is not None:  # the upload's own, not its mirror's
            request.domain_score = float(domain_scores[first])
        encoded.append(request)
    return encoded, failed


def request_views(request: Request) -> list[np.ndarray]:
    return views(request.image) if request.views == 2 else [request.image]


class EncoderStage:
    def __init__(
        self,
        runner,
        queue: AdmissionQueue[Request],
        max_batch: int,
        *,
        post: Callable[[list], None],
        should_exit: Callable[[], bool],
        nice: int = 0,
    ):
        self.runner = runner
        self.queue = queue
        self.max_batch = max_batch
        self.post = post  # hands failed requests back to their event loops
        self.should_exit = should_exit
        self.nice = nice
        self.encoded: AdmissionQueue[Request] = AdmissionQueue(MAX_ROWS + 1)
        self.in_flight: list[Request] = []
        self.handoff = threading.Lock()
        self.slots_freed = threading.Event()  # wakes an encoder that found no free feature slot
        self.thread: threading.Thread | None = None

    def start(self, name: str) -> None:
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()

    def wake(self) -> None:
        """For shutdown and abandoned requests: every wait returns now."""
        self.encoded.wake()
        self.slots_freed.set()

    def _head_needs_more_than(self, free: int) -> bool:
        """Whether the request at the head of the queue (clients take turns) needs more feature slots
        (one per view) than are free."""
        head = self.queue.head(1)
        return bool(head) and head[0].views > free

    def _main(self) -> None:
        os_tuning.lower_this_thread(self.nice)
        while True:
            if self.should_exit():
                break
            self.slots_freed.clear()  # before looking, so that a slot freed after the look wakes the wait
            with self.handoff:
                free = len(self.runner.free_slots)
                taken = self.queue.take_within(free, cost=lambda r: r.views, most=self.max_batch)
                batch = [r for r in taken if not r.abandoned]
                self.in_flight = batch
            if not taken and self._head_needs_more_than(free):
                self.slots_freed.wait(IDLE_POLL_S)  # the decoder frees slots as requests finish
                continue
            if not batch:
                self.queue.wait(IDLE_POLL_S)
                continue
            try:
                encoded, failed = encode_requests(self.runner, batch, time.monotonic())
            except Exception:  # a bug: fail this batch, keep the thread alive
                logger.exception("the encoder thread failed")
                encoded, failed = [], each_failed(batch, InferenceError("the inference engine failed"))
            with self.handoff:
                self.in_flight = []
                for request in encoded:
                    self.encoded.put_nowait(request)
            if failed:
                self.post(failed)
        logger.info("encoder thread stopped")
