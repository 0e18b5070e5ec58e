"""A non-blocking libvirt stream presented to trio as a byte stream.

The stream is created with ``VIR_STREAM_NONBLOCK`` and driven by libvirt's
stream event callbacks (run in the libvirt event thread, see ``events``):
the callback drains everything readable without blocking and hands the bytes
to the trio thread. Sends are attempted directly and, when libvirt says they
would block, wait for the writable event. No thread ever blocks in a stream
call and nothing polls.
"""

from __future__ import annotations

import logging
from typing import Any

import libvirt
import trio

from .connection import run_blocking
from .events import call_in_trio

log = logging.getLogger(__name__)

_READ_SIZE = 256 * 1024
_WOULD_BLOCK = -2


class StreamClosed(trio.BrokenResourceError):
    """The stream ended (EOF, hang-up or error) or was closed by us: a broken stream, as trio's
    streams report one, so that their users (the daemon client) need not know this class."""


class LibvirtByteStream:
    """trio-side byte stream over a non-blocking ``virStream``.

    Use ``new_stream(conn)`` to create the underlying stream, attach it to a
    channel or console (``virDomainOpenChannel`` / ``OpenConsole``), then
    ``start()`` it before the domain can send anything.
    """

    def __init__(self, stream: libvirt.virStream, description: str) -> None:
        self._stream = stream
        self._description = description
        self._token = trio.lowlevel.current_trio_token()
        self._received = bytearray()
        self._eof = False
        self._failure: str | None = None
        self._closed = False
        self._data_arrived = trio.Event()
        self._writable = trio.Event()
        self._want_write = False
        self._send_lock = trio.Lock()

    @staticmethod
    def new_stream(conn: libvirt.virConnect) -> libvirt.virStream:
        return conn.newStream(libvirt.VIR_STREAM_NONBLOCK)

    def start(self) -> None:
        """Register the event callback; call once the stream is attached."""
        self._stream.eventAddCallback(self._wanted_events(), self._on_event, None)

    def _wanted_events(self) -> int:
        events = libvirt.VIR_STREAM_EVENT_READABLE | libvirt.VIR_STREAM_EVENT_ERROR | libvirt.VIR_STREAM_EVENT_HANGUP
        if self._want_write:
            events |= libvirt.VIR_STREAM_EVENT_WRITABLE
        return events

    # --- libvirt event thread -------------------------------------------------

    def _on_event(self, stream: libvirt.virStream, events: int, _opaque: Any) -> None:
        """Runs in the libvirt thread: drain readable data, report writability and ends."""
        chunks: list[bytes] = []
        eof = False
        failure: str | None = None
        if events & libvirt.VIR_STREAM_EVENT_READABLE or events & (
            libvirt.VIR_STREAM_EVENT_HANGUP | libvirt.VIR_STREAM_EVENT_ERROR
        ):
            while True:
                try:
                    data = stream.recv(_READ_SIZE)
                except libvirt.libvirtError as exc:
                    failure = exc.get_error_message() or str(exc)
                    break
                if data == _WOULD_BLOCK:
                    break
                if not data:
                    eof = True
                    break
                chunks.append(data)
        if failure is None and events & libvirt.VIR_STREAM_EVENT_ERROR and not eof:
            failure = "stream error"
        if failure is not None or eof:
            try:
                stream.eventRemoveCallback()
            except libvirt.libvirtError:
                pass
        writable = bool(events & libvirt.VIR_STREAM_EVENT_WRITABLE)
        call_in_trio(self._token, self._deliver, b"".join(chunks), eof, failure, writable)

    # --- trio thread ------------------------------------------------------------

    def _deliver(self, data: bytes, eof: bool, failure: str | None, writable: bool) -> None:
        if data:
            self._received += data
        if eof:
            self._eof = True
        if failure is not None and self._failure is None:
            self._failure = failure
        if data or eof or failure is not None:
            self._data_arrived.set()
        if writable or eof or failure is not None:
            self._writable.set()

    async def receive_some(self, max_bytes: int = 65536) -> bytes:
        """Return up to ``max_bytes`` bytes; ``b""`` at end of stream; StreamClosed on error."""
        while not self._received:
            if self._closed:
                raise StreamClosed(f"{self._description}: closed")
            if self._failure is not None:
                raise StreamClosed(f"{self._description}: {self._failure}")
            if self._eof:
                return b""
            self._data_arrived = trio.Event()
            await self._data_arrived.wait()
        data = bytes(self._received[:max_bytes])
        del self._received[:max_bytes]
        return data

    async def send_all(self, data: bytes) -> None:
        """Send every byte, waiting for the writable event when libvirt would block."""
        view = memoryview(data)
        async with self._send_lock:
            while view:
                if self._closed or self._failure is not None or self._eof:
                    raise StreamClosed(f"{self._description}: {self._failure or 'closed'}")
                try:
                    sent = self._stream.send(bytes(view[:_READ_SIZE]))
                except libvirt.libvirtError as exc:
                    self._failure = exc.get_error_message() or str(exc)
                    raise StreamClosed(f"{self._description}: {self._failure}") from None
                if sent == _WOULD_BLOCK:
                    await self._wait_writable()
                    continue
                view = view[sent:]

    async def send_hole(self, length: int) -> None:
        """Send a hole of ``length`` bytes (for sparse uploads)."""
        if self._closed or self._failure is not None:
            raise StreamClosed(f"{self._description}: {self._failure or 'closed'}")
        try:
            self._stream.sendHole(length, 0)
        except libvirt.libvirtError as exc:
            self._failure = exc.get_error_message() or str(exc)
            raise StreamClosed(f"{self._description}: {self._failure}") from None

    async def _wait_writable(self) -> None:
        self._writable = trio.Event()
        self._want_write = True
        self._update_events()
        try:
            await self._writable.wait()
        finally:
            self._want_write = False
            self._update_events()

    def _update_events(self) -> None:
        if self._closed or self._eof or self._failure is not None:
            return
        try:
            self._stream.eventUpdateCallback(self._wanted_events())
        except libvirt.libvirtError:
            pass

    async def finish(self) -> None:
        """Complete an upload: tell the far end all data was sent and wait for its answer."""
        self._remove_callback()
        self._closed = True
        try:
            await run_blocking(self._stream.finish)
        except libvirt.libvirtError as exc:
            raise StreamClosed(f"{self._description}: {exc.get_error_message()}") from None

    async def aclose(self) -> None:
        """Abort the stream (idempotent); pending receivers see StreamClosed."""
        if self._closed:
            return
        self._closed = True
        self._remove_callback()
        try:
            self._stream.abort()
        except libvirt.libvirtError:
            pass
        self._data_arrived.set()
        self._writable.set()
        await trio.lowlevel.checkpoint()

    def _remove_callback(self) -> None:
        if self._eof or self._failure is not None:
            return  # the event thread removed it already
        try:
            self._stream.eventRemoveCallback()
        except libvirt.libvirtError:
            pass
