"""Handlers' background tasks: drained at shutdown (including tasks they start), a stuck one cancelled."""

from __future__ import annotations

import asyncio

import pytest

from bot.context import BackgroundTasks


async def test_drain_waits_for_tasks_and_the_tasks_they_start() -> None:
    tasks, done = BackgroundTasks(), []

    async def write(name: str, then: str | None = None) -> None:
        await asyncio.sleep(0.05)
        done.append(name)
        if then:
            tasks.spawn(write(then))

    tasks.spawn(write("a", then="b"))
    tasks.spawn(write("c"))
    await tasks.drain(timeout=5)
    assert sorted(done) == ["a", "b", "c"]


async def test_drain_cancels_a_stuck_task_and_a_failure_is_only_logged(caplog: pytest.LogCaptureFixture) -> None:
    tasks = BackgroundTasks()

    async def fail() -> None:
        raise RuntimeError("disk full")

    stuck = tasks.spawn(asyncio.sleep(60))
    tasks.spawn(fail())
    await asyncio.wait_for(tasks.drain(timeout=0.2), 5)
    assert stuck.cancelled()
    assert any("background task" in r.getMessage() and r.exc_info and "disk full" in str(r.exc_info[1]) for r in caplog.records)
    assert any("cancelling 1 background task" in r.getMessage() for r in caplog.records)
