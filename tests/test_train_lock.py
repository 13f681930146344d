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
