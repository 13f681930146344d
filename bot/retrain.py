"""/retrain: one background retraining at a time, with progress in the admin's chat.

The training itself is ``train.feedback`` (the same code as ``python -m train feedback``):
its database calls run on the bot's loop, its numpy/torch work in worker threads, never on
the event loop. Its progress callback may be called from those threads and only hands the
latest line to the loop, which edits one status message at most every few seconds
(Telegram's flood limits). A promoted version is loaded through
:class:`~bot.models.ModelSwitch` (load first, then activate) and answers without a restart.

The status message is stored with the run (``train.runs.PROGRESS_MESSAGE``): if the bot is
killed mid-run, the next start closes the run and edits that message to say so
(:func:`report_interrupted`) instead of leaving it at its last step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from telegram import Message
from telegram.error import TelegramError
from telegram.ext import Application

from bot.config import BotSettings
from bot.formatting import format_metrics
from bot.models import ModelSwitch
from ffengine.db import Database, Superseded, TrainingRun
from ffengine.errors import FFError
from train.errors import TrainingLocked
from train.runs import PROGRESS_MESSAGE, TrainingResult

log = logging.getLogger(__name__)
EDIT_EVERY_S = 3.0
STARTED = "🏋️ Retraining from the logged feedback…"
ALREADY_RUNNING = "⏳ A retraining is already running; I'll report when it is done."
INTERRUPTED = "⏹ Retraining interrupted at {progress:.0%}: the bot stopped before it finished. Nothing was changed; send /retrain to try again."

Progress = Callable[[float, str], None]


class ProgressMessage:
    """The run's status message, edited to show the newest progress line at most every ``EDIT_EVERY_S``.

    :meth:`update` may be called from training threads; lines that come faster than the edits
    are skipped. :meth:`close` lets an edit in flight finish rather than cancelling it, so that
    it cannot reach Telegram after the final report.
    """

    def __init__(self, message: Message) -> None:
        self.message = message
        self._loop = asyncio.get_running_loop()
        self._latest = ""
        self._closed = asyncio.Event()
        self._task = self._loop.create_task(self._show())

    def update(self, fraction: float, text: str) -> None:
        """A :data:`Progress` callback, safe from any thread."""
        self._loop.call_soon_threadsafe(setattr, self, "_latest", f"🏋️ Retraining: {fraction:.0%} {text}".strip())

    async def close(self) -> None:
        self._closed.set()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _show(self) -> None:
        shown = ""
        while not await _set_within(self._closed, EDIT_EVERY_S):
            if self._latest != shown:
                shown = self._latest
                with contextlib.suppress(TelegramError):
                    await self.message.edit_text(shown)


async def _set_within(event: asyncio.Event, seconds: float) -> bool:
    """Whether ``event`` is set within ``seconds``."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
    return event.is_set()


TrainFn = Callable[[Database, BotSettings, Progress], Awaitable[TrainingResult]]
#: The metrics worth a line in the admin's chat (the rest is in ``metrics.json`` and /models).
SHOWN_METRICS = ("searches", "pairs", "holdout_pairwise_before", "holdout_pairwise_after", "precision5_before", "precision5_after")


async def retrain_from_feedback(db: Database, settings: BotSettings, progress: Progress) -> TrainingResult:
    """``train.feedback`` on the bot's loop (its numpy/torch work runs in worker threads).

    ``activate=False``: the bot activates a promoted version itself, after loading it.
    """
    from train.feedback import retrain_from_feedback_async

    return await retrain_from_feedback_async(db, settings.engine, progress=progress, activate=False)


class Retrainer:
    """Runs ``train`` as a background task; refuses a second concurrent run (in this process here;
    across processes and hosts ``train``'s lock refuses it, and the status message says so)."""

    def __init__(self, app: Application, db: Database, models: ModelSwitch, settings: BotSettings, train: TrainFn = retrain_from_feedback) -> None:
        self.app = app
        self.db = db
        self.models = models
        self.settings = settings
        self.train = train
        self._task: asyncio.Task | None = None
        self._starting = asyncio.Lock()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self, chat_id: int) -> bool:
        """Begin a retraining reported to ``chat_id``; False if one is already running.

        Returns once the run's status message is sent: a second /retrain's "already running"
        (which waits for the lock) cannot reach the admin before the run it refers to, and a
        status message that cannot be sent fails the command instead of a task nobody awaits.
        """
        async with self._starting:
            if self.running:
                return False
            status = await self.app.bot.send_message(chat_id, STARTED)
            self._task = asyncio.get_running_loop().create_task(self._run(chat_id, status), name="ff-retrain")
            return True

    async def stop(self) -> None:
        """Shutdown: interrupt a running retraining (``train/`` removes what it had written)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self, chat_id: int, status: Message) -> None:
        PROGRESS_MESSAGE.set({"chat_id": chat_id, "message_id": status.message_id})  # this task's context only
        progress = ProgressMessage(status)
        started = time.monotonic()
        text = "❌ Retraining stopped unexpectedly; see the log."  # a BaseException none of the below names
        try:
            text = await self._apply(await self.train(self.db, self.settings, progress.update))
        except asyncio.CancelledError:
            text = "⏹ Retraining interrupted: the bot is shutting down. Nothing was changed."
            raise
        except TrainingLocked as exc:  # a run on another replica (or the CLI) holds the lock
            text = f"⏳ Not started. {exc}"
        except FFError as exc:
            text = f"❌ Retraining failed: {exc}"
        except Exception as exc:
            log.exception("retraining failed")
            text = f"❌ Retraining failed ({type(exc).__name__}); see the log."
        finally:
            await asyncio.shield(self._report(progress, chat_id, f"{text}\n({time.monotonic() - started:.0f} s)"))

    async def _report(self, progress: ProgressMessage, chat_id: int, text: str) -> None:
        await progress.close()  # no progress edit may land after (and hide) the result
        try:
            await progress.message.edit_text(text)
        except TelegramError:
            with contextlib.suppress(TelegramError):
                await self.app.bot.send_message(chat_id, text)

    async def _apply(self, report: TrainingResult) -> str:
        shown = {k: report.metrics[k] for k in SHOWN_METRICS if k in report.metrics}
        details = f"\n{report.reason}" + (f"\nMetrics: {format_metrics(shown, limit=len(shown))}" if shown else "")
        if report.version is None:
            return f"ℹ️ No new model version.{details}"
        if not report.promoted:
            return f"ℹ️ Trained {report.version} but kept {self.models.current.name}.{details}"
        try:  # only over the version it was trained from: a rollback made meanwhile stands
            model = await self.models.activate(self.db, report.version, over_parent=True)
        except Superseded as exc:
            return f"ℹ️ Trained {report.version} but kept {self.models.current.name}: {exc}.{details}"
        return f"✅ Now answering with {model.name} ({len(model.index)} products).{details}"


async def report_interrupted(app: Application, runs: list[TrainingRun]) -> None:
    """Start-up: edit the status message of each run a killed bot left open (closed since) to say so."""
    for run in runs:
        where = run.progress_message or {}
        if "chat_id" not in where or "message_id" not in where:
            continue
        try:
            await app.bot.edit_message_text(INTERRUPTED.format(progress=run.progress), where["chat_id"], where["message_id"])
        except TelegramError as exc:  # deleted, or too old to edit: the run is closed all the same
            log.warning("could not mark training run %d interrupted in chat %s: %s", run.id, where["chat_id"], exc)
