"""Read-ahead for one open file: sequential readers get few, large daemon reads.

The kernel asks for 128 KiB at a time; each daemon call costs a round trip
through the appliance. When reads are sequential, this fetches a window that
doubles up to the daemon's largest reply and serves the next requests from
it. Random reads fetch just what was asked. Concurrent kernel requests for
one handle wait for the fetch in flight instead of duplicating it.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import trio

FIRST_WINDOW = 512 * 1024

Fetch = Callable[[int, int], Awaitable[bytes]]


class ReadAhead:
    """Serves ``read(offset, size)`` for one file through ``fetch(offset, size)`` (short at EOF)."""

    def __init__(self, fetch: Fetch, max_window: int) -> None:
        self._fetch = fetch
        self._max_window = max_window
        self._window = 0
        self._buffer = b""
        self._buffer_offset = 0
        self._next_offset = 0
        self._at_eof = False
        self._lock = trio.Lock()

    def _cached(self, offset: int, size: int) -> bytes | None:
        start = offset - self._buffer_offset
        end = start + size
        if start < 0 or start > len(self._buffer):
            return None
        if end <= len(self._buffer) or self._at_eof:
            return self._buffer[start:end]
        return None

    async def read(self, offset: int, size: int) -> bytes:
        async with self._lock:
            cached = self._cached(offset, size)
            if cached is not None:
                self._next_offset = offset + len(cached)
                return cached
            sequential = offset == self._next_offset
            self._window = min(max(self._window * 2, FIRST_WINDOW), self._max_window) if sequential else 0
            want = max(size, self._window)
            data = await self._read_fully(offset, want)
            self._buffer, self._buffer_offset = data, offset
            self._at_eof = len(data) < want
            result = data[:size]
            self._next_offset = offset + len(result)
            return result

    async def _read_fully(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` in calls of at most ``max_window``; short means end of file
        (the daemon does one pread(2) per call, and a regular file reads short only at its end)."""
        chunks = []
        while size > 0:
            want = min(size, self._max_window)
            chunk = await self._fetch(offset, want)
            chunks.append(chunk)
            if len(chunk) < want:
                break
            offset += len(chunk)
            size -= len(chunk)
        return b"".join(chunks)
