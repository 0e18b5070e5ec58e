"""Capturing an appliance's serial console through libvirt: to tell that a boot is under way, and to explain failed boots."""

from __future__ import annotations

import logging
from collections import deque

import libvirt
import trio

from .stream import LibvirtByteStream, StreamClosed

log = logging.getLogger(__name__)

_KEPT_BYTES = 64 * 1024


class ConsoleLog:
    """The last bytes an appliance printed on its console (read via ``virDomainOpenConsole``)."""

    def __init__(self, domain_name: str) -> None:
        self._domain_name = domain_name
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self.first_output = trio.Event()  # set when the appliance printed anything: it is running

    def attach(self, conn: libvirt.virConnect, domain: libvirt.virDomain) -> LibvirtByteStream:
        """Open the console stream; call before the domain is resumed so nothing is missed."""
        raw = LibvirtByteStream.new_stream(conn)
        domain.openConsole(None, raw, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        stream = LibvirtByteStream(raw, f"console of {self._domain_name}")
        stream.start()
        return stream

    async def collect(self, stream: LibvirtByteStream) -> None:
        """Keep the newest output until the console ends; runs as a background task."""
        partial_line = b""
        try:
            while data := await stream.receive_some(_KEPT_BYTES):
                self.first_output.set()
                if log.isEnabledFor(logging.DEBUG):  # whole lines only: data arrives in small pieces
                    *lines, partial_line = (partial_line + data).split(b"\n")
                    for line in lines:
                        log.debug("%s console: %s", self._domain_name, line.decode("utf-8", "replace").rstrip())
                self._chunks.append(data)
                self._size += len(data)
                while self._size - len(self._chunks[0]) >= _KEPT_BYTES:
                    self._size -= len(self._chunks.popleft())
        except StreamClosed:
            pass
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    def tail(self, lines: int = 10) -> list[str]:
        """The last non-empty console lines, as text."""
        text = b"".join(self._chunks).decode("utf-8", "replace")
        kept = [line.rstrip() for line in text.replace("\r", "\n").split("\n") if line.strip()]
        return kept[-lines:]
