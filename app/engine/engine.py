"""The inference engine: one thread owns the decode loop; asyncio code submits.

    event loop                               decoder thread                      encoder thread (continuous)
    ----------                               --------------                      --------------
    submit() -> bounded AdmissionQueue  ---------------------------------->   take up to max_encode_batch,
      (full: Overloaded, at once)                                               encode into feature slots
                                             each iteration:            <---   -> encoded queue
                                               drop abandoned requests
                                               admit: encoded requests into free rows
                                                 (static / none: take from the queue, encode here)
                                               one decoder step over every active row
    await future                               retire finished searches
      <- call_soon_threadsafe(deliver)  <-     deliver their results

In continuous mode the encoder has its own thread, so encoding the next images never stalls the
sequences being decoded, and on a multi-core CPU the two overlap (each TensorFlow call releases
the GIL). Static and none keep the classic design: one thread encodes, then decodes.

Deadlines run on the event loop (a timer per request), so a caller gets its 504 on time even while
a thread is inside a long encode; the timer, like a cancellation, marks the request abandoned and
the threads free its rows and feature slot. Results are only ever set on the event loop, after
checking that the future is not already done, so a cancelled future never receives one.

Two process-level choices keep the event loop responsive while the model works (both can be
turned off): after warm-up the model's threads are reniced below the event loop, and the objects
TensorFlow left behind are frozen out of the cyclic garbage collector (a full pass over them
stalls every thread for ~0.2 s). The service asks check_admission() at the door, before a body is
read, and takes a queue place only at submit(), once the upload is read and decoded.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from app import metrics
from app.engine.runner import ModelRunner
from app.engine.scheduler import MAX_ROWS, AdmissionQueue, BatchingPolicy, QueueFull, SlotTable
from captioning.decoding import new_search

logger = logging.getLogger("app.engine")

IDLE_POLL_S = 0.5  # an idle thread re-checks for shutdown at least this often (wake-ups are not lost)


class EngineError(Exception):
    pass


class Overloaded(EngineError):
    """The admission queue is full; retry after `retry_after_s` seconds."""

    def __init__(self, retry_after_s: float):
        super().__init__(f"the inference queue is full; retry in {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


class DeadlineExceeded(EngineError):
    pass


class EngineStopped(EngineError):
    """The engine is not running: not started yet, or shutting down."""


class InferenceError(EngineError):
    """The model failed on the batch that held this request (other batches are unaffected)."""


@dataclass
class Result:
    captions: list  # list[captioning.decoding.Caption], best first
    queue_ms: float  # submitted -> admitted into decode slots
    inference_ms: float  # admitted -> captions ready


class _Request:
    __slots__ = ("image", "options", "width", "loop", "future", "submitted", "admitted", "search",
                 "abandoned", "deadline_timer", "feature_slot")

    def __init__(self, image, options, loop, future):
        self.image = image
        self.options = options
        self.width = options.width
        self.loop = loop
        self.future = future
        self.submitted = time.monotonic()
        self.admitted = 0.0
        self.search = None
        self.abandoned = False  # set on the event loop; the threads free the request's rows and slot
        self.deadline_timer = None
        self.feature_slot: int | None = None  # where its image features are, once encoded


class Engine:
    def __init__(self, captioner, policy: BatchingPolicy, *, max_queue_size: int = 256,
                 request_timeout_s: float = 30.0, shutdown_grace_s: float = 10.0, inference_nice: int = 0,
                 freeze_gc: bool = False, runner: ModelRunner | None = None):
        self.captioner = captioner
        self.policy = policy
        self.inference_nice = inference_nice
        self.freeze_gc = freeze_gc
        self.request_timeout_s = request_timeout_s
        self.shutdown_grace_s = shutdown_grace_s
        self.runner = runner or ModelRunner(captioner, MAX_ROWS)
        self._image_shape = (captioner.config.image_size, captioner.config.image_size, 3)
        self._queue: AdmissionQueue[_Request] = AdmissionQueue(max_queue_size)
        # continuous: the encoder thread's output, and what it holds meanwhile (both under _handoff,
        # so that "nothing left anywhere" is one atomic check)
        self._encoded: AdmissionQueue[_Request] = AdmissionQueue(MAX_ROWS + 1)
        self._in_encoder: list[_Request] = []
        self._handoff = threading.Lock()
        self._slots_freed = threading.Event()  # wakes an encoder that found no free feature slot
        self._encoder_thread: threading.Thread | None = None
        self._slots: SlotTable[_Request] = SlotTable(MAX_ROWS)
        self._finished: list[tuple[_Request, object]] = []  # (request, captions or exception)
        self._held: list[tuple[_Request, object]] = []  # static batching: released when the batch ends
        self._abandoned_count = 0  # bumped on the loop; the thread scans for abandoned requests when it changes
        self._abandoned_seen = 0
        self._seconds_per_request = 0.05  # moving average, for Retry-After
        self._thread: threading.Thread | None = None
        self._ready = False
        self._stopping = False
        self._stop_deadline = math.inf

    # --- event-loop side ---------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self.policy.name

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active_slots(self) -> int:
        return self._slots.used

    async def start(self) -> None:
        """Starts the inference thread and returns once it has warmed up every batch shape."""
        if self._thread is not None:
            raise RuntimeError("the engine was already started")
        loop = asyncio.get_running_loop()
        warmed_up = loop.create_future()
        self._thread = threading.Thread(target=self._thread_main, args=(loop, warmed_up),
                                        name=f"inference-{self.mode}", daemon=True)
        self._thread.start()
        await warmed_up
        if self.policy.encodes_ahead:
            self._encoder_thread = threading.Thread(target=self._encoder_main, name=f"inference-encoder-{self.mode}",
                                                    daemon=True)
            self._encoder_thread.start()
        if self.freeze_gc:
            # TensorFlow and Keras leave ~300k long-lived objects; a full collection walks them all
            # (~0.2 s holding the GIL, stalling the event loop and the engine alike). Frozen
            # objects are skipped: collections then see only what requests allocate.
            gc.collect()
            gc.freeze()
        self._ready = not self._stopping

    def check_admission(self) -> None:
        """Raises what submit() would raise right now for a full queue or a stopped engine, so a
        route can refuse before it spends time reading and decoding the upload."""
        if self._stopping or self._thread is None:
            metrics.REJECTIONS.labels(reason="stopped").inc()
            raise EngineStopped("the inference engine is not running")
        if len(self._queue) >= self._queue.maxsize:
            metrics.REJECTIONS.labels(reason="overloaded").inc()
            raise Overloaded(self._retry_after_s())

    async def submit(self, image: np.ndarray, options, deadline_s: float | None = None) -> Result:
        """Captions one prepared image (uint8 [S, S, 3]).

        deadline_s: seconds from now the request may take, queueing included (default:
        request_timeout_s). Raises Overloaded at once when the queue is full, DeadlineExceeded,
        EngineStopped, InferenceError, or ValueError for an invalid image or options.
        """
        if self._stopping or self._thread is None:
            metrics.REJECTIONS.labels(reason="stopped").inc()
            raise EngineStopped("the inference engine is not running")
        options.validate()
        if image.shape != self._image_shape or image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image of shape {self._image_shape}, got {image.dtype} {image.shape}")
        loop = asyncio.get_running_loop()
        request = _Request(image, options, loop, loop.create_future())
        try:
            self._queue.put_nowait(request)
        except QueueFull:
            metrics.REJECTIONS.labels(reason="overloaded").inc()
            raise Overloaded(self._retry_after_s()) from None
        timeout = self.request_timeout_s if deadline_s is None else deadline_s
        request.deadline_timer = loop.call_later(max(timeout, 0.0), self._expire, request)
        request.future.add_done_callback(lambda future: self._on_done(request))
        return await request.future

    async def stop(self, grace_s: float | None = None) -> None:
        """Stops admission at once; in-flight requests get `grace_s` to finish, then EngineStopped."""
        self._ready = False
        if not self._stopping:
            self._stopping = True
            grace = self.shutdown_grace_s if grace_s is None else grace_s
            self._stop_deadline = time.monotonic() + grace
        self._queue.wake()
        self._encoded.wake()
        self._slots_freed.set()
        for thread in (self._thread, self._encoder_thread):
            if thread is not None and thread.is_alive():
                await asyncio.to_thread(thread.join)

    def _retry_after_s(self) -> float:
        backlog = len(self._queue) + self._slots.used
        return max(1.0, backlog / max(self.policy.max_slots, 1) * self._seconds_per_request)

    def _expire(self, request: _Request) -> None:
        if not request.future.done():
            metrics.REJECTIONS.labels(reason="deadline").inc()
            request.future.set_exception(DeadlineExceeded("the request's deadline passed"))

    def _on_done(self, request: _Request) -> None:
        request.deadline_timer.cancel()
        cancelled = request.future.cancelled()
        if cancelled:
            metrics.REJECTIONS.labels(reason="cancelled").inc()
        if cancelled or isinstance(request.future.exception(), DeadlineExceeded):
            # Nobody awaits the captions any more: let the thread free the rows.
            request.abandoned = True
            self._abandoned_count += 1
            self._queue.wake()
            self._encoded.wake()

    @staticmethod
    def _deliver(outcomes: list[tuple[_Request, object]]) -> None:
        for request, outcome in outcomes:
            if request.future.done():  # cancelled, or failed by its deadline
                continue
            if isinstance(outcome, BaseException):
                request.future.set_exception(outcome)
            else:
                request.future.set_result(outcome)

    # --- inference thread --------------------------------------------------------------------

    def _thread_main(self, loop: asyncio.AbstractEventLoop, warmed_up: asyncio.Future) -> None:
        def report(error: BaseException | None) -> None:
            if warmed_up.done():
                return
            if error is None:
                warmed_up.set_result(None)
            else:
                warmed_up.set_exception(error)

        try:
            self.runner.warmup()
        except Exception as exc:
            logger.exception("engine warm-up failed")
            loop.call_soon_threadsafe(report, exc)
            return
        self._lower_inference_priority()
        loop.call_soon_threadsafe(report, None)
        logger.info("inference engine ready (batching mode: %s)", self.mode)
        while True:
            try:
                if not self._iterate():
                    break
            except Exception:
                # A bug here must not kill the service: fail what is in flight and carry on.
                logger.exception("inference loop iteration failed")
                self._fail_active(InferenceError("the inference engine failed"))
            self._flush()
        self._flush()
        metrics.QUEUE_DEPTH.set(0)
        metrics.ACTIVE_SLOTS.set(0)
        logger.info("inference engine stopped")

    def _lower_inference_priority(self) -> None:
        """Renices this thread and the native (TensorFlow) threads, so that the event loop, which
        must keep answering (503s included) however busy the model is, runs first when it is
        runnable; the model takes the CPU time left. Linux schedules each thread by its own nice
        value. Python threads other than this one (the event loop, decode workers) keep theirs."""
        if not self.inference_nice or not sys.platform.startswith("linux"):
            return
        python_threads = {thread.native_id for thread in threading.enumerate()}
        own = threading.get_native_id()
        try:
            thread_ids = [int(tid) for tid in os.listdir("/proc/self/task")]
        except OSError:
            return
        for tid in thread_ids:
            if tid == own or tid not in python_threads:
                self._renice(tid)

    def _lower_this_thread_priority(self) -> None:
        """For a model thread started after warm-up (the encoder)."""
        if self.inference_nice and sys.platform.startswith("linux"):
            self._renice(threading.get_native_id())

    def _renice(self, tid: int) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), self.inference_nice))
        except OSError:  # the thread ended, or the platform refuses
            pass

    def _iterate(self) -> bool:
        """One scheduling round of the decoder thread; False when the engine has shut down."""
        now = time.monotonic()
        if self._abandoned_count != self._abandoned_seen:
            self._drop_abandoned()
        if self._stopping:
            if now >= self._stop_deadline:
                self._stop_everything()
                return False
            if self._nothing_left():
                return False
        if self.policy.encodes_ahead:
            admitted, wait_s = self._place_encoded(now), None
        else:
            admitted, wait_s = self._admit(now)
        if self._slots.used:
            self._step()
        elif not admitted:
            source = self._encoded if self.policy.encodes_ahead else self._queue
            source.wait(IDLE_POLL_S if wait_s is None else min(wait_s, IDLE_POLL_S))
        metrics.QUEUE_DEPTH.set(len(self._queue))
        metrics.ACTIVE_SLOTS.set(self._slots.used)
        return True

    def _nothing_left(self) -> bool:
        with self._handoff:
            return not (len(self._queue) or len(self._encoded) or self._in_encoder or self._slots.used)

    def _drop_abandoned(self) -> None:
        self._abandoned_seen = self._abandoned_count
        self._queue.remove_if(lambda request: request.abandoned)
        self._free_slots(self._encoded.remove_if(lambda request: request.abandoned))
        gone = [request for request in self._slots.owners() if request.abandoned]
        if gone:
            self._release_rows(gone)

    def _release_rows(self, requests: list[_Request]) -> None:
        """Frees the requests' rows (re-densifying the rest) and their feature slots."""
        self.runner.apply(self._slots.release(requests))
        self._free_slots(requests)

    def _free_slots(self, requests: list[_Request]) -> None:
        slots = [request.feature_slot for request in requests if request.feature_slot is not None]
        for request in requests:
            request.feature_slot = None
        if slots:
            self.runner.free(slots)
            self._slots_freed.set()

    def _start_searches(self, requests: list[_Request]) -> None:
        """Places encoded requests into rows: allocation, search state, start tokens."""
        for request in requests:
            request.search = new_search(request.options, self.captioner.max_steps(request.options))
            start = self._slots.allocate(request, request.width)
            self.runner.place(start, request.width, request.feature_slot, request.search.start_tokens())

    def _place_encoded(self, now: float) -> int:
        """Continuous: the encoded requests that fit join the decode batch now."""
        head = self._encoded.head(MAX_ROWS)
        if not head:
            return 0
        admission = self.policy.admit([r.width for r in head], now - head[0].submitted, self._slots.used)
        taken = self._encoded.take(admission.count)
        self._free_slots([r for r in taken if r.abandoned])
        requests = [r for r in taken if not r.abandoned]
        self._start_searches(requests)
        return len(requests)

    def _admit(self, now: float) -> tuple[int, float | None]:
        """Static and none: take what the policy allows from the queue and encode it here."""
        head = self._queue.head(MAX_ROWS)
        if not head:
            return 0, None
        admission = self.policy.admit([r.width for r in head], now - head[0].submitted, self._slots.used)
        if not admission.count:
            return 0, admission.wait_s
        requests = [r for r in self._queue.take(admission.count) if not r.abandoned]
        if not requests:
            return 0, None
        failure = self._encode(requests, now)
        if failure is not None:
            self._finished.extend(_each_failed(requests, failure))
            return 0, None
        self._start_searches(requests)
        return len(requests), None

    def _encode(self, requests: list[_Request], now: float) -> InferenceError | None:
        """Encodes the requests' images into feature slots; on failure returns the error that
        fails them all (and only them)."""
        for request in requests:
            request.admitted = now
            metrics.QUEUE_WAIT_SECONDS.observe(now - request.submitted)
        started = time.perf_counter()
        try:
            slots = self.runner.encode(np.stack([request.image for request in requests]))
        except Exception as exc:
            logger.exception("encoding a batch of %d images failed", len(requests))
            return InferenceError(f"encoding the image failed: {exc}")
        metrics.ENCODE_SECONDS.observe(time.perf_counter() - started)
        for request, slot in zip(requests, slots, strict=True):
            request.feature_slot = slot
        return None

    def _step(self) -> None:
        used = self._slots.used
        started = time.perf_counter()
        try:
            log_probs, attention = self.runner.step(used)
        except Exception as exc:
            logger.exception("a decoder step over %d rows failed", used)
            self._fail_active(InferenceError(f"the decoder step failed: {exc}"))
            return
        metrics.STEP_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(used)
        retired = []
        for block in self._slots.blocks():
            request, rows = block.owner, slice(block.start, block.start + block.width)
            if request.abandoned:
                continue  # dropped, with its rows, at the next iteration
            try:
                tokens, parents = request.search.advance(log_probs[rows], attention[rows])
                if request.search.finished:
                    self._finish(request, self.captioner.results(request.search))
                    retired.append(request)
                else:
                    self.runner.set_next(block.start, tokens, parents)
            except Exception as exc:
                logger.exception("decoding failed for one request")
                self._finish(request, InferenceError(f"decoding failed: {exc}"))
                retired.append(request)
        if retired:
            self._release_rows(retired)

    def _finish(self, request: _Request, outcome: object) -> None:
        if self.policy.holds_results_until_batch_ends and not isinstance(outcome, BaseException):
            self._held.append((request, outcome))
        else:
            self._finished.append((request, outcome))

    def _fail_active(self, error: EngineError) -> None:
        owners = self._slots.owners()
        self._finished.extend(_each_failed(owners, error))
        self._slots = SlotTable(MAX_ROWS)
        self._free_slots(owners)

    def _stop_everything(self) -> None:
        """Grace period over: whatever is still queued, encoding, encoded or decoding gets EngineStopped.
        (A batch inside the encoder is failed now; the encoder drops it when its encode returns.)"""
        with self._handoff:
            leftovers = self._queue.drain() + self._encoded.drain() + list(self._in_encoder)
        owners = self._slots.owners()
        self._slots = SlotTable(MAX_ROWS)
        self._free_slots(owners)
        for request in leftovers + owners:
            if not request.abandoned:
                metrics.REJECTIONS.labels(reason="stopped").inc()
            self._finished.append((request, EngineStopped("the service is shutting down")))

    def _flush(self) -> None:
        """Hands finished requests to their event loops: one call per loop and iteration."""
        if self._held and not self._slots.used:
            self._finished.extend(self._held)
            self._held = []
        if not self._finished:
            return
        outcomes, self._finished = self._finished, []
        self._post(outcomes)

    def _post(self, finished: list[tuple[_Request, object]]) -> None:
        now = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for request, outcome in finished:
            if not isinstance(outcome, BaseException):
                inference_s = now - request.admitted
                metrics.INFERENCE_SECONDS.observe(inference_s)
                self._seconds_per_request += 0.05 * (inference_s - self._seconds_per_request)
                outcome = Result(outcome, (request.admitted - request.submitted) * 1e3, inference_s * 1e3)
            by_loop[request.loop].append((request, outcome))
        for loop, outcomes in by_loop.items():
            try:
                loop.call_soon_threadsafe(self._deliver, outcomes)
            except RuntimeError:  # the loop is closed: nobody is waiting
                pass

    # --- encoder thread (continuous) -------------------------------------------------------------

    def _encoder_main(self) -> None:
        """Encodes waiting requests as soon as it can, up to max_encode_batch at a time, into free
        feature slots, and hands them to the decoder thread."""
        self._lower_this_thread_priority()
        while True:
            if self._stopping and (time.monotonic() >= self._stop_deadline or self._nothing_left()):
                break
            self._slots_freed.clear()  # before looking, so that a slot freed after the look wakes the wait
            with self._handoff:
                count = min(self.policy.max_encode_batch, len(self.runner.free_slots))
                batch = [r for r in self._queue.take(count) if not r.abandoned] if count else []
                self._in_encoder = batch
            if not count:
                self._slots_freed.wait(IDLE_POLL_S)  # every slot is in use: wait for the decoder to free one
                continue
            if not batch:
                self._queue.wait(IDLE_POLL_S)
                continue
            try:
                failure = self._encode(batch, time.monotonic())
            except Exception:  # a bug: fail this batch, keep the thread alive
                logger.exception("the encoder thread failed")
                failure = InferenceError("the inference engine failed")
            with self._handoff:
                self._in_encoder = []
                if failure is None:
                    for request in batch:
                        self._encoded.put_nowait(request)
            if failure is not None:
                self._post(_each_failed(batch, failure))
        logger.info("encoder thread stopped")


def _each_failed(requests: list[_Request], error: EngineError) -> list[tuple[_Request, EngineError]]:
    """The outcomes of a failed batch: each request gets its own exception object, since raising
    one object in several awaiting tasks would tangle their tracebacks."""
    return [(request, type(error)(str(error))) for request in requests]
