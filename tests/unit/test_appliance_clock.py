"""A restored appliance's clock is set to now (virtmount.appliance._set_clock): its saved state carries the
time it was saved at, and files it writes would get times in the past."""

from __future__ import annotations

import logging
import time
from typing import cast

import pytest

from virtmount.appliance import _set_clock
from virtmount.guestfs.client import GuestfsClient
from virtmount.guestfs.errors import GuestfsError


class _Daemon:
    """Records the shell commands a client would send with debug sh."""

    def __init__(self, error: GuestfsError | None = None) -> None:
        self.commands: list[bytes] = []
        self.error = error

    async def debug_sh(self, command: bytes, *, timeout: float | None = None) -> bytes:
        self.commands.append(command)
        if self.error is not None:
            raise self.error
        return b""


async def test_the_clock_is_set_to_the_hosts_time() -> None:
    daemon = _Daemon()
    before = time.time()
    await _set_clock(cast(GuestfsClient, daemon), "appliance")
    [command] = daemon.commands
    assert command.startswith(b"date -u -s @")
    assert before <= float(command.split(b"@")[1]) <= time.time()


async def test_a_daemon_that_refuses_is_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    daemon = _Daemon(GuestfsError(None, "", "debug commands are disabled", "debug"))
    with caplog.at_level(logging.WARNING):
        await _set_clock(cast(GuestfsClient, daemon), "appliance for web1 (restored)")
    assert "could not set its clock" in caplog.text
