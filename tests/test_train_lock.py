"""The training lock: one run at a time across processes; a holder that dies frees it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from train.errors import TrainingLocked
from train.lock import LOCK_NAME, read_holder, training_lock

REPO = Path(__file__).resolve().parents[1]


def hold_in_child(data_dir: Path) -> subprocess.Popen[bytes]:
    """A separate process that takes the lock, says so, and sleeps."""
    ready = data_dir / "child-ready"
    code = textwrap.dedent(
        f"""
        import pathlib, time
        from train.lock import training_lock
        with training_lock(pathlib.Path({str(data_dir)!r}), "finetune"):
            pathlib.Path({str(ready)!r}).write_text("ok")
            time.sleep(120)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    for _ in range(300):
        if ready.exists() or child.poll() is not None:
            break
        time.sleep(0.05)
    assert ready.exists(), "the child did not take the lock"
    return child


def test_a_second_run_in_the_same_process_is_refused(tmp_path: Path) -> None:
    with training_lock(tmp_path, "feedback") as stale:
        assert stale is None
        holder = read_holder(tmp_path / LOCK_NAME)
        assert holder is not None and holder.pid == os.getpid() and holder.kind == "feedback"
        with pytest.raises(TrainingLocked, match=f"a feedback run \\(pid {os.getpid()} "):
            with training_lock(tmp_path, "finetune"):
                pass
    with training_lock(tmp_path, "finetune") as stale:  # released on exit
        assert stale is None


def test_another_process_holding_the_lock_refuses_us_until_it_is_killed(tmp_path: Path) -> None:
    child = hold_in_child(tmp_path)
    try:
        with pytest.raises(TrainingLocked, match=f"pid {child.pid}"):
            with training_lock(tmp_path, "feedback"):
                pass
    finally:
        child.send_signal(signal.SIGKILL)  # no cleanup code runs
        child.wait()
    assert read_holder(tmp_path / LOCK_NAME).pid == child.pid  # type: ignore[union-attr]  # its note is still there...
    with training_lock(tmp_path, "feedback") as stale:  # ...but the lock died with it
        assert stale is not None and stale.pid == child.pid and stale.kind == "finetune"
        assert read_holder(tmp_path / LOCK_NAME).pid == os.getpid()  # type: ignore[union-attr]


def test_a_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": "here", "started": time.time() - 60, "kind": "feedback"}))
    with training_lock(tmp_path, "feedback") as stale:
        assert stale is not None and stale.pid == pid
    assert (tmp_path / LOCK_NAME).read_text() == ""  # a clean exit leaves an empty note


def test_garbage_in_the_lock_file_does_not_matter(tmp_path: Path) -> None:
    (tmp_path / LOCK_NAME).write_bytes(b"\x00\xffnot json")
    with training_lock(tmp_path, "feedback") as stale:
        assert stale is None


def test_the_lock_is_released_when_the_run_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with training_lock(tmp_path, "feedback"):
            raise RuntimeError("boom")
    with training_lock(tmp_path, "feedback"):
        pass


PG_URL = os.environ.get("FF_TEST_POSTGRES_URL", "")
PG_HOLDER = """
import asyncio, pathlib, sys
from ffengine.db import Database
from train.lock import run_lock

async def hold():
    db = await Database.open(sys.argv[1])
    async with run_lock(db, pathlib.Path(sys.argv[2]), "feedback"):
        pathlib.Path(sys.argv[2], "child-ready").write_text("ok")
        await asyncio.sleep(120)

asyncio.run(hold())
"""


@pytest.mark.skipif(not PG_URL, reason="set FF_TEST_POSTGRES_URL (bash .ci/start-postgres) to run")
async def test_on_postgresql_the_lock_is_the_databases_and_dies_with_its_holder(tmp_path: Path) -> None:
    """Two hosts share the database, not a lock file: another process (own data folder) is refused
    while the holder lives, and takes the lock once the holder is killed."""
    import asyncio

    from ffengine.db import Database
    from train.lock import run_lock

    holder_dir, my_dir = tmp_path / "host-a", tmp_path / "host-b"
    holder_dir.mkdir()
    child = subprocess.Popen([sys.executable, "-c", PG_HOLDER, PG_URL, str(holder_dir)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    db = await Database.open(PG_URL)
    try:
        for _ in range(600):
            if (holder_dir / "child-ready").exists() or child.poll() is not None:
                break
            await asyncio.sleep(0.05)
        assert (holder_dir / "child-ready").exists(), "the child did not take the lock"
        with pytest.raises(TrainingLocked, match="already running: another process"):
            async with run_lock(db, my_dir, "feedback"):
                pass
        child.send_signal(signal.SIGKILL)
        child.wait()
        for _ in range(100):  # the server notices the closed connection at once; allow it a moment
            try:
                async with run_lock(db, my_dir, "feedback") as stale:
                    assert stale is None
                break
            except TrainingLocked:
                await asyncio.sleep(0.05)
        else:
            pytest.fail("the lock outlived its killed holder")
        assert not (my_dir / LOCK_NAME).exists()  # no file lock on PostgreSQL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        await db.close()
