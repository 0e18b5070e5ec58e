"""Read-ahead for one open file: sequential readers get few, large daemon reads, one always in flight.

The kernel asks for 128 KiB at a time; each daemon call costs a round trip
through the appliance. When reads are sequential, this fetches a window that
doubles up to the daemon's largest reply and serves the next requests from
it; with a nursery, the following window is fetched in the background while
the current one is served, so the daemon reads the disk while the previous
chunk travels. Random reads fetch just what was asked. Concurrent kernel
requests for one handle wait for the fetch in flight instead of duplicating it.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import trio

FIRST_WINDOW = 512 * 1024
# Larger windows are slower, not faster: 2 MiB preads, two in flight, carried 39-48 MB/s from the
# appliance under TCG, 4 MiB ones (the daemon's largest) 26-28 MB/s, 1 MiB ones 38 MB/s.
LARGEST_WINDOW = 2 * 1024 * 1024

Fetch = Callable[[int, int], Awaitable[bytes]]


class _NextWindow:
    """A window being fetched in the background: ``data`` is None until done, or if it failed."""

    def __init__(self, offset: int, size: int) -> None:
        self.offset = offset
        self.size = size
        self.data: bytes | None = None
        self.done = trio.Event()


class ReadAhead:
    """Serves ``read(offset, size)`` for one file through ``fetch(offset, size)`` (short at EOF)."""

    def __init__(self, fetch: Fetch, max_window: int, nursery: trio.Nursery | None = None) -> None:
        self._fetch = fetch
        self._max_window = max_window
        self._nursery = nursery
        self._window = 0
        self._buffer = b""
        self._buffer_offset = 0
        self._next_offset = 0
        self._at_eof = False
        self._ahead: _NextWindow | None = None
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
            if cached is None:
                await self._refill(offset, size)
                cached = self._cached(offset, size)
                assert cached is not None
            self._next_offset = offset + len(cached)
            return cached

    async def _refill(self, offset: int, size: int) -> None:
        """Make the buffer hold ``offset``: from the window fetched ahead, or fetched now."""
        sequential = offset == self._next_offset
        self._window = min(max(self._window * 2, FIRST_WINDOW), self._max_window) if sequential else 0
        ahead, self._ahead = self._ahead, None
        buffer_end = self._buffer_offset + len(self._buffer)
        if (sequential and ahead is not None and ahead.offset == buffer_end
                and self._buffer_offset <= offset < ahead.offset + ahead.size):
            await ahead.done.wait()
            if ahead.data is not None:
                # a kernel read may straddle the two windows: keep the buffer's tail
                tail = self._buffer[offset - self._buffer_offset:] if offset < buffer_end else b""
                self._fill(offset if tail else ahead.offset, tail + ahead.data, len(tail) + ahead.size)
                if self._cached(offset, size) is not None:
                    self._fetch_ahead()
                    return
        want = max(size, self._window)
        self._fill(offset, await self._read_fully(offset, want), want)
        if sequential:
            self._fetch_ahead()

    def _fill(self, offset: int, data: bytes, wanted: int) -> None:
        self._buffer, self._buffer_offset = data, offset
        self._at_eof = len(data) < wanted

    def _fetch_ahead(self) -> None:
        """Start fetching the window after the buffer (a sequential reader will want it next)."""
        if self._nursery is None or self._at_eof or self._window == 0:
            return
        ahead = _NextWindow(self._buffer_offset + len(self._buffer), self._window)
        self._ahead = ahead

        async def run() -> None:
            try:
                ahead.data = await self._read_fully(ahead.offset, ahead.size)
            except Exception:  # the reader fetches it again itself and sees the error
                ahead.data = None
            finally:
                ahead.done.set()

        self._nursery.start_soon(run)

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
