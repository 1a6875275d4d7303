"""The batching engine: policies and slot bookkeeping alone, then the engine on a tiny random model.

A random model's captions run to varied lengths, often to the limit, which makes it a good stress
test: sequences join and leave the decode batch at every step.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from app.engine import ClientOverloaded, DeadlineExceeded, EngineStopped, InferenceError, Overloaded, create_engine
from app.engine.scheduler import (
    MAX_ROWS,
    AdmissionQueue,
    ContinuousPolicy,
    QueueFull,
    SequentialPolicy,
    SlotTable,
    StaticPolicy,
    make_policy,
)
from app.settings import Settings
from captioning.decoding import DecodeOptions

MODES = ("continuous", "static", "none")


# ------------------------------------------------------------------------------- pure policy


def test_slot_table_keeps_rows_dense_and_moves_rows_with_their_owner():
    rng = random.Random(0)
    table = SlotTable(MAX_ROWS)
    rows = np.full(MAX_ROWS, -1)  # which owner's data each row holds, as a runner's arrays would
    next_owner = 0
    for _ in range(2000):
        if table.owners() and rng.random() < 0.45:
            gone = rng.sample(table.owners(), rng.randint(1, min(4, len(table))))
            for move in table.release(gone):
                rows[move.destination : move.destination + move.width] = rows[move.source : move.source + move.width]
        else:
            width = rng.choice([1, 1, 1, 2, 3, 5])
            if table.used + width <= MAX_ROWS:
                start = table.allocate(next_owner, width)
                rows[start : start + width] = next_owner
                next_owner += 1
        blocks = sorted(table.blocks(), key=lambda b: b.start)
        assert sum(b.width for b in blocks) == table.used
        row = 0
        for block in blocks:  # dense, non-overlapping, and each owner's data followed it
            assert block.start == row
            assert (rows[block.start : block.start + block.width] == block.owner).all()
            row += block.width


def test_slot_table_refuses_overflow():
    table = SlotTable(4)
    table.allocate("a", 3)
    with pytest.raises(ValueError):
        table.allocate("b", 2)


def test_continuous_policy_lets_every_encoded_request_that_fits_join_at_once():
    policy = ContinuousPolicy(max_slots=8, max_encode_batch=4)
    assert policy.encodes_ahead and policy.max_encode_batch == 4
    assert policy.admit([1] * 20, 0.0, used_slots=0).count == 8  # idle: fill every row
    assert policy.admit([1] * 20, 0.0, used_slots=5).count == 3  # busy: every free row, at once
    assert policy.admit([1], 0.0, used_slots=8).count == 0  # no free row
    assert policy.admit([3, 3], 1.0, used_slots=4).count == 1  # the second request does not fit yet


def test_a_request_wider_than_the_slot_budget_runs_alone_when_idle():
    assert ContinuousPolicy(max_slots=2).admit([5, 1], 0.0, used_slots=0).count == 1
    assert ContinuousPolicy(max_slots=2).admit([5], 1.0, used_slots=1).count == 0
    assert StaticPolicy(max_slots=2, max_queue_delay_s=0.0).admit([5, 1], 0.0, used_slots=0).count == 1


def test_static_policy_gathers_a_batch_then_decodes_it_to_completion():
    policy = StaticPolicy(max_slots=4, max_queue_delay_s=0.005)
    waiting = policy.admit([1, 1], 0.001, used_slots=0)
    assert waiting.count == 0 and waiting.wait_s == pytest.approx(0.004)
    assert policy.admit([1, 1], 0.006, used_slots=0).count == 2  # the delay is up
    assert policy.admit([1] * 6, 0.0, used_slots=0).count == 4  # the batch is full
    assert policy.admit([1] * 6, 1.0, used_slots=1).count == 0  # a batch is running
    assert policy.holds_results_until_batch_ends


def test_sequential_policy_takes_one_request_at_a_time():
    policy = SequentialPolicy()
    assert policy.admit([3, 1, 1], 0.0, used_slots=0).count == 1
    assert policy.admit([1, 1], 1.0, used_slots=3).count == 0


def test_make_policy_rejects_unknown_modes_and_sizes():
    args = dict(max_slots=8, max_queue_delay_s=0.005, max_encode_batch=16)
    assert make_policy("continuous", **args).max_encode_batch == 8
    with pytest.raises(ValueError):
        make_policy("dynamic", **args)
    with pytest.raises(ValueError):
        make_policy("static", **{**args, "max_slots": MAX_ROWS + 1})


def test_clients_take_turns_in_the_admission_queue_and_each_keeps_its_order():
    """One address's burst (16 requests of 16 images: 256 at once) had queued whole ahead of another
    client's single image, first come first served: 0.229 s p50 for a caption that takes 0.005 s
    alone (bench.attack's burst phase). Each item now goes in by its owner's turn; an owner's own
    items keep their order."""
    queue = AdmissionQueue(100)
    for i in range(6):
        queue.put_nowait(f"flood {i}", "10.0.0.1")
    queue.put_nowait("user 0", "10.0.0.2")
    queue.put_nowait("user 1", "10.0.0.2")
    assert queue.head(8) == ["flood 0", "user 0", "flood 1", "user 1", "flood 2", "flood 3", "flood 4", "flood 5"]
    assert queue.take(3) == ["flood 0", "user 0", "flood 1"]
    queue.put_nowait("late 0", "10.0.0.3")  # its turn starts after what was taken, not at the back
    assert queue.head(3) == ["user 1", "flood 2", "late 0"]  # flood 2 has the same turn and came first
    assert queue.remove_if(lambda item: item == "late 0") == ["late 0"]
    assert queue.take_within(10, cost=lambda item: 1, most=10) == ["user 1", "flood 2", "flood 3", "flood 4", "flood 5"]
    for i in range(3):  # without owners (or with one) it is first come first served
        queue.put_nowait(i)
    assert queue.drain() == [0, 1, 2] and len(queue) == 0


def test_a_client_whose_queued_requests_expired_is_not_put_further_back_for_them():
    """A review found that requests removed from the queue (deadline, cancellation) still counted
    as turns their client had used: after 100 removed, its next request went behind 100 others."""
    queue = AdmissionQueue(300)
    for i in range(100):
        queue.put_nowait(f"victim {i}", "10.0.0.2")
    assert len(queue.remove_if(lambda item: item.startswith("victim"))) == 100
    for i in range(150):
        queue.put_nowait(f"flood {i}", "10.0.0.1")
    queue.put_nowait("retry", "10.0.0.2")
    assert queue.head(3) == ["flood 0", "retry", "flood 1"]
    queue.put_nowait("victim again", "10.0.0.2")
    queue.remove_if(lambda item: item == "retry")  # its turn goes back to its last request still queued
    assert queue.head(3) == ["flood 0", "flood 1", "victim again"]


def test_admission_queue_is_bounded_and_lets_the_consumer_peek():
    queue = AdmissionQueue(2)
    queue.put_nowait("a")
    queue.put_nowait("b")
    with pytest.raises(QueueFull):
        queue.put_nowait("c")
    assert queue.head(5) == ["a", "b"] and len(queue) == 2
    assert queue.remove_if(lambda item: item == "a") == ["a"]
    assert queue.take(5) == ["b"] and len(queue) == 0
    queue.wake()
    started = time.monotonic()
    queue.wait(5.0)  # a wake-up that came first is not lost
    assert time.monotonic() - started < 1.0


# ------------------------------------------------------------------------------ the engine


class ControlledCaptioner:
    """A Captioner whose encode calls can be held at a gate or made to fail, for the failure tests.
    Warm-up goes to the real model, so it is never held."""

    def __init__(self, captioner):
        self._captioner = captioner
        self.gate = threading.Event()
        self.gate.set()
        self.encode_entered = threading.Event()
        self.encode_batches: list[int] = []
        self.step_batches: list[int] = []
        self.poisoned_pixel: int | None = None  # encode fails for a batch holding an image filled with it
        self.failing_steps = 0
        self.step_gate = threading.Event()  # cleared: decoder steps wait (for at most 10 s)
        self.step_gate.set()

    def __getattr__(self, name):
        return getattr(self._captioner, name)

    def forget(self):
        """Drops what the engine's start-up request left (it runs the whole path once)."""
        self.encode_entered.clear()
        self.encode_batches.clear()
        self.step_batches.clear()

    def feature_slots(self, capacity):
        return ControlledSlots(self._captioner.feature_slots(capacity), self)

    def before_encode(self, images):
        self.encode_entered.set()
        assert self.gate.wait(10), "test gate never opened"
        self.encode_batches.append(len(images))
        if self.poisoned_pixel is not None and any((image == self.poisoned_pixel).all() for image in images):
            raise RuntimeError("poisoned batch")

    def before_step(self, tokens):
        assert self.step_gate.wait(10), "step gate never opened"
        self.step_batches.append(len(tokens))
        if self.failing_steps:
            self.failing_steps -= 1
            raise RuntimeError("step failed")


class ControlledSlots:
    def __init__(self, slots, controller: ControlledCaptioner):
        self._slots, self._controller = slots, controller

    def __getattr__(self, name):
        return getattr(self._slots, name)

    def encode(self, images, slot_ids):
        self._controller.before_encode(images)
        return self._slots.encode(images, slot_ids)

    def step(self, slot_of_row, tokens, state):
        self._controller.before_step(tokens)
        return self._slots.step(slot_of_row, tokens, state)

    def greedy_steps(self, slot_of_row, tokens, state, words, min_words, steps):
        self._controller.before_step(tokens)
        return self._slots.greedy_steps(slot_of_row, tokens, state, words, min_words, steps)


async def started_engine(controlled, engine_settings):
    """An engine over `controlled`, started; the warm-up request it sent is forgotten."""
    engine = create_engine(controlled, engine_settings)
    await engine.start()
    controlled.forget()
    return engine


def settings(mode="continuous", **overrides):
    values = dict(
        batching_mode=mode,
        max_batch_size=16,
        max_queue_delay_ms=5.0,
        max_queue_size=64,
        max_encode_batch=16,
        request_timeout_s=20.0,
        shutdown_grace_s=5.0,
        inference_nice=0,
        freeze_gc=False,
    )
    return Settings(**{**values, **overrides})


def run(coroutine):
    """Runs a test coroutine; any exception raised in a loop callback (such as setting a result on a
    cancelled future) fails the test."""

    async def main():
        callback_errors = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: callback_errors.append(context))
        result = await coroutine
        await asyncio.sleep(0.05)  # let late deliveries run
        assert not callback_errors, callback_errors
        return result

    return asyncio.run(main())


def images(count, size=32, seed=0):
    return list(np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8))


MIXED_OPTIONS = [
    DecodeOptions(),
    DecodeOptions(max_length=3),
    DecodeOptions(strategy="beam", beam_size=3, num_captions=2),
    DecodeOptions(strategy="sample", num_captions=2, seed=5),
    DecodeOptions(max_length=1),
    DecodeOptions(strategy="beam", beam_size=2, max_length=4),
    DecodeOptions(max_length=7),
]


def assert_same_captions(got, expected):
    assert [c.tokens for c in got] == [c.tokens for c in expected]
    np.testing.assert_allclose([c.log_prob for c in got], [c.log_prob for c in expected], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("captioner_fixture", "mode"),
    [("tiny_captioner", mode) for mode in MODES] + [("input_feeding_captioner", "continuous")],
)
def test_engine_captions_equal_offline_captions_under_concurrency(captioner_fixture, mode, request):
    """Greedy, beam (rows reordered with their state) and sampling, mixed in one batch; with input
    feeding too, whose state rows carry the attention context."""
    tiny_captioner = request.getfixturevalue(captioner_fixture)
    pictures = images(28)
    options = [MIXED_OPTIONS[i % len(MIXED_OPTIONS)] for i in range(len(pictures))]
    expected = [tiny_captioner.caption([p], o)[0] for p, o in zip(pictures, options, strict=True)]
    rng = random.Random(1)
    arrival_s = [rng.choice([0.0, 0.0, rng.uniform(0, 0.05)]) for _ in pictures]

    async def scenario():
        engine = create_engine(tiny_captioner, settings(mode, max_batch_size=12))
        await engine.start()
        assert engine.ready

        async def client(picture, option, delay):
            await asyncio.sleep(delay)
            return await engine.submit(picture, option)

        results = await asyncio.gather(*(client(p, o, d) for p, o, d in zip(pictures, options, arrival_s, strict=True)))
        await engine.stop()
        assert engine.active_slots == 0 and engine.queue_depth == 0
        return results

    results = run(scenario())
    for result, captions in zip(results, expected, strict=True):
        assert_same_captions(result.captions, captions)
        assert result.queue_ms >= 0 and result.inference_ms > 0


def test_continuous_batching_shares_decode_steps_between_requests(tiny_captioner):
    controlled = ControlledCaptioner(tiny_captioner)

    async def scenario():
        engine = await started_engine(controlled, settings("continuous"))
        first = asyncio.create_task(engine.submit(images(1)[0], DecodeOptions()))
        await asyncio.sleep(0.02)
        await asyncio.gather(first, *(engine.submit(p, DecodeOptions()) for p in images(6, seed=1)))
        await engine.stop()

    run(scenario())
    assert max(controlled.step_batches) > 1  # later arrivals joined the running batch


@pytest.mark.parametrize(("mode", "expected_batches"), [("static", [4]), ("none", [1, 1, 1, 1])])
def test_static_mode_batches_requests_and_none_mode_takes_one_at_a_time(tiny_captioner, mode, expected_batches):
    controlled = ControlledCaptioner(tiny_captioner)

    async def scenario():
        engine = await started_engine(controlled, settings(mode, max_queue_delay_ms=200))
        await asyncio.gather(*(engine.submit(p, DecodeOptions()) for p in images(4)))
        await engine.stop()

    run(scenario())
    assert controlled.encode_batches == expected_batches


def test_a_full_queue_rejects_at_once_with_retry_after(tiny_captioner):
    controlled = ControlledCaptioner(tiny_captioner)

    async def scenario():
        engine = await started_engine(controlled, settings(max_queue_size=3))
        controlled.gate.clear()
        held = asyncio.create_task(engine.submit(images(1)[0], DecodeOptions()))
        await asyncio.to_thread(controlled.encode_entered.wait, 5)  # the engine thread is busy encoding
        engine.check_admission(arriving=5)  # nothing queued: uploads being read do not count
        # The request being encoded has not started decoding: it takes one of the three places.
        queued = [asyncio.create_task(engine.submit(images(3, seed=2)[0], DecodeOptions()))]
        await asyncio.sleep(0.01)
        engine.check_admission()  # one place left...
        with pytest.raises(Overloaded):
            engine.check_admission(arriving=1)  # ...already spoken for by an upload being read
        queued.append(asyncio.create_task(engine.submit(images(3, seed=2)[1], DecodeOptions())))
        await asyncio.sleep(0.01)
        assert engine.queue_depth == 2 and engine.core.waiting() == 3
        with pytest.raises(Overloaded):
            engine.check_admission()  # what app.guards.UploadGuard asks before the upload is read
        started = time.perf_counter()
        with pytest.raises(Overloaded) as rejected:
            await engine.submit(images(1, seed=3)[0], DecodeOptions())
        assert time.perf_counter() - started < 0.05
        assert rejected.value.retry_after_s >= 1
        controlled.gate.set()
        results = await asyncio.gather(held, *queued)  # the queued requests are still served
        engine.check_admission()
        await engine.stop()
        return results

    assert len(run(scenario())) == 3


def test_one_client_holds_at_most_its_share_of_the_queue_its_other_images_wait_outside_it(tiny_captioner):
    controlled = ControlledCaptioner(tiny_captioner)

    async def scenario():
        engine = await started_engine(controlled, settings(max_queue_size=6, max_batch_size=1, client_queue_share=0.5))
        assert engine.shares.limit == 4  # half the queue, and a batch being decoded
        controlled.gate.clear()
        flood = [asyncio.create_task(engine.submit(p, DecodeOptions(), client="10.0.0.9")) for p in images(6)]
        await asyncio.sleep(0.05)
        # Four places held, two images waiting outside the queue (accepted work is not refused).
        assert engine.shares.held("10.0.0.9") == 4 and engine.core.waiting() <= 4
        started = time.perf_counter()
        with pytest.raises(ClientOverloaded) as refused:  # at the door, before another upload is read
            await engine.wait_for_client_room("10.0.0.9", 0.2)
        assert 0.2 <= time.perf_counter() - started < 1 and refused.value.retry_after_s >= 1
        assert await engine.wait_for_client_room("10.0.0.7", 0.2) is False  # the rest is the others'
        other = asyncio.create_task(engine.submit(images(1, seed=6)[0], DecodeOptions(), client="10.0.0.7"))
        unnamed = asyncio.create_task(engine.submit(images(1, seed=7)[0], DecodeOptions()))  # no address: no share
        await asyncio.sleep(0.05)
        assert engine.shares.held("10.0.0.7") == 1 and engine.shares.held("") == 0
        door = asyncio.create_task(engine.wait_for_client_room("10.0.0.9", 10))
        await asyncio.sleep(0.05)
        assert not door.done()
        controlled.gate.set()
        results = await asyncio.gather(*flood, other, unnamed)
        assert await door is True  # let in once its images were answered, without a retry
        held = engine.shares.held("10.0.0.9")
        await engine.stop()
        return results, held

    results, held = run(scenario())
    assert len(results) == 8 and all(result.captions for result in results)
    assert held == 0


def test_an_image_waiting_for_its_clients_share_gives_up_at_its_deadline_or_when_cancelled(tiny_captioner):
    controlled = ControlledCaptioner(tiny_captioner)

    async def scenario():
        engine = await started_engine(controlled, settings(max_queue_size=2, max_batch_size=1, client_queue_share=0.5))
        assert engine.shares.limit == 2
        controlled.gate.clear()
        first = asyncio.create_task(engine.submit(images(1, seed=1)[0], DecodeOptions(), client="10.0.0.9"))
        held = asyncio.create_task(engine.submit(images(1)[0], DecodeOptions(), client="10.0.0.9"))
        await asyncio.sleep(0.05)
        with pytest.raises(DeadlineExceeded) as late:
            await engine.submit(images(1, seed=2)[0], DecodeOptions(), deadline_s=0.1, client="10.0.0.9")
        assert late.value.retry_after_s >= 1 and "CLIENT_QUEUE_SHARE" in str(late.value)
        left = asyncio.create_task(engine.submit(images(1, seed=3)[0], DecodeOptions(), client="10.0.0.9"))
        last = asyncio.create_task(engine.submit(images(1, seed=4)[0], DecodeOptions(), client="10.0.0.9"))
        await asyncio.sleep(0.05)
        left.cancel()  # the client went away while its image waited: the place passes to the next
        controlled.gate.set()
        results = await asyncio.gather(first, held, last)
        assert left.cancelled() and engine.shares.held("10.0.0.9") == 0
        await engine.stop()
        return results

    assert all(result.captions for result in run(scenario()))


def test_stopping_ends_the_waits_for_a_clients_share_at_once(tiny_captioner):
    """Images waiting for one of their client's places, and a request waiting for room at the door,
    get EngineStopped (503 not_ready) when the engine stops, not a deadline or a 429 later."""
    controlled = ControlledCaptioner(tiny_captioner)

    async def scenario():
        engine = await started_engine(controlled, settings(max_queue_size=2, max_batch_size=1, client_queue_share=0.5))
        controlled.gate.clear()
        holding = [asyncio.create_task(engine.submit(p, DecodeOptions(), client="10.0.0.9")) for p in images(2)]
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(engine.submit(images(1, seed=3)[0], DecodeOptions(), client="10.0.0.9"))
        door = asyncio.create_task(engine.wait_for_client_room("10.0.0.9", 10))
        await asyncio.sleep(0.05)
        stopping = asyncio.create_task(engine.stop(grace_s=2))
        started = time.perf_counter()
        with pytest.raises(EngineStopped):
            await waiting
        with pytest.raises(EngineStopped):
            await door
        waited_s = time.perf_counter() - started
        controlled.gate.set()
        await asyncio.gather(*holding, return_exceptions=True)
        await stopping
        return waited_s, engine.shares.held("10.0.0.9")

    waited_s, held = run(scenario())
    assert waited_s < 0.5 and held == 0


def test_a_share_of_one_puts_no_limit_on_a_client(tiny_captioner):
    engine = create_engine(ControlledCaptioner(tiny_captioner), settings(client_queue_share=1.0))
    assert engine.shares.limit is None
    with pytest.raises(ValueError):
        Settings(client_queue_share=0)


def test_deadline_fails_waiting_and_active_requests_and_frees_their_slots(tiny_captioner):
    controlled = ControlledCaptioner(tiny_captioner)

    async def scenario():
        engine = await started_engine(controlled, settings())
        controlled.gate.clear()
        active = asyncio.create_task(engine.submit(images(1)[0], DecodeOptions(), deadline_s=0.2))
        await asyncio.to_thread(controlled.encode_entered.wait, 5)
        waiting = asyncio.create_task(engine.submit(images(1, seed=1)[0], DecodeOptions(), deadline_s=0.2))
        started = time.perf_counter()
        late = []
        for task in (active, waiting):
            with pytest.raises(DeadlineExceeded) as raised:
                await task
            late.append(raised.value)
        assert time.perf_counter() - started < 0.5  # on time, although the engine thread is stuck
        # Only the one that waited behind the stuck batch says when to come back (the 504's Retry-After).
        assert late[0].retry_after_s is None and late[1].retry_after_s >= 1
        controlled.gate.set()
        result = await engine.submit(images(1, seed=2)[0], DecodeOptions())  # the engine goes on
        for _ in range(100):
            if engine.active_slots == 0 and engine.queue_depth == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.active_slots == 0 and engine.queue_depth == 0
        await engine.stop()
        return result

    assert run(scenario()).captions


def test_a_cancelled_request_frees_its_slots_and_never_gets_a_result(tiny_captioner):
    controlled = ControlledCaptioner(tiny_captioner)

    async def scenario():
        engine = await started_engine(controlled, settings())
        # Long beam searches; cancel most of them at different points of their decoding.
        tasks = [asyncio.create_task(engine.submit(p, DecodeOptions(strategy="beam", beam_size=4))) for p in images(8)]
        survivor = asyncio.create_task(engine.submit(images(1, seed=9)[0], DecodeOptions()))
        for task in tasks:
            await asyncio.sleep(0.002)
            task.cancel()
        assert (await survivor).captions
        await asyncio.gather(*tasks, return_exceptions=True)
        for _ in range(100):
            if engine.active_slots == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.active_slots == 0 and engine.queue_depth == 0
        await engine.stop()
        return tasks

    tasks = run(scenario())
    assert any(task.cancelled() for task in tasks)


def test_a_result_that_arrives_after_cancellation_is_dropped(tiny_captioner):
    async def scenario():
        engine = create_engine(tiny_captioner, settings())
        await engine.start()
        task = asyncio.create_task(engine.submit(images(1)[0], DecodeOptions(max_length=1)))
        await asyncio.sleep(0)  # submitted
        time.sleep(0.5)  # hold the event loop while the engine finishes and posts the result
        task.cancel()  # ... so the result arrives for a future that is already cancelled
        with pytest.raises(asyncio.CancelledError):
            await task
        await engine.stop()

    run(scenario())  # fails if the delivery raised InvalidStateError in a loop callback


def test_a_failing_batch_fails_only_its_own_requests(tiny_captioner):
    controlled = ControlledCaptioner(tiny_captioner)
    poisoned = np.full((32, 32, 3), 7, np.uint8)

    async def scenario():
        engine = await started_engine(controlled, settings())
        controlled.poisoned_pixel = 7
        with pytest.raises(InferenceError):
            await engine.submit(poisoned, DecodeOptions())
        assert (await engine.submit(images(1)[0], DecodeOptions())).captions
        controlled.failing_steps = 1
        with pytest.raises(InferenceError):
            await engine.submit(images(1)[0], DecodeOptions())
        results = await asyncio.gather(*(engine.submit(p, DecodeOptions()) for p in images(5, seed=4)))
        assert engine.active_slots == 0
        await engine.stop()
        return results

    assert all(result.captions for result in run(scenario()))


def test_shutdown_finishes_in_flight_requests_and_refuses_new_ones(tiny_captioner):
    async def scenario():
        engine = create_engine(tiny_captioner, settings())
        await engine.start()
        in_flight = [asyncio.create_task(engine.submit(p, DecodeOptions(max_length=8))) for p in images(6)]
        await asyncio.sleep(0)  # submitted
        stopping = asyncio.create_task(engine.stop(grace_s=10))
        await asyncio.sleep(0)
        assert not engine.ready
        with pytest.raises(EngineStopped):
            await engine.submit(images(1)[0], DecodeOptions())
        results = await asyncio.gather(*in_flight)
        await stopping
        return results

    assert all(result.captions for result in run(scenario()))


def test_shutdown_fails_what_is_left_when_the_grace_period_ends(tiny_captioner):
    controlled = ControlledCaptioner(tiny_captioner)

    async def scenario():
        engine = await started_engine(controlled, settings())
        controlled.gate.clear()
        stuck = asyncio.create_task(engine.submit(images(1)[0], DecodeOptions()))
        await asyncio.to_thread(controlled.encode_entered.wait, 5)
        queued = asyncio.create_task(engine.submit(images(1, seed=1)[0], DecodeOptions()))
        await asyncio.sleep(0.01)
        stopping = asyncio.create_task(engine.stop(grace_s=0.1))
        await asyncio.sleep(0.3)
        controlled.gate.set()  # the stuck encode returns after the grace period
        await asyncio.wait_for(stopping, 10)
        outcomes = await asyncio.gather(stuck, queued, return_exceptions=True)
        assert all(isinstance(outcome, EngineStopped) for outcome in outcomes), outcomes

    run(scenario())


def thread_cpu_seconds(name_prefix: str) -> float:
    """CPU time of this process's thread whose Python name starts with name_prefix (Linux)."""
    (thread,) = [t for t in threading.enumerate() if t.name.startswith(name_prefix)]
    fields = Path(f"/proc/self/task/{thread.native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads per-thread CPU time from /proc")
def test_the_encoder_sleeps_while_every_feature_slot_is_taken(tiny_captioner):
    """With the decoder stuck and all MAX_ROWS feature slots holding encoded requests, the encoder
    must wait for a slot to be freed, not spin on the non-empty queue."""
    controlled = ControlledCaptioner(tiny_captioner)

    async def scenario():
        engine = await started_engine(controlled, settings(max_queue_size=2 * MAX_ROWS))
        controlled.step_gate.clear()
        tasks = [
            asyncio.create_task(engine.submit(p, DecodeOptions(max_length=2))) for p in images(MAX_ROWS + 8, seed=6)
        ]
        for _ in range(500):  # until the encoder has filled every slot
            await asyncio.sleep(0.01)
            if len(engine.runner.free_slots) == 0 and engine.queue_depth == 8:
                break
        assert len(engine.runner.free_slots) == 0 and engine.queue_depth == 8
        # The queue-depth gauge (what the HPA scales on) counts the encoded requests waiting for a
        # decode slot too, not only the 8 still queued.
        assert engine.core.waiting() == MAX_ROWS + 8 - engine.core.slots.used > 8
        before = thread_cpu_seconds("inference-encoder")
        await asyncio.sleep(0.5)
        spent = thread_cpu_seconds("inference-encoder") - before
        controlled.step_gate.set()
        results = await asyncio.gather(*tasks)
        await engine.stop()
        return spent, results

    spent, results = run(scenario())
    assert spent < 0.05, f"the encoder thread used {spent:.2f} s of CPU in 0.5 s while it had nothing to do"
    assert len(results) == MAX_ROWS + 8 and all(r.captions for r in results)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux behaviour")
def test_the_model_threads_run_below_the_event_loop(tiny_captioner):
    controlled = ControlledCaptioner(tiny_captioner)
    seen = {}
    before_encode = controlled.before_encode

    def recording_encode(images):
        seen["inference"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        before_encode(images)

    controlled.before_encode = recording_encode

    async def scenario():
        seen["before"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        engine = await started_engine(controlled, settings(inference_nice=seen["before"] + 1))
        await engine.submit(images(1)[0], DecodeOptions(max_length=2))
        seen["event loop"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        await engine.stop()

    run(scenario())
    assert seen["inference"] == seen["before"] + 1 and seen["event loop"] == seen["before"]


def test_submit_checks_the_image_and_options(tiny_captioner):
    async def scenario():
        engine = create_engine(tiny_captioner, settings())
        with pytest.raises(EngineStopped):  # not started
            await engine.submit(images(1)[0], DecodeOptions())
        await engine.start()
        with pytest.raises(ValueError):
            await engine.submit(np.zeros((8, 8, 3), np.uint8), DecodeOptions())
        with pytest.raises(ValueError):
            await engine.submit(images(1)[0], DecodeOptions(strategy="greedy", num_captions=2))
        await engine.stop()

    run(scenario())


def test_the_compiling_gauge_is_up_from_before_readiness_until_the_background_compilation_ends(tiny_captioner):
    """Benchmarks and operators wait on captioning_engine_programs_compiling to tell a warm engine
    from one that still compiles its multi-step programs (and serves one token per call meanwhile)."""
    from app import metrics
    from app.engine.runner import ModelRunner

    def compiling() -> float:
        return metrics.REGISTRY.get_sample_value("captioning_engine_programs_compiling")

    for outcome in ("done", "failed", "cancelled"):
        runner = ModelRunner(tiny_captioner, greedy_steps=4)
        release = threading.Event()

        def compile_bucket(rows, steps, outcome=outcome, release=release):
            release.wait(10)
            if outcome == "failed":
                raise RuntimeError("compilation failed")

        runner.features.warmup = lambda greedy_steps=None: None
        runner.features.trace_greedy = lambda steps: None
        runner.features.warmup_greedy = compile_bucket
        before = compiling()
        runner.warmup()
        assert compiling() == before + 1, outcome  # already up when warmup() returns: readiness comes after
        if outcome == "cancelled":
            runner.cancel_warmup()
        release.set()
        runner.warmup_thread.join(10)
        assert compiling() == before, outcome
        assert (runner.greedy_buckets == set(runner.features.buckets())) == (outcome == "done"), outcome


def test_the_engine_gauges_add_up_every_running_engine(tiny_captioner):
    """Two versions run side by side during a swap: the queue-depth and active-slot gauges (what
    the autoscaler and dashboards read) are their sum, not whichever engine wrote last."""
    from app.metrics import REGISTRY

    def gauges() -> tuple[float, float]:
        return tuple(REGISTRY.get_sample_value(f"captioning_engine_{name}") for name in ("queue_depth", "active_slots"))

    controlled = [ControlledCaptioner(tiny_captioner), ControlledCaptioner(tiny_captioner)]

    async def scenario():
        before = gauges()
        engines = [await started_engine(c, settings()) for c in controlled]
        for c in controlled:
            c.step_gate.clear()
        tasks = [
            asyncio.create_task(engine.submit(p, DecodeOptions(max_length=2)))
            for engine, count in zip(engines, (3, 5))
            for p in images(count, seed=count)
        ]
        for _ in range(500):  # until every request is placed in its engine's rows
            await asyncio.sleep(0.01)
            if [e.core.slots.used for e in engines] == [3, 5]:
                break
        held = gauges()
        for c in controlled:
            c.step_gate.set()
        await asyncio.gather(*tasks)
        for engine in engines:
            await engine.stop()
        return before, held, gauges()

    before, held, after = run(scenario())
    assert held == (before[0], before[1] + 8)
    assert after == before


def test_requests_encoded_ahead_count_as_the_engine_being_behind_at_the_door(tiny_captioner):
    """Continuous mode: with the decoder busy, requests the encoder already took out of the queue
    still wait for a row, so uploads being read count against the room left (else they are let
    in, read, and refused by submit())."""
    controlled = ControlledCaptioner(tiny_captioner)

    async def scenario():
        engine = await started_engine(controlled, settings(max_queue_size=4))
        controlled.step_gate.clear()
        decoding = asyncio.create_task(engine.submit(images(1)[0], DecodeOptions(max_length=2)))
        for _ in range(500):
            await asyncio.sleep(0.01)
            if engine.core.slots.used:
                break
        waiting = [asyncio.create_task(engine.submit(p, DecodeOptions(max_length=2))) for p in images(2, seed=4)]
        for _ in range(500):  # both encoded, out of the queue, waiting for the stuck decoder
            await asyncio.sleep(0.01)
            if len(engine.core.encoder.encoded) == 2:
                break
        assert engine.queue_depth == 0 and engine.core.waiting() == 2 and engine.core.behind()
        engine.check_admission(arriving=1)  # room for one more upload
        with pytest.raises(Overloaded):
            engine.check_admission(arriving=2)
        controlled.step_gate.set()
        results = await asyncio.gather(decoding, *waiting)
        assert not engine.core.behind()
        engine.check_admission(arriving=10)  # caught up: uploads being read do not count
        await engine.stop()
        return results

    assert all(result.captions for result in run(scenario()))
