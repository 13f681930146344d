"""Embed photos that arrive together in one batch, off the event loop.

Handlers ``await batcher.search(image)``; a single loop task takes what is waiting in a
bounded queue (up to ``max_batch`` pictures, or whatever arrived within ``max_wait_s``
of the first), runs one ``embedder.embed`` + index search in a dedicated model thread,
and resolves each caller's future. One thread means one forward pass at a time (the
embedder is serialised anyway) while the queue fills up for the next batch - which is
what makes a GPU pay. A full queue refuses new work at once (:class:`QueueFull`) instead
of letting latency grow without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Too many photos are waiting; the caller should ask the user to retry later."""


class SearchModel(Protocol):
    """What the batcher needs from the active model (see :class:`bot.models.ActiveModel`)."""

    def search_batch(self, images: Sequence[Image.Image], k: int) -> tuple[np.ndarray, list[list]]: ...


M = TypeVar("M", bound=SearchModel)


@dataclass(frozen=True)
class SearchResult(Generic[M]):
    """One picture's answer, with the model that produced it (so the log names the right version)."""

    model: M
    features: np.ndarray
    recommendations: list
    batch_size: int
    model_ms: float


@dataclass
class _Job:
    image: Image.Image
    future: asyncio.Future


class SearchBatcher(Generic[M]):
    """Bounded queue + batching loop around the *current* model (read at each batch)."""

    def __init__(
        self,
        current_model: Callable[[], M],
        *,
        max_queue: int = 64,
        max_batch: int = 16,
        max_wait_s: float = 0.01,
        k: int = 5,
    ) -> None:
        self._current_model = current_model
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=max_queue)
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.k = k
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ff-model")
        self._task: asyncio.Task | None = None
        self._busy = 0
        self.batches = 0
        self.searched = 0
        self.model_seconds = 0.0  # time the model thread spent on batches (utilisation = its growth / wall time)

    @property
    def depth(self) -> int:
        """Pictures waiting plus pictures being embedded right now."""
        return self._queue.qsize() + self._busy

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="ff-search-batcher")

    async def search(self, image: Image.Image) -> SearchResult[M]:
        """Queue ``image``; raises :class:`QueueFull` at once when the queue is full."""
        if self._task is None or self._task.done():
            raise RuntimeError("the search batcher is not running")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Job(image, future))
        except asyncio.QueueFull:
            raise QueueFull from None
        return await future

    async def close(self) -> None:
        """Finish everything queued (graceful shutdown), then stop the loop and the thread."""
        if self._task is not None:
            await self._queue.join()
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._executor.shutdown(wait=True)

    async def _collect(self) -> list[_Job]:
        """The first waiting job plus whatever else arrives within ``max_wait_s`` (at most ``max_batch``)."""
        jobs = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait_s
        while True:
            while len(jobs) < self.max_batch and not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            remaining = deadline - time.monotonic()
            if len(jobs) >= self.max_batch or remaining <= 0:
                return jobs
            await asyncio.sleep(min(0.002, remaining))  # polling, not wait_for: no job can be lost

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            self._busy = len(jobs)
            try:
                live = [j for j in jobs if not j.future.done()]  # a caller may have given up
                if live:
                    await self._run_batch(loop, live)
            finally:
                self._busy = 0
                for _ in jobs:
                    self._queue.task_done()

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job]) -> None:
        model = self._current_model()
        images = [j.image for j in jobs]
        start = time.perf_counter()
        try:
            features, recommendations = await loop.run_in_executor(self._executor, model.search_batch, images, self.k)
        except Exception as exc:  # every waiting caller gets the failure, the loop lives on
            log.exception("search batch of %d failed", len(jobs))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        model_ms = (time.perf_counter() - start) * 1000
        self.model_seconds += model_ms / 1000
        self.batches += 1
        self.searched += len(jobs)
        for i, job in enumerate(jobs):
            if not job.future.done():
                job.future.set_result(SearchResult(model, features[i], recommendations[i], len(jobs), model_ms))
