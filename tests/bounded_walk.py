"""A walker for trees that may be damaged: bounded in entries, depth and bytes, every error counted.

``walk(top)`` lists, lstat's, reads (the first ``READ_LIMIT`` bytes) and readlinks what it finds
below ``top`` depth first, never following symlinks, and returns a ``WalkReport``: how many of each
it did, the errors by errno name, and the slowest single operation (a hang shows there, or as the
caller's overall deadline passing).
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, TypeVar

T = TypeVar("T")

MAX_ENTRIES = 2000
MAX_DEPTH = 8
READ_LIMIT = 64 * 1024


@dataclass
class WalkReport:
    entries: int = 0
    files_read: int = 0
    bytes_read: int = 0
    links_read: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    slowest: float = 0.0  # seconds of the slowest single operation
    slowest_what: str = ""

    def timed(self, what: str, operation: Callable[[], T]) -> T | None:
        """Run one file system operation; None (and the error counted) if it failed."""
        start = time.monotonic()
        try:
            return operation()
        except OSError as exc:
            self.errors[errno.errorcode.get(exc.errno or 0, str(exc.errno))] += 1
            return None
        finally:
            elapsed = time.monotonic() - start
            if elapsed > self.slowest:
                self.slowest, self.slowest_what = elapsed, what


def _read_head(path: bytes) -> bytes:
    with open(path, "rb") as f:
        return f.read(READ_LIMIT)


def walk(top: bytes, report: WalkReport | None = None, depth: int = 0) -> WalkReport:
    report = report if report is not None else WalkReport()
    names = report.timed(f"listdir {top!r}", lambda: os.listdir(top))
    for name in names or []:
        if report.entries >= MAX_ENTRIES:
            break
        report.entries += 1
        path = top + b"/" + name
        st = report.timed(f"lstat {path!r}", lambda: os.lstat(path))
        if st is None:
            continue
        if stat.S_ISDIR(st.st_mode) and depth < MAX_DEPTH:
            walk(path, report, depth + 1)
        elif stat.S_ISREG(st.st_mode):
            data = report.timed(f"read {path!r}", lambda: _read_head(path))
            if data is not None:
                report.files_read += 1
                report.bytes_read += len(data)
        elif stat.S_ISLNK(st.st_mode):
            if report.timed(f"readlink {path!r}", lambda: os.readlink(path)) is not None:
                report.links_read += 1
    return report
