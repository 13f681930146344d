"""The search batcher: batches what waits, never blocks the loop, bounded, drains on close."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

from bot.batcher import QueueFull, SearchBatcher


class SlowModel:
    """Answers each picture with its width; records batch sizes and the thread it ran on."""

    def __init__(self, name: str = "m1", delay: float = 0.05, fail: bool = False) -> None:
        self.name, self.delay, self.fail = name, delay, fail
        self.batches: list[int] = []
        self.threads: set[int] = set()
        self.release = threading.Event()
        self.release.set()

    def answer_photos(self, images, k):
        self.release.wait(5)
        self.threads.add(threading.get_ident())
        self.batches.append(len(images))
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("model exploded")
        return [Answer(np.array([img.width], dtype=np.float32), [f"{self.name}:{img.width}"] * k, [img.height]) for img in images]


@dataclass(frozen=True)
class Answer:
    features: np.ndarray
    recommendations: list
    items: list


def img(n: int) -> Image.Image:
    return Image.new("RGB", (n, 4))


async def test_concurrent_searches_share_batches_and_get_their_own_answer() -> None:
    model = SlowModel()
    model.release.clear()  # hold the first batch so that the rest queue up behind it
    batcher = SearchBatcher(lambda: model, max_batch=8, max_wait_s=0.005, k=2)
    batcher.start()
    tasks = [asyncio.create_task(batcher.search(img(n))) for n in range(1, 21)]
    await asyncio.sleep(0.05)
    model.release.set()
    results = await asyncio.gather(*tasks)
    await batcher.close()
    assert [r.features[0] for r in results] == list(range(1, 21))
    assert [r.recommendations for r in results] == [[f"m1:{n}"] * 2 for n in range(1, 21)]
    assert sum(model.batches) == 20 and max(model.batches) == 8 and len(model.batches) <= 4
    assert threading.get_ident() not in model.threads


async def test_event_loop_keeps_running_during_model_work() -> None:
    model = SlowModel(delay=0.4)
    batcher = SearchBatcher(lambda: model)
    batcher.start()
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    await batcher.search(img(3))
    ticker.cancel()
    await batcher.close()
    assert ticks >= 20  # ~40 possible in 0.4 s; a blocked loop would give 0 or 1


async def test_full_queue_refuses_at_once() -> None:
    model = SlowModel()
    model.release.clear()
    batcher = SearchBatcher(lambda: model, max_queue=3, max_batch=1, max_wait_s=0)
    batcher.start()
    first = asyncio.create_task(batcher.search(img(1)))
    await asyncio.sleep(0.05)  # the model thread now holds job 1; the queue is empty
    waiting = [asyncio.create_task(batcher.search(img(n))) for n in (2, 3, 4)]
    await asyncio.sleep(0.01)
    assert batcher.depth == 4
    with pytest.raises(QueueFull):
        await batcher.search(img(5))
    model.release.set()
    assert [r.features[0] for r in await asyncio.gather(first, *waiting)] == [1, 2, 3, 4]
    await batcher.close()


async def test_failed_batch_fails_its_callers_and_the_loop_lives_on() -> None:
    bad, good = SlowModel(fail=True), SlowModel("m2")
    current = [bad]
    batcher = SearchBatcher(lambda: current[0], max_batch=4)
    batcher.start()
    results = await asyncio.gather(*(batcher.search(img(n)) for n in (1, 2)), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results)
    current[0] = good  # a model switch: the next batch uses the new one and says so
    result = await batcher.search(img(7))
    assert result.model is good and result.recommendations[0] == "m2:7"
    await batcher.close()


async def test_close_finishes_what_is_queued() -> None:
    model = SlowModel(delay=0.02)
    batcher = SearchBatcher(lambda: model, max_batch=2, max_wait_s=0)
    batcher.start()
    tasks = [asyncio.create_task(batcher.search(img(n))) for n in range(1, 8)]
    await asyncio.sleep(0)  # all queued
    await batcher.close()
    assert all(t.done() and not t.exception() for t in tasks)
    assert sum(model.batches) == 7
    with pytest.raises(RuntimeError, match="not running"):
        await batcher.search(img(1))


async def test_a_caller_that_gave_up_is_skipped() -> None:
    model = SlowModel()
    model.release.clear()
    batcher = SearchBatcher(lambda: model, max_batch=1, max_wait_s=0)
    batcher.start()
    first = asyncio.create_task(batcher.search(img(1)))
    await asyncio.sleep(0.02)
    gone = asyncio.create_task(batcher.search(img(2)))
    await asyncio.sleep(0.01)
    gone.cancel()
    model.release.set()
    await first
    await batcher.close()
    assert model.batches == [1]  # picture 2 was never embedded


async def test_other_model_work_waits_its_turn_on_the_model_thread() -> None:
    """An item search or "more like this" queues with the photos, runs alone on the same thread,
    and comes back with the model that ran it."""
    model = SlowModel()
    model.release.clear()
    batcher = SearchBatcher(lambda: model, max_queue=1, max_batch=8, max_wait_s=0.005)
    batcher.start()
    photo = asyncio.create_task(batcher.search(img(1)))
    await asyncio.sleep(0.05)  # the model thread holds the photo; the queue is empty
    order: list[str] = []
    call = asyncio.create_task(batcher.run(lambda m: order.append(m.name) or threading.get_ident()))
    await asyncio.sleep(0.01)
    assert batcher.depth == 2 and not call.done()
    with pytest.raises(QueueFull):
        await batcher.run(lambda m: None)
    model.release.set()
    ran_on, result = await call, await photo
    assert ran_on[0] is model and ran_on[1] in model.threads and order == ["m1"]
    assert result.items == [4]

    def expired(m: SlowModel) -> None:
        raise KeyError("gone")

    with pytest.raises(KeyError, match="gone"):
        await batcher.run(expired)
    assert (await batcher.search(img(9))).features[0] == 9  # the loop lives on
    await batcher.close()
