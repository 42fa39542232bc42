"""The local spool: usage batches the transport could not take, on disk until it can.

One append-only file per process in ``USAGE_SPOOL_DIR`` (``usage-<pid>-<tag>.spool``), one JSON line per
batch, flushed and fsynced before ``append`` returns: a batch in the spool survives the process and the
machine. The owning process holds an exclusive ``flock`` on its file for its lifetime, so any process can
tell a live process's spool from one left by a process that died: it adopts the latter (takes its lock) and
replays it too. Replay sends the lines in order and cuts the file only after they were taken; a crash in
between sends some again, which the ledger's idempotent write absorbs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import orjson

logger = logging.getLogger("gateway_stats.spool")

Rows = list[dict[str, Any]]
Deliver = Callable[[Rows], None]

_SUFFIX = ".spool"


class Spool:
    """The spool files of one directory: this process's own, and the ones it adopted."""

    def __init__(self, directory: Path | str, *, on_drop: Callable[[int], None] | None = None) -> None:
        self.directory = Path(directory)
        self.on_drop = on_drop
        self._lock = threading.Lock()
        self._own: IO[bytes] | None = None
        self._own_pid = 0
        self._drop_logged = False

    # --- writing ----------------------------------------------------------------------------------
    def append(self, rows: Rows) -> bool:
        """Write one batch durably (fsync); False when it could not be written (counted, logged once)."""
        if not rows:
            return True
        line = orjson.dumps(rows) + b"\n"
        with self._lock:
            try:
                handle = self._own_file()
                handle.write(line)
                handle.flush()
                os.fsync(handle.fileno())
            except OSError:
                self._dropped(len(rows))
                return False
        return True

    def _own_file(self) -> IO[bytes]:
        if self._own is None or self._own_pid != os.getpid():
            # A forked child must not share its parent's file (nor its lock): it makes its own.
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"usage-{os.getpid()}-{secrets.token_hex(4)}{_SUFFIX}"
            handle = open(path, "a+b")  # noqa: SIM115 (kept open for the process's lifetime)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._own, self._own_pid = handle, os.getpid()
        return self._own

    def _dropped(self, count: int) -> None:
        if self.on_drop is not None:
            self.on_drop(count)
        if not self._drop_logged:
            self._drop_logged = True
            logger.error(
                "usage spool %s cannot be written (disk full?): %d usage records dropped; further drops are"
                " counted in apiforge_usage_dropped_total, not logged",
                self.directory,
                count,
            )

    # --- reading ----------------------------------------------------------------------------------
    def pending(self) -> bool:
        """Whether any spool file in the directory holds a batch (this process's or another's)."""
        return self.size_bytes() > 0

    def own_pending(self) -> bool:
        """Whether this process's own spool file holds a batch (new batches then queue up behind it)."""
        with self._lock:
            if self._own is None or self._own_pid != os.getpid():
                return False
            try:
                return os.fstat(self._own.fileno()).st_size > 0
            except OSError:
                return False

    def size_bytes(self) -> int:
        total = 0
        try:
            for path in self.directory.glob(f"*{_SUFFIX}"):
                try:
                    total += path.stat().st_size
                except FileNotFoundError:
                    continue
        except OSError:
            return 0
        return total

    def replay(self, deliver: Deliver, *, max_batches: int = 100) -> int:
        """Send spooled batches, oldest file first, through ``deliver`` (which raises when it cannot);
        returns how many records went. Stops at the first failure, keeping what was not sent."""
        sent = 0
        with self._lock:
            for handle, own in self._replayable():
                try:
                    count, batches, finished = self._replay_file(handle, deliver, max_batches)
                finally:
                    if not own:
                        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
                        handle.close()
                sent += count
                max_batches -= batches
                if not finished or max_batches <= 0:
                    break
        return sent

    def _replayable(self) -> Iterator[tuple[IO[bytes], bool]]:
        """This process's file, then the files no live process holds (their owners died), oldest first."""
        own_path = None
        if self._own is not None and self._own_pid == os.getpid():
            own_path = Path(self._own.name)
            yield self._own, True
        try:
            paths = sorted(self.directory.glob(f"*{_SUFFIX}"), key=lambda path: path.stat().st_mtime)
        except OSError:
            return
        for path in paths:
            if path == own_path:
                continue
            try:
                handle = open(path, "r+b")  # noqa: SIM115 (closed by replay)
            except OSError:
                continue
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()  # a live process's spool: it replays it itself
                continue
            yield handle, False

    def _replay_file(self, handle: IO[bytes], deliver: Deliver, max_batches: int) -> tuple[int, int, bool]:
        handle.seek(0)
        lines = handle.read().split(b"\n")
        sent = 0
        done = 0
        failed = False
        for line in lines:
            if done >= max_batches:
                break
            if line.strip():
                try:
                    rows = orjson.loads(line)
                except orjson.JSONDecodeError:
                    # A line torn by a crash in the middle of its write: those records were never confirmed.
                    logger.warning("usage spool %s: skipped a torn line of %d bytes", handle.name, len(line))
                    rows = []
                if rows:
                    try:
                        deliver(rows)
                    except Exception:
                        failed = True
                        break
                    sent += len(rows)
            done += 1
        rest = b"\n".join(lines[done:])
        handle.seek(0)
        handle.truncate()
        if rest.strip():
            handle.write(rest if rest.endswith(b"\n") else rest + b"\n")
        handle.flush()
        os.fsync(handle.fileno())
        finished = not failed and not rest.strip()
        if finished and handle is not self._own:
            Path(handle.name).unlink(missing_ok=True)
        return sent, done, finished

    def discard(self) -> None:
        """Remove this directory's spool files (tests)."""
        with self._lock:
            if self._own is not None:
                self._own.close()
                self._own = None
            for path in self.directory.glob(f"*{_SUFFIX}"):
                path.unlink(missing_ok=True)
