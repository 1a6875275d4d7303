"""The engine's client: the only object the service touches (vLLM's AsyncLLM in front of its
EngineCore). It lives on the event loop; the core's threads do the model work.

    event loop (EngineClient)                 core thread (EngineCore)              encoder thread (continuous)
    ---------------------------               ------------------------              ---------------------------
    submit() -> bounded AdmissionQueue  -------------------------------------->   EncoderStage: encode ahead
      (full: Overloaded, at once)              each iteration: drop abandoned,  <-   into feature slots
    deadline timer / cancellation               admit (policy), one decoder step,
      -> request abandoned                      retire finished searches
    await future  <- call_soon_threadsafe(deliver) <- post results

Deadlines run on the event loop (a timer per request), so a caller gets its DeadlineExceeded on
time even while a thread is inside a long encode; the timer, like a cancellation, marks the request
abandoned and the core frees its rows and feature slots. Results are only ever set on the event
loop, after checking that the future is not already done, so a cancelled future never receives
one. The service asks check_admission() at the door, before a body is read, and takes a queue
place only at submit(), once the upload is read and decoded.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from app import metrics
from app.engine import os_tuning
from app.engine.client_share import ClientShares
from app.engine.core import EngineCore
from app.engine.errors import (
    ClientOverloaded,
    DeadlineExceeded,
    EngineError,
    EngineStopped,
    InferenceError,
    Overloaded,
)
from app.engine.request import Request, Result
from app.engine.runner import ModelRunner
from app.engine.scheduler import MAX_ROWS, AdmissionQueue, BatchingPolicy, QueueFull
from captioning.decoding import DecodeOptions

# The warm-up request's own deadline: a short REQUEST_TIMEOUT_S on a slow machine must not make a
# good model fail its warm-up and be refused.
WARM_UP_DEADLINE_S = 120.0

logger = logging.getLogger("app.engine")


class EngineClient:
    def __init__(
        self,
        captioner,
        policy: BatchingPolicy,
        *,
        max_queue_size: int = 256,
        shares: ClientShares | None = None,
        request_timeout_s: float = 30.0,
        shutdown_grace_s: float = 10.0,
        inference_nice: int = 0,
        freeze_gc: bool = False,
        greedy_steps: int = 1,
        runner: ModelRunner | None = None,
    ):
        self.captioner = captioner
        self.policy = policy
        self.freeze_gc = freeze_gc
        self.request_timeout_s = request_timeout_s
        self.shutdown_grace_s = shutdown_grace_s
        self.runner = runner or ModelRunner(captioner, MAX_ROWS, greedy_steps=greedy_steps, nice=inference_nice)
        self._image_shape = (captioner.config.image_size, captioner.config.image_size, 3)
        self._queue: AdmissionQueue[Request] = AdmissionQueue(max_queue_size)
        # The places each client holds (a place: one of its requests queued or being captioned);
        # the model repository hands every version of a model the same one. None: no limit.
        self.shares = shares or ClientShares(None)
        self.core = EngineCore(captioner, policy, self.runner, self._queue, inference_nice=inference_nice)
        self._started = False
        self._stopped: asyncio.Future | None = None  # done once stop() is called
        self._ready = False

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
        return self.core.slots.used

    async def start(self) -> None:
        """Starts the core thread and returns once it has warmed up every batch shape."""
        if self._started:
            raise RuntimeError("the engine was already started")
        self._started = True
        loop = asyncio.get_running_loop()
        self._stopped = loop.create_future()
        warmed_up = loop.create_future()
        self.core.start(loop, warmed_up)
        await warmed_up
        self.core.start_encoder()
        await self._first_request()
        if self.freeze_gc:
            os_tuning.freeze_long_lived_objects()
        self._ready = not self.core.stopping

    async def _first_request(self) -> None:
        """One blank image through the whole path (queue, encoder stage, core, delivery) before
        readiness, so that no client's request is the first to run each piece. A model that cannot
        caption it would fail every request: the error goes to the caller (the model repository
        refuses the version) instead of an engine that says it is ready."""
        try:
            blank = np.zeros(self._image_shape, np.uint8)
            await self.submit(
                blank, DecodeOptions(max_length=2), deadline_s=max(self.request_timeout_s, WARM_UP_DEADLINE_S)
            )
        except EngineError as exc:
            raise InferenceError(f"the warm-up request failed: {exc}") from exc

    def check_admission(self, arriving: int = 0) -> None:
        """Raises what submit() would raise right now for a full queue or a stopped engine, so a
        route can refuse before it spends time reading and decoding the upload. `arriving`: requests
        already let in whose uploads are still being read. While requests wait for a decode row
        (the engine is behind), each of those will want a place too, so they count against the room
        left, else they find the queue full after their upload; an engine that keeps up counts them
        not at all, so slow uploads never make an idle engine refuse."""
        if self.core.stopping or not self._started:
            metrics.REJECTIONS.labels(reason="stopped").inc()
            raise EngineStopped("the inference engine is not running")
        waiting = self.core.waiting()
        if waiting >= self._queue.maxsize or (self.core.behind() and waiting + arriving >= self._queue.maxsize):
            metrics.REJECTIONS.labels(reason="overloaded").inc()
            raise Overloaded(self._retry_after_s())

    async def wait_for_client_room(self, client: str, timeout_s: float) -> bool:
        """Returns once `client` holds less than its share of the engine (client_share): at once
        (False) or after waiting for one of its images to be answered (True); raises
        ClientOverloaded if none is within `timeout_s`. The door asks this before a body is read."""
        try:
            return await self.shares.wait_for_room(client, timeout_s, until=self._stopped)
        except TimeoutError:
            if self.core.stopping:
                raise EngineStopped("the inference engine is not running") from None
            metrics.REJECTIONS.labels(reason="client_share").inc()
            raise ClientOverloaded(self._retry_after_s(), self.shares.limit) from None

    async def submit(self, image: np.ndarray, options, deadline_s: float | None = None, client: str = "") -> Result:
        """Captions one prepared image (uint8 [S, S, 3]).

        deadline_s: seconds from now the request may take, queueing included (default:
        request_timeout_s). client: who asked (the address): clients take turns in the queue, and
        an image of a client holding its share (self.shares) waits for one of its places first.
        Raises Overloaded at once when the queue is full, DeadlineExceeded, EngineStopped,
        InferenceError, or ValueError for an invalid image or options. Cancelling the awaiting
        task cancels the request (its rows and feature slots are freed).
        """
        if self.core.stopping or not self._started:
            metrics.REJECTIONS.labels(reason="stopped").inc()
            raise EngineStopped("the inference engine is not running")
        options.validate()
        self.core.captioner.check(options)
        if image.shape != self._image_shape or image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image of shape {self._image_shape}, got {image.dtype} {image.shape}")
        loop = asyncio.get_running_loop()
        timeout = self.request_timeout_s if deadline_s is None else deadline_s
        give_up_at = loop.time() + timeout
        try:
            await self.shares.take(client, timeout, until=self._stopped)  # at once, unless it holds its share
        except TimeoutError:
            if self.core.stopping:
                raise EngineStopped("the inference engine stopped") from None
            metrics.REJECTIONS.labels(reason="deadline").inc()
            raise DeadlineExceeded(
                "the request's deadline passed while it waited for a place in its client's share of the queue "
                "(CLIENT_QUEUE_SHARE)",
                self._retry_after_s(),
            ) from None
        if self.core.stopping:
            self.shares.give_back(client)
            raise EngineStopped("the inference engine is not running")
        request = Request(image, options, loop, loop.create_future())
        try:
            if self.core.waiting() >= self._queue.maxsize:
                raise QueueFull
            self._queue.put_nowait(request, client)
        except QueueFull:
            self.shares.give_back(client)
            metrics.REJECTIONS.labels(reason="overloaded").inc()
            raise Overloaded(self._retry_after_s()) from None
        request.deadline_timer = loop.call_later(max(give_up_at - loop.time(), 0.0), self._expire, request)
        request.future.add_done_callback(lambda future: self._on_done(request, client))
        return await request.future

    async def stop(self, grace_s: float | None = None) -> None:
        """Stops admission at once; in-flight requests get `grace_s` to finish, then EngineStopped."""
        self._ready = False
        self.core.request_stop(self.shutdown_grace_s if grace_s is None else grace_s)
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)  # its images waiting for a place get EngineStopped now
        self.runner.cancel_warmup()
        for thread in [*self.core.threads(), self.runner.warmup_thread]:
            if thread is not None and thread.is_alive():
                await asyncio.to_thread(thread.join)
        self.runner.close()

    def _retry_after_s(self) -> float:
        backlog = self.core.waiting() + self.core.slots.used
        return max(1.0, backlog / max(self.policy.max_slots, 1) * self.core.seconds_per_request)

    def _expire(self, request: Request) -> None:
        if not request.future.done():
            metrics.REJECTIONS.labels(reason="deadline").inc()
            if request.admitted:  # being captioned: the model, not a queue, took the time
                late = DeadlineExceeded("the request's deadline passed")
            else:  # a backlog: say when to come back, as Overloaded does
                late = DeadlineExceeded(
                    "the request's deadline passed while it waited for the model", self._retry_after_s()
                )
            request.future.set_exception(late)

    def _on_done(self, request: Request, client: str) -> None:
        request.deadline_timer.cancel()
        self.shares.give_back(client)
        cancelled = request.future.cancelled()
        if cancelled:
            metrics.REJECTIONS.labels(reason="cancelled").inc()
        if cancelled or isinstance(request.future.exception(), DeadlineExceeded):
            # Nobody awaits the captions any more: let the core free the rows.
            request.abandoned = True
            self.core.note_abandoned()


Engine = EngineClient  # the name the service and the other modules have always used
