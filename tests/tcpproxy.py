"""A loopback TCP proxy a test can cut, silence and restore, to break a remote libvirt connection on purpose.

``cut``: the connections it carried are closed (both ends see EOF, as when a
link drops and a firewall resets it) and new ones are accepted and closed at
once, so a client that reconnects keeps failing until ``restore``.

``silence``: a dead network path. Nothing is forwarded any more, in either
direction, but every socket stays open (no FIN, no RST): the ends only learn
of it by their own timeouts (libvirt's keep-alives). New connections are
accepted and held, silent too. ``restore`` makes everything flow again, the
bytes held meanwhile included, as when a route comes back.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from typing import Iterator

_POLL_S = 0.1  # how soon a pump notices that the proxy went silent


class TcpProxy:
    """Forwards 127.0.0.1:``port`` (chosen by the kernel) to ``target``."""

    def __init__(self, target: tuple[str, int]) -> None:
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._cut = False
        self._flowing = threading.Event()  # cleared while silent
        self._flowing.set()
        self._stopped = False
        threading.Thread(target=self._accept, name="tcpproxy-accept", daemon=True).start()

    def cut(self) -> None:
        """Close every carried connection and refuse new ones until ``restore``."""
        with self._lock:
            self._cut = True
            pairs, self._pairs = self._pairs, []
        self._flowing.set()  # silent pumps wake up and find their sockets closed
        for pair in pairs:
            _close(*pair)

    def silence(self) -> None:
        """Stop forwarding anything, keeping every socket open, until ``restore``."""
        self._flowing.clear()

    def restore(self) -> None:
        with self._lock:
            self._cut = False
        self._flowing.set()

    def close(self) -> None:
        self._stopped = True
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refused = self._cut
            if refused:
                client.close()
                continue
            try:
                server = socket.create_connection(self._target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._pairs.append((client, server))
            threading.Thread(target=self._pump, args=(client, server), name="tcpproxy-pump", daemon=True).start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        peers = {client: server, server: client}
        with selectors.DefaultSelector() as selector:
            for sock in peers:
                selector.register(sock, selectors.EVENT_READ)
            try:
                while True:
                    if not self._flowing.is_set():
                        self._flowing.wait()  # silent: read nothing, so nothing moves and nothing closes
                        continue
                    for key, _ in selector.select(_POLL_S):
                        source = key.fileobj
                        assert isinstance(source, socket.socket)
                        data = source.recv(65536)
                        if not data:
                            raise ConnectionError("closed")
                        peers[source].sendall(data)
            except (OSError, ValueError):  # closed by cut(), or by a peer
                _close(client, server)


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


@contextlib.contextmanager
def tcp_proxy(target: tuple[str, int]) -> Iterator[TcpProxy]:
    proxy = TcpProxy(target)
    try:
        yield proxy
    finally:
        proxy.close()
