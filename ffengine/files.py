"""Files and directories written all or nothing, and their checksums: the one way every module persists data.

A file goes to a uniquely named temp file in its folder, renamed over the target (:func:`write_atomic`);
a directory (an index) is filled as a sibling temp directory and swapped in (:func:`replace_dir`). A
reader sees the old one or the whole new one, and two writers never share a temp file.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

#: A ``<dir>.tmp-*`` directory untouched for this long is a crashed write's leftover (seconds).
STALE_TMP_SECONDS = 3600


def write_atomic(path: Path, content: bytes | Callable[[BinaryIO], object], *, durable: bool = False) -> None:
    """Create or replace ``path`` with ``content`` (bytes, or a function that writes to a file object).

    ``durable`` also flushes the file and its folder to the disk before returning, for what must
    survive a power cut once reported written (an index, a model); caches skip it, as a lost entry is
    only recomputed. Raises ``OSError`` when the disk refuses; no temp file is left behind then.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name[:16]}-{secrets.token_hex(6)}.tmp")  # unlike mkstemp's, its mode follows the umask
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to the disk; a no-op where folders cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes, read in blocks (a gigabyte file is never held in memory at once)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_tmp(out: Path, min_age_s: float = STALE_TMP_SECONDS) -> list[Path]:
    """Delete ``<out>.tmp-*`` directories that crashed writes left behind; returns what went.

    Only those untouched for ``min_age_s``: a write in progress (another process) is younger,
    since the features are computed before its directory is created.
    """
    removed = []
    now = time.time()
    for leftover in out.parent.glob(f"{glob.escape(out.name)}.tmp-*"):
        try:
            if leftover.is_dir() and not leftover.is_symlink() and now - leftover.stat().st_mtime > min_age_s:
                shutil.rmtree(leftover)
                removed.append(leftover)
        except OSError as exc:  # gone already, or not ours to delete: leave it
            log.debug("cannot remove %s: %s", leftover, exc)
    if removed:
        log.info("removed %d leftover(s) of interrupted writes next to %s", len(removed), out)
    return removed


def replace_dir(out: Path, fill: Callable[[Path], None]) -> None:
    """Let ``fill`` write a sibling temp directory, then swap it in for ``out`` (:func:`swap_in`): a failure
    or a crash leaves ``out`` as it was. Crashed writes' leftovers are cleared afterwards."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove_stale_tmp(out)


def old_path(out: Path) -> Path:
    """Where :func:`swap_in` keeps the previous index while the new one moves in."""
    return out.with_name(out.name + ".old")


def swap_in(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp``: ``out -> out.old``, ``tmp -> out``, then drop ``out.old``.

    A crash between the two renames leaves ``out.old`` complete; a reader may fall back to it
    (:func:`ffengine.index.load_index` does).
    A leftover ``out.old`` is only deleted while a live ``out`` exists: when a crash left ``out.old``
    alone, it is the last good copy and stays until the new index is in place.
    """
    old = old_path(out)
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)
