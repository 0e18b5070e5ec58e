"""The mount's libvirt connection: noticed when it closes, re-opened with backoff.

libvirt tells us itself when a connection ends (its close callback: the
daemon restarted, the TCP connection broke, keep-alives went unanswered).
With two calls waiting on a dead network path (no FIN, no RST), libvirt
reported the close only minutes later (connection.py runs one call at a time
over a network for that reason); as a safety net the link also asks libvirt every
ALIVE_CHECK_S whether it still counts the connection open (a local check, no
message goes to the server). A dead path is noticed when libvirt's keep-alives
give up (connection.py: no message from the server for 5 s x (3 + 1) = 20 s);
the calls waiting then are given up. While it is down every user of
``LibvirtLink.conn`` gets ``LibvirtDown`` (EIO) at once instead of a call that
hangs; ``keep_open`` re-opens it (0.5 s, 1 s, 2 s, … up to 10 s
between attempts) and tells the mount, which drops what belonged to the old
connection (appliances, event registrations) and boots anew on demand.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, Awaitable, Callable

import libvirt
import trio

from ..errors import VirtmountError
from .connection import ConnectionFailed, abandon_calls, close_connection, open_connection
from .events import call_in_trio

log = logging.getLogger(__name__)

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0
ALIVE_CHECK_S = 1.0
_ALIVE_CHECK_TIMEOUT_S = 5.0
_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "I/O error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "the server closed it",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keep-alives unanswered",
}


class LibvirtDown(VirtmountError):
    """The libvirt connection is closed and being re-opened."""


class LibvirtLink:
    """The current libvirt connection of a mount (``conn``), replaced when it closes."""

    def __init__(self, uri: str, conn: libvirt.virConnect) -> None:
        self.uri = uri
        self._conn: libvirt.virConnect | None = conn
        self._up = trio.Event()
        self._up.set()
        self._lost = trio.Event()
        self._down_since = 0.0
        self._checking_alive = False  # a liveness check's thread has not returned yet
        self.reconnects = 0

    @property
    def conn(self) -> libvirt.virConnect:
        """The connection now; LibvirtDown while it is being re-opened."""
        self.ensure_up()
        assert self._conn is not None
        return self._conn

    def ensure_up(self) -> None:
        """LibvirtDown while the connection is being re-opened."""
        if self._conn is None:
            raise LibvirtDown(f"the libvirt connection to {self.uri} is down (re-opening it)")

    async def connected(self) -> libvirt.virConnect:
        """The connection, once there is one."""
        while self._conn is None:
            await self._up.wait()
        return self._conn

    def holds(self, conn: libvirt.virConnect) -> bool:
        """Whether ``conn`` is the current connection (not lost)."""
        return self._conn is conn

    async def wait_lost(self, conn: libvirt.virConnect) -> None:
        """Return once ``conn`` is not the current connection any more (it closed)."""
        while self.holds(conn):
            await self._lost.wait()

    def _mark_lost(self, conn: libvirt.virConnect, why: str) -> None:
        if conn is not self._conn:
            return  # an older connection's late callback
        log.warning("lost the libvirt connection to %s (%s); re-opening it", self.uri, why)
        if abandoned := abandon_calls():
            log.info("gave up %d libvirt call(s) waiting on the lost connection", abandoned)
        self._conn = None
        self._down_since = time.monotonic()
        self._up = trio.Event()
        self._lost.set()

    async def keep_open(
        self,
        on_lost: Callable[[], Awaitable[None]],
        on_reopened: Callable[[libvirt.virConnect], Awaitable[None]],
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Watch the connection and re-open it whenever it closes: ``on_lost`` runs once it is gone,
        ``on_reopened`` with the new one before anyone else may use it."""
        token = trio.lowlevel.current_trio_token()
        conn = self.conn
        while True:
            self._watch_close(conn, token)
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            while not self._lost.is_set():
                with trio.move_on_after(ALIVE_CHECK_S):
                    await self._lost.wait()
                if not self._lost.is_set() and not await self._alive(conn):
                    self._mark_lost(conn, "libvirt found it dead (keep-alives unanswered or the socket closed)")
            await on_lost()
            with contextlib.suppress(libvirt.libvirtError):
                conn.unregisterCloseCallback()
            with trio.move_on_after(5):
                await close_connection(conn)
            conn = await self._reopen()
            await on_reopened(conn)
            self._conn, self._lost = conn, trio.Event()
            self.reconnects += 1
            self._up.set()
            log.warning("re-opened the libvirt connection to %s after %.1f s", self.uri,
                        time.monotonic() - self._down_since)

    async def _alive(self, conn: libvirt.virConnect) -> bool:
        """Whether libvirt still counts ``conn`` as open (a local check); True when it cannot tell."""
        if self._checking_alive:
            return True  # the last check has not returned (a lock held by a stuck call): no pile of threads

        def check() -> int:
            try:
                return int(conn.isAlive())
            except libvirt.libvirtError:
                return 1
            finally:
                self._checking_alive = False

        self._checking_alive = True
        with trio.move_on_after(_ALIVE_CHECK_TIMEOUT_S):
            return await trio.to_thread.run_sync(check, abandon_on_cancel=True) != 0
        return True

    def _watch_close(self, conn: libvirt.virConnect, token: trio.lowlevel.TrioToken) -> None:
        def closed(_conn: libvirt.virConnect, reason: int, _opaque: Any) -> None:
            if reason != libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT:  # not our own close at unmount
                call_in_trio(token, self._mark_lost, conn, _CLOSE_REASONS.get(reason, f"reason {reason}"))

        try:
            conn.registerCloseCallback(closed, None)
        except libvirt.libvirtError as exc:  # drivers without a close callback (qemu:///embed) never close
            log.debug("no close callback on %s: %s", self.uri, exc)

    async def _reopen(self) -> libvirt.virConnect:
        delay = BACKOFF_FIRST_S
        while True:
            try:
                return await open_connection(self.uri, timeout=30.0)
            except ConnectionFailed as exc:
                log.info("%s; trying again in %.1f s", exc, delay)
            await trio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_S)
