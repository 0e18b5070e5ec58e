"""A guestfsd stand-in on the far end of a real socket, in a thread of its own, that answers as a test says.

The client under test talks to it over a ``socket.socketpair()`` wrapped in a trio
``SocketStream``: real kernel buffers, real partial reads and writes, real EOF and EPIPE,
as over the libvirt stream. ``answer(call)`` returns the bytes to write for each call
(``b""``: write nothing and keep the connection; ``hang_up``: close it after the first answer).
The thread records the
calls it got and whether the client dropped the connection (EOF or a broken pipe).

Usage::

    daemon = HostileDaemon(lambda call: encode_reply(call.proc, call.serial + 1))
    async with daemon.client(call_timeout=5) as client:
        ...
    assert daemon.wait_dropped(5)
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import AsyncIterator, Callable

import trio

from virtmount.guestfs.client import GuestfsClient
from virtmount.guestfs.protocol import LAUNCH_FLAG_BYTES, CallHeader, CallSplitter

Answer = Callable[[CallHeader], bytes]


class HostileDaemon:
    """One connection's daemon end, served by a thread."""

    def __init__(self, answer: Answer, *, hang_up: bool = False) -> None:
        self._answer = answer
        self._hang_up = hang_up
        self.calls: list[CallHeader] = []
        self.dropped = threading.Event()  # the client closed its end (EOF or EPIPE seen)
        self._client_sock, self._daemon_sock = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="hostile-guestfsd", daemon=True)

    def _serve(self) -> None:
        sock = self._daemon_sock
        splitter = CallSplitter()
        try:
            sock.sendall(LAUNCH_FLAG_BYTES)
            while data := sock.recv(65536):
                splitter.receive_data(data)
                while (call := splitter.next_call()) is not None:
                    self.calls.append(call)
                    sock.sendall(self._answer(call))
                    if self._hang_up:
                        return
            self.dropped.set()
        except OSError:  # EPIPE / ECONNRESET: the client dropped the connection mid-write
            self.dropped.set()
        finally:
            sock.close()

    @contextlib.asynccontextmanager
    async def client(self, call_timeout: float) -> AsyncIterator[GuestfsClient]:
        """The real client over the client end of the socket pair, launched."""
        self._thread.start()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(self._client_sock))
        async with GuestfsClient(stream, call_timeout=call_timeout) as client:
            await client.wait_for_launch(10)
            yield client

    def wait_dropped(self, timeout: float) -> bool:
        """Whether the client dropped the connection within ``timeout`` seconds."""
        return self.dropped.wait(timeout)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
