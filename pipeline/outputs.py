"""Write safely: atomic files, disk-full errors in one line, one run per slide output folder.

* :func:`atomic_path` yields a hidden temporary name beside the target and renames it over the
  target only when the block succeeds; on any error the temporary file is removed, so a run
  never leaves a half-written PNG, JSON or GeoJSON (what Snakemake's atomic outputs promise).
* :func:`disk_errors` turns "no space left" / "quota exceeded" into one :class:`OutputError`
  line naming the path; rerunning after freeing space resumes where the run stopped.
* :func:`slide_lock` holds an exclusive ``flock`` on ``<slide folder>/.gmrpath.<stage>.lock``
  while a stage (``tissue``, ``classify``, ``segment``) writes a slide's outputs. A second run of
  the same stage on the same slide and output folder stops at once with one line naming the
  holder (pid, host, command, start time); different stages write different files, so classify
  and segment of one slide can run at once (they share the tissue mask, whose short stage makes a
  second run wait instead). The kernel drops the lock when its process ends, killed or not, so a
  stale lock never blocks a rerun.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> with atomic_path(d / "a.json") as tmp:
    ...     _ = tmp.write_text("{}")
    >>> sorted(p.name for p in d.iterdir())
    ['a.json']
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

__all__ = ["OutputError", "atomic_path", "disk_errors", "slide_lock", "lock_name", "STAGES"]

STAGES = ("tissue", "classify", "segment")
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_held: set[str] = set()  # locks this process holds: re-entrant within one process


class OutputError(ValueError):
    """The output folder cannot be written (missing permission, disk full, another run)."""


def _full_message(path: Path, err: OSError) -> str:
    return f"{path}: cannot write: {err.strerror or err} (free space, then rerun: finished work is kept)"


@contextlib.contextmanager
def disk_errors(path: str | Path) -> Iterator[None]:
    """Re-raise a disk-full or over-quota ``OSError`` inside the block as one-line :class:`OutputError`."""
    try:
        yield
    except OSError as err:
        if err.errno in _FULL:
            raise OutputError(_full_message(Path(getattr(err, "filename", None) or path), err)) from None
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` when the block succeeds,
    delete it when the block fails. ``suffix`` keeps an extension writers look at (``".png"``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{suffix}")
    try:
        with disk_errors(path):
            yield tmp
            tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info:
        return "another run"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("started", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} since {when} ({info.get('command')})"


def lock_name(stage: str) -> str:
    """The lock file of ``stage`` in a slide's output folder."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    return f".gmrpath.{stage}.lock"


@contextlib.contextmanager
def slide_lock(folder: str | Path, stage: str, wait: bool = False) -> Iterator[None]:
    """Hold the exclusive lock of ``stage`` on a slide's output ``folder`` for the block.

    Args:
        wait: wait for another holder to finish instead of stopping.

    Raises:
        OutputError: another process holds it and ``wait`` is false (the message names that process).
    """
    import fcntl

    folder = Path(folder)
    lock = folder / lock_name(stage)
    key = str(lock.resolve())
    if key in _held:  # this process already holds it (a stage inside a stage): the outer block releases it
        yield
        return
    with disk_errors(lock):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(f"{folder}: in use by {_holder(lock)}; wait for it to finish or use another --out") from None
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": " ".join(sys.argv[:3])}
        with contextlib.suppress(OSError):  # the holder's name is a courtesy; a full disk must not stop the lock
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        _held.add(key)
        yield
    finally:
        _held.discard(key)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing releases the lock
