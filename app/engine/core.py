"""The engine core: one thread owns the decode rows and runs the loop (vLLM's EngineCore).

Each iteration of the loop:
    drop abandoned requests (cancelled, or past their deadline) with their rows and feature slots
    admit: ask the scheduler's policy how many waiting requests join, and place them into rows
        (continuous: requests the encoder stage already encoded; static / none: take them from
        the admission queue and encode them here)
    one decoder step over every active row (the model runner)
    retire finished searches and post their results to the event loops that await them

The core knows requests only as rows and searches; the client (app.engine.engine) turns them
into futures, deadlines and cancellations. The policy (app.engine.scheduler) decides, the runner
(app.engine.runner) computes; the core just carries out their answers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np

from app import metrics
from app.engine import os_tuning
from app.engine.encoder import IDLE_POLL_S, EncoderStage, encode_requests
from app.engine.errors import EngineError, EngineStopped, InferenceError
from app.engine.request import Request, Result, deliver, each_failed
from app.engine.runner import ModelRunner
from app.engine.scheduler import MAX_ROWS, AdmissionQueue, BatchingPolicy, Block, SlotTable
from captioning.decoding import GreedySearch

logger = logging.getLogger("app.engine")

# Every running core in the process: two while a new model version takes over from the old one.
# The gauges are read from them when Prometheus scrapes, so two versions add up instead of each
# overwriting the other's figure.
_RUNNING: set[EngineCore] = set()
_RUNNING_LOCK = threading.Lock()  # cores come and go on their own threads while a scrape reads them


def _running() -> list[EngineCore]:
    with _RUNNING_LOCK:
        return list(_RUNNING)


metrics.QUEUE_DEPTH.set_function(lambda: sum(core.waiting() for core in _running()))
metrics.ACTIVE_SLOTS.set_function(lambda: sum(core.slots.used for core in _running()))


class EngineCore:
    def __init__(
        self,
        captioner,
        policy: BatchingPolicy,
        runner: ModelRunner,
        queue: AdmissionQueue[Request],
        *,
        inference_nice: int = 0,
    ):
        self.captioner = captioner
        self.policy = policy
        self.runner = runner
        self.queue = queue  # fed by the client on the event loop
        self.inference_nice = inference_nice
        self.encoder = (
            EncoderStage(
                runner,
                queue,
                getattr(policy, "max_encode_batch", 1),
                post=self.post,
                should_exit=self._encoder_should_exit,
                nice=inference_nice,
            )
            if policy.encodes_ahead
            else None
        )
        self.slots: SlotTable[Request] = SlotTable(MAX_ROWS)
        self.finished: list[tuple[Request, object]] = []  # (request, captions or exception)
        self.held: list[tuple[Request, object]] = []  # static batching: released when the batch ends
        self.abandoned_count = 0  # bumped on the loop; the thread scans for abandoned requests when it changes
        self.abandoned_seen = 0
        self.seconds_per_request = 0.05  # moving average, for Retry-After
        self.stopping = False
        self.stop_deadline = math.inf
        self.thread: threading.Thread | None = None

    # --- called from the event loop -------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop, warmed_up: asyncio.Future) -> None:
        self.thread = threading.Thread(
            target=self._main, args=(loop, warmed_up), name=f"inference-{self.policy.name}", daemon=True
        )
        with _RUNNING_LOCK:  # before the thread runs: a warm-up that fails at once removes it again
            _RUNNING.add(self)
        self.thread.start()

    def start_encoder(self) -> None:
        if self.encoder is not None:
            self.encoder.start(f"inference-encoder-{self.policy.name}")

    def threads(self) -> list[threading.Thread]:
        return [t for t in (self.thread, self.encoder.thread if self.encoder else None) if t is not None]

    def request_stop(self, grace_s: float) -> None:
        if not self.stopping:
            self.stopping = True
            self.stop_deadline = time.monotonic() + grace_s
        self.wake()

    def note_abandoned(self) -> None:
        """A request was cancelled or timed out: the threads free its rows and slot soon."""
        self.abandoned_count += 1
        self.wake()

    def wake(self) -> None:
        self.queue.wake()
        if self.encoder is not None:
            self.encoder.wake()

    # --- the core thread ------------------------------------------------------------------

    def _main(self, loop: asyncio.AbstractEventLoop, warmed_up: asyncio.Future) -> None:
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
            with _RUNNING_LOCK:
                _RUNNING.discard(self)
            loop.call_soon_threadsafe(report, exc)
            return
        os_tuning.lower_model_threads(self.inference_nice)
        loop.call_soon_threadsafe(report, None)
        logger.info("inference engine ready (batching mode: %s)", self.policy.name)
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
        with _RUNNING_LOCK:
            _RUNNING.discard(self)
        logger.info("inference engine stopped")

    def _iterate(self) -> bool:
        """One scheduling round; False when the engine has shut down."""
        now = time.monotonic()
        if self.abandoned_count != self.abandoned_seen:
            self._drop_abandoned()
        if self.stopping:
            if now >= self.stop_deadline:
                self._stop_everything()
                return False
            if self._nothing_left():
                return False
        if self.encoder is not None:
            admitted, wait_s = self._place_encoded(now), None
        else:
            admitted, wait_s = self._admit(now)
        if self.slots.used:
            self._step()
        elif not admitted:
            source = self.encoder.encoded if self.encoder is not None else self.queue
            source.wait(IDLE_POLL_S if wait_s is None else min(wait_s, IDLE_POLL_S))
        return True

    def waiting(self) -> int:
        """Requests admitted and not yet decoding: in the queue and, ahead of it, at the encoder or
        encoded and waiting for a decode slot (continuous: up to MAX_ROWS - MAX_BATCH_SIZE of
        them). What MAX_QUEUE_SIZE bounds and the queue-depth gauge shows: the queue alone let a
        full continuous engine hold more requests than a static one (its p95 in overload was above
        static's), and the gauge read 0 with 64 clients waiting 3 s."""
        if self.encoder is None:
            return len(self.queue)
        with self.encoder.handoff:  # the encoder moves requests between the three under it
            return len(self.queue) + len(self.encoder.encoded) + len(self.encoder.in_flight)

    def behind(self) -> bool:
        """Whether admitted requests wait for a decode row (queued, or encoded ahead): the engine is
        not keeping up with arrivals. The batch being encoded alone does not count."""
        return bool(len(self.queue) or (self.encoder is not None and len(self.encoder.encoded)))

    def _encoder_should_exit(self) -> bool:
        return self.stopping and (time.monotonic() >= self.stop_deadline or self._nothing_left())

    def _nothing_left(self) -> bool:
        if self.encoder is None:
            return not (len(self.queue) or self.slots.used)
        with self.encoder.handoff:
            return not (len(self.queue) or len(self.encoder.encoded) or self.encoder.in_flight or self.slots.used)

    def _drop_abandoned(self) -> None:
        self.abandoned_seen = self.abandoned_count
        self.queue.remove_if(lambda request: request.abandoned)
        if self.encoder is not None:
            self._free_slots(self.encoder.encoded.remove_if(lambda request: request.abandoned))
        gone = [request for request in self.slots.owners() if request.abandoned]
        if gone:
            self._release_rows(gone)

    def _release_rows(self, requests: list[Request]) -> None:
        """Frees the requests' rows (re-densifying the rest) and their feature slots."""
        self.runner.apply(self.slots.release(requests))
        self._free_slots(requests)

    def _free_slots(self, requests: list[Request]) -> None:
        slots = [slot for request in requests for slot in request.feature_slots]
        for request in requests:
            request.feature_slots = []
        if slots:
            self.runner.free(slots)
            if self.encoder is not None:
                self.encoder.slots_freed.set()

    def _start_searches(self, requests: list[Request]) -> None:
        """Places encoded requests into rows: allocation, search state, start tokens."""
        for request in requests:
            try:
                request.search = self.captioner.new_search(request.options)
            except ValueError as exc:  # EngineClient.submit checks first; this one request fails, not the batch
                self._finish(request, InferenceError(str(exc)))
                self._free_slots([request])
                continue
            start = self.slots.allocate(request, request.width)
            slot_of_row = np.asarray(request.feature_slots)[request.search.view_of_row()]
            self.runner.place(start, slot_of_row, request.search.start_tokens())

    def _policy_admits(self, head: list[Request], now: float):
        """The policy's answer for the requests at the head of a queue; their wait is the oldest's
        (clients take turns, so the first request need not be the oldest)."""
        oldest = min(r.submitted for r in head)
        return self.policy.admit([r.width for r in head], now - oldest, self.slots.used)

    def _place_encoded(self, now: float) -> int:
        """Continuous: the encoded requests that fit join the decode batch now."""
        encoded = self.encoder.encoded
        head = encoded.head(MAX_ROWS)
        if not head:
            return 0
        admission = self._policy_admits(head, now)
        taken = encoded.take(admission.count)
        self._free_slots([r for r in taken if r.abandoned])
        requests = [r for r in taken if not r.abandoned]
        self._start_searches(requests)
        return len(requests)

    def _admit(self, now: float) -> tuple[int, float | None]:
        """Static and none: take what the policy allows from the queue and encode it here."""
        head = self.queue.head(MAX_ROWS)
        if not head:
            return 0, None
        admission = self._policy_admits(head, now)
        if not admission.count:
            return 0, admission.wait_s
        requests = [r for r in self.queue.take(admission.count) if not r.abandoned]
        if not requests:
            return 0, None
        encoded, failed = encode_requests(self.runner, requests, now)
        self.finished.extend(failed)
        if not encoded:
            return 0, None
        self._start_searches(encoded)
        return len(encoded), None

    def _step(self) -> None:
        """One decoder call over every active row, then each search takes its tokens; finished
        searches leave their rows. When every active row is greedy and its program is compiled,
        the call takes several steps (multi-step decoding), else one."""
        used, blocks = self.slots.used, self.slots.blocks()
        multi_step = self.runner.greedy_ready(used) and all(
            type(block.owner.search) is GreedySearch for block in blocks
        )
        started = time.perf_counter()
        try:
            advance = self._greedy_steps(used, blocks) if multi_step else self._one_step(used)
        except Exception as exc:
            logger.exception("a decoder call over %d rows failed", used)
            self._fail_active(InferenceError(f"the decoder step failed: {exc}"))
            return
        metrics.STEP_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(used)
        retired = []
        for block in blocks:
            request = block.owner
            if request.abandoned:
                continue  # dropped, with its rows, at the next iteration
            try:
                if advance(block):
                    self._finish(request, self.captioner.results(request.search, request.scene))
                    retired.append(request)
            except Exception as exc:
                logger.exception("decoding failed for one request")
                self._finish(request, InferenceError(f"decoding failed: {exc}"))
                retired.append(request)
        if retired:
            self._release_rows(retired)

    def _one_step(self, used: int) -> Callable[[Block], bool]:
        """One step for every row; returns how a block takes its row's outputs (True: finished)."""
        log_probs, attention = self.runner.step(used)
        # Every row's most likely token in one call; greedy rows (most of them) need nothing else,
        # and the runner feeds them on (other searches overwrite their rows below).
        best = log_probs.argmax(axis=1)
        best_log_probs = log_probs[np.arange(used), best]
        self.runner.set_tokens(used, best)

        def advance(block: Block) -> bool:
            search, start = block.owner.search, block.start
            if type(search) is GreedySearch and search.takes(int(best[start])):
                search.advance_to(int(best[start]), float(best_log_probs[start]), attention[start])
            else:
                rows = slice(start, start + block.width)
                tokens, parents = search.advance(log_probs[rows], attention[rows])
                if not search.finished:
                    self.runner.set_next(start, tokens, parents)
            return search.finished

        return advance

    def _greedy_steps(self, used: int, blocks: list[Block]) -> Callable[[Block], bool]:
        """Several greedy steps in one compiled call, the tokens chosen in the graph (every row is
        one greedy search); rows join and leave between calls."""
        searches = [block.owner.search for block in blocks]
        words = np.array([search.hypothesis.words for search in searches], np.int32)
        min_words = np.array([search.options.min_length for search in searches], np.int32)
        chosen, log_probs, attention = self.runner.greedy_steps(used, words, min_words)

        def advance(block: Block) -> bool:
            row = block.start
            return block.owner.search.advance_many(chosen[:, row], log_probs[:, row], attention[:, row])

        return advance

    def _finish(self, request: Request, outcome: object) -> None:
        if self.policy.holds_results_until_batch_ends and not isinstance(outcome, BaseException):
            self.held.append((request, outcome))
        else:
            self.finished.append((request, outcome))

    def _fail_active(self, error: EngineError) -> None:
        owners = self.slots.owners()
        self.finished.extend(each_failed(owners, error))
        self.slots = SlotTable(MAX_ROWS)
        self._free_slots(owners)

    def _stop_everything(self) -> None:
        """Grace period over: whatever is still queued, encoding, encoded or decoding gets EngineStopped.
        (A batch inside the encoder is failed now; the encoder drops it when its encode returns.)"""
        if self.encoder is not None:
            with self.encoder.handoff:
                leftovers = self.queue.drain() + self.encoder.encoded.drain() + list(self.encoder.in_flight)
        else:
            leftovers = self.queue.drain()
        owners = self.slots.owners()
        self.slots = SlotTable(MAX_ROWS)
        self._free_slots(owners)
        for request in leftovers + owners:
            if not request.abandoned:
                metrics.REJECTIONS.labels(reason="stopped").inc()
            self.finished.append((request, EngineStopped("the service is shutting down")))

    def _flush(self) -> None:
        """Hands finished requests to their event loops: one call per loop and iteration."""
        if self.held and not self.slots.used:
            self.finished.extend(self.held)
            self.held = []
        if not self.finished:
            return
        outcomes, self.finished = self.finished, []
        self.post(outcomes)

    def post(self, finished: list[tuple[Request, object]]) -> None:
        """Sends outcomes to the event loops of their requests (from any engine thread)."""
        now = time.monotonic()
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for request, outcome in finished:
            if not isinstance(outcome, BaseException):
                inference_s = now - request.admitted
                metrics.INFERENCE_SECONDS.observe(inference_s)
                self.seconds_per_request += 0.05 * (inference_s - self.seconds_per_request)
                outcome = Result(
                    outcome, (request.admitted - request.submitted) * 1e3, inference_s * 1e3, request.domain_score
                )
            by_loop[request.loop].append((request, outcome))
        for loop, outcomes in by_loop.items():
            try:
                loop.call_soon_threadsafe(deliver, outcomes)
            except RuntimeError:  # the loop is closed: nobody is waiting
                pass
