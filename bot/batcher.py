"""Embed photos that arrive together in one batch, off the event loop.

Handlers ``await batcher.search(image)``; a single loop task takes what is waiting in a
bounded queue (up to ``max_batch`` pictures, or whatever arrived within ``max_wait_s``
of the first), runs one ``answer_photos`` (embed + index search) in a dedicated model
thread, and resolves each caller's future. One thread means one forward pass at a time
(the embedder is serialised anyway) while the queue fills up for the next batch - which is
what makes a GPU pay. Other model work (searching one item of a photo, "more like this")
waits in the same queue (``await batcher.run(fn)``) and runs on the same thread, one call
at a time. A full queue refuses new work at once (:class:`QueueFull`) instead of letting
latency grow without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """Too many photos are waiting; the caller should ask the user to retry later."""


class PhotoAnswerLike(Protocol):
    """One photo's answer (:class:`ffengine.recommend.PhotoAnswer`)."""

    @property
    def features(self) -> np.ndarray: ...
    @property
    def recommendations(self) -> list: ...
    @property
    def items(self) -> list: ...


class SearchModel(Protocol):
    """What the batcher needs from the active model (see :class:`bot.models.ActiveModel`)."""

    def answer_photos(self, images: Sequence[Image.Image], k: int) -> Sequence[PhotoAnswerLike]: ...


M = TypeVar("M", bound=SearchModel)
T = TypeVar("T")


@dataclass(frozen=True)
class SearchResult(Generic[M]):
    """One picture's answer, with the model that produced it (so the log names the right version)."""

    model: M
    features: np.ndarray
    recommendations: list
    items: list  # the garments seen in the photo, most probable first
    batch_size: int
    model_ms: float


@dataclass
class _Job:
    future: asyncio.Future
    image: Image.Image | None = None  # a photo to search, batched with the others
    call: Callable[[Any], Any] | None = None  # or other work, run alone


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
        return await self._queue_job(image=image)

    async def run(self, fn: Callable[[M], T]) -> tuple[M, T]:
        """``fn(model)`` on the model thread, in turn with the photos; returns the model it was
        given with its result (so the log names the right version). :class:`QueueFull` at once
        when the queue is full; ``fn``'s exception is raised here."""
        return await self._queue_job(call=fn)

    async def _queue_job(self, **work: Any) -> Any:
        if self._task is None or self._task.done():
            raise RuntimeError("the search batcher is not running")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Job(future, **work))
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
                photos = [j for j in live if j.call is None]
                if photos:
                    await self._run_batch(loop, photos)
                for job in live:
                    if job.call is not None:
                        await self._run_call(loop, job)
            finally:
                self._busy = 0
                for _ in jobs:
                    self._queue.task_done()

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job]) -> None:
        model = self._current_model()
        images = [j.image for j in jobs]
        start = time.perf_counter()
        try:
            answers = await loop.run_in_executor(self._executor, model.answer_photos, images, self.k)
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
        for job, a in zip(jobs, answers, strict=True):
            if not job.future.done():
                job.future.set_result(SearchResult(model, a.features, a.recommendations, a.items, len(jobs), model_ms))

    async def _run_call(self, loop: asyncio.AbstractEventLoop, job: _Job) -> None:
        model = self._current_model()
        start = time.perf_counter()
        try:
            result = await loop.run_in_executor(self._executor, job.call, model)  # type: ignore[arg-type]
        except Exception as exc:  # the caller decides what a failure means (an expired product...)
            if not job.future.done():
                job.future.set_exception(exc)
            return
        finally:
            self.model_seconds += time.perf_counter() - start
        if not job.future.done():
            job.future.set_result((model, result))
