"""What one shopper, or one hostile file, may cost the others.

- :class:`DecodePool`: photos are decoded on threads of their own, never on the event loop's
  default executor, which the database, album files and model loading share. A picture that is
  slow to decode then delays only other decodes, the wait for a thread is bounded (a full pool
  answers "busy" at once), and the decoder itself refuses files whose cost the header does not
  show (:func:`ffengine.images.load_image`).
- :class:`UserRate`: a token bucket per user, so one account sending hundreds of photos is
  told to slow down before anything is downloaded.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from ffengine.images import load_image


class DecodeBusy(Exception):
    """Every decode thread is taken and ``max_waiting`` pictures already wait for one."""


class DecodePool:
    """``await pool.decode(data, max_bytes)``: :func:`~ffengine.images.load_image` on one of ``threads``
    threads; at most ``max_waiting`` more pictures wait for one, further ones get :class:`DecodeBusy`."""

    def __init__(self, threads: int, max_waiting: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ff-decode")
        self._slots = threads + max_waiting
        self.pending = 0

    async def decode(self, data: bytes, max_bytes: int) -> Image.Image:
        if self.pending >= self._slots:
            raise DecodeBusy
        self.pending += 1
        try:
            decode = functools.partial(load_image, data, max_bytes=max_bytes)
            return await asyncio.get_running_loop().run_in_executor(self._executor, decode)
        finally:
            self.pending -= 1

    async def close(self) -> None:
        """Wait for the decodes under way (their searches are still being answered)."""
        await asyncio.to_thread(self._executor.shutdown, wait=True)


class UserRate:
    """A token bucket per user: ``burst`` searches at once, refilled at ``per_minute``.

    Bounded: the least recently seen users are forgotten past ``max_users`` (a forgotten user
    starts again with a full bucket, which only ever errs towards answering).
    """

    def __init__(self, per_minute: float, burst: int, max_users: int = 65_536) -> None:
        self.rate, self.burst, self.max_users = per_minute / 60.0, float(burst), max_users
        self._buckets: OrderedDict[int, tuple[float, float]] = OrderedDict()  # user -> (tokens, when)

    def wait_s(self, user_id: int, now: float | None = None) -> float:
        """0 and one search taken when ``user_id`` may search now, else the seconds until they may."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, then = self._buckets.pop(user_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate
        self._buckets[user_id] = (tokens - 1.0 if wait == 0.0 else tokens, now)
        while len(self._buckets) > self.max_users:
            self._buckets.popitem(last=False)
        return wait
