"""The test proxy's silent mode holds bytes and sockets (no EOF) until restored (tests/tcpproxy.py)."""

from __future__ import annotations

import socket
import threading

from tests.tcpproxy import tcp_proxy


def _echo_server() -> socket.socket:
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return listener


def test_silence_holds_bytes_without_closing_and_restore_delivers_them() -> None:
    listener = _echo_server()
    with listener, tcp_proxy(listener.getsockname()) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
            client.sendall(b"one")
            assert client.recv(16) == b"one"
            proxy.silence()
            client.sendall(b"two")
            client.settimeout(0.5)
            try:
                got = client.recv(16)
            except socket.timeout:
                got = None
            assert got is None  # neither the echo nor an EOF (b"") came through
            proxy.restore()
            client.settimeout(5)
            assert client.recv(16) == b"two"
