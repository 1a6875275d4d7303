"""app.engine.client_share: each client's places, the images waiting for one, and the door."""

from __future__ import annotations

import asyncio
import random

import pytest

from app.engine.client_share import ClientShares


def test_places_pass_to_the_clients_waiting_images_in_order_and_only_then_to_the_door():
    async def scenario():
        shares = ClientShares(2)
        await shares.take("a", 1)
        await shares.take("a", 1)
        assert not shares.has_room("a") and shares.has_room("b")
        order = []

        async def image(name):
            await shares.take("a", 5)
            order.append(name)

        waiting = [asyncio.create_task(image(n)) for n in ("first", "second")]
        await asyncio.sleep(0.01)
        door = asyncio.create_task(shares.wait_for_room("a", 5))
        await asyncio.sleep(0.01)
        shares.give_back("a")
        await asyncio.sleep(0.01)
        assert order == ["first"] and shares.held("a") == 2 and not door.done()
        shares.give_back("a")
        await asyncio.sleep(0.01)
        assert order == ["first", "second"] and not door.done()
        await asyncio.gather(*waiting)
        shares.give_back("a")  # nobody waits for a place now: the door gets the room
        assert await door is True and shares.held("a") == 1
        shares.give_back("a")
        assert shares.held("a") == 0

    asyncio.run(scenario())


def test_the_door_refuses_after_its_timeout_and_anyone_without_an_address_is_not_limited():
    async def scenario():
        shares = ClientShares(1)
        await shares.take("a", 1)
        with pytest.raises(TimeoutError):
            await shares.wait_for_room("a", 0.05)
        for _ in range(5):
            await shares.take("", 1)  # no address: no count, no wait
        assert await shares.wait_for_room("", 0) is False and shares.held("") == 0
        assert await ClientShares(None).wait_for_room("a", 0) is False

    asyncio.run(scenario())


def test_a_wait_for_a_place_ends_when_its_engine_stops_and_leaves_nothing_behind():
    async def scenario():
        shares = ClientShares(1)
        await shares.take("a", 1)
        stopped = asyncio.get_running_loop().create_future()
        waiting = asyncio.create_task(shares.take("a", 30, until=stopped))
        await asyncio.sleep(0.01)
        assert not shares.has_room("a")
        stopped.set_result(None)
        with pytest.raises(TimeoutError):
            await waiting
        return shares.held("a"), shares.has_room("a"), shares._takers

    assert asyncio.run(scenario()) == (1, False, {})  # the holder's place stays until given back


def test_an_image_cancelled_as_it_is_handed_a_place_is_cancelled_and_passes_the_place_on():
    """The client leaves in the same loop turn as its image gets a place: take() must raise the
    cancel (asyncio.wait_for on Python 3.11 returned the result instead and the image went on)."""

    async def scenario():
        shares = ClientShares(1)
        await shares.take("a", 1)
        leaving = asyncio.create_task(shares.take("a", 5))
        await asyncio.sleep(0.01)
        shares.give_back("a")  # handed to the waiting image...
        leaving.cancel()  # ...which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await leaving
        return shares.held("a")

    assert asyncio.run(scenario()) == 0


@pytest.mark.parametrize("seed", range(40))
def test_random_takes_timeouts_cancellations_and_give_backs_never_lose_or_overrun_a_place(seed):
    """Each take() that returns holds one place until its give_back(); none beyond the limit, and
    every place comes back, whatever gives up when (a place handed to an image that is timing out
    or being cancelled at that moment is passed on)."""
    rng = random.Random(seed)

    async def scenario():
        shares = ClientShares(2)
        holding = {"a": 0, "b": 0}
        peak = {"a": 0, "b": 0}

        async def image(client):
            try:
                await shares.take(client, rng.choice([0.0, 0.002, 0.01, 1.0]))
            except TimeoutError:
                return
            holding[client] += 1
            peak[client] = max(peak[client], holding[client])
            try:
                await asyncio.sleep(rng.choice([0, 0.001, 0.003]))
            finally:  # as the engine gives a place back when a request's future is done, however
                holding[client] -= 1
                shares.give_back(client)

        tasks = []
        for _ in range(60):
            tasks.append(asyncio.create_task(image(rng.choice("ab"))))
            if rng.random() < 0.3:
                rng.choice(tasks).cancel()
            await asyncio.sleep(rng.choice([0, 0, 0.001]))
        await asyncio.gather(*tasks, return_exceptions=True)
        return shares, peak

    shares, peak = asyncio.run(scenario())
    assert max(peak.values()) <= 2
    assert shares.held("a") == shares.held("b") == 0 and shares.has_room("a") and shares.has_room("b")


def test_the_limit_is_the_share_of_the_queue_plus_a_batch_and_a_setting_that_covers_the_queue_is_named(caplog):
    assert ClientShares.for_queue(0.5, 256, 32).limit == 160  # the defaults
    assert ClientShares.for_queue(1.0, 256, 32).limit is None
    assert not caplog.records
    with caplog.at_level("WARNING", logger="app.engine"):
        assert ClientShares.for_queue(0.5, 64, 32).limit == 64
    assert "MAX_QUEUE_SIZE above MAX_BATCH_SIZE / (1 - CLIENT_QUEUE_SHARE)" in caplog.text


def test_the_images_waiting_for_a_place_are_a_gauge():
    from app import metrics

    def gauge():
        return metrics.REGISTRY.get_sample_value("captioning_engine_client_share_waiting")

    async def scenario():
        shares = ClientShares(1)
        before = gauge()
        await shares.take("a", 1)
        waiting = [asyncio.create_task(shares.take("a", 5)) for _ in range(2)]
        await asyncio.sleep(0.01)
        during = gauge()
        shares.give_back("a")
        shares.give_back("a")
        await asyncio.gather(*waiting)
        return before, during, gauge()

    before, during, after = asyncio.run(scenario())
    assert during == before + 2 and after == before
