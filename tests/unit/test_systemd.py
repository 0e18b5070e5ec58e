"""systemd's readiness notification (virtmount.systemd) over real datagram sockets."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from virtmount.systemd import notify


def test_nothing_happens_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notify("READY=1")


def test_a_socket_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        notify("READY=1\nSTATUS=mounted")
        assert manager.recv(100) == b"READY=1\nSTATUS=mounted"


def test_an_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"virtmount-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notify("READY=1")
        assert manager.recv(100) == b"READY=1"


def test_a_missing_manager_costs_a_warning(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    notify("READY=1")
    assert "cannot notify the service manager" in caplog.text
