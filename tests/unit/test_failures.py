"""The errno table (virtmount.failures), the connection that re-opens itself (virtmount.virt.link) and the
overlays libvirt may forget (virtmount.virt.overlays), with fakes."""

from __future__ import annotations

import errno
from typing import Any, Callable, cast

import libvirt
import pytest
import trio
import trio.testing

from virtmount.failures import ErrnoError, errno_of, reason_of
from virtmount.guestfs.errors import ConnectionLost, GuestfsError, GuestfsTimeout, ProtocolError
from virtmount.virt import link as link_module
from virtmount.virt.connection import ConnectionFailed
from virtmount.virt.link import LibvirtDown, LibvirtLink
from virtmount.virt.overlays import transient_overlays


class FakeLibvirtError(libvirt.libvirtError):
    def __init__(self, code: int, message: str, int1: int = 0) -> None:
        super().__init__(message)
        self.code, self.message, self.int1 = code, message, int1

    def get_error_code(self) -> int:
        return self.code

    def get_error_message(self) -> str:
        return self.message

    def get_int1(self) -> int:
        return self.int1


@pytest.mark.parametrize(("failure", "expected"), [
    (FakeLibvirtError(libvirt.VIR_ERR_NO_DOMAIN, "Domain not found"), errno.ENOENT),
    (FakeLibvirtError(libvirt.VIR_ERR_NO_STORAGE_VOL, "Storage volume not found"), errno.ENOENT),
    (FakeLibvirtError(libvirt.VIR_ERR_ACCESS_DENIED, "access denied"), errno.EACCES),
    (FakeLibvirtError(libvirt.VIR_ERR_OPERATION_FAILED, "cannot create volume: No space left on device"),
     errno.ENOSPC),
    (FakeLibvirtError(libvirt.VIR_ERR_SYSTEM_ERROR, "cannot write", errno.ENOSPC), errno.ENOSPC),
    (FakeLibvirtError(libvirt.VIR_ERR_INTERNAL_ERROR, 'qemu: Failed to get "write" lock'), errno.EBUSY),
    (FakeLibvirtError(libvirt.VIR_ERR_SYSTEM_ERROR, "Cannot write data: Broken pipe", errno.EPIPE), errno.EIO),
    (FakeLibvirtError(libvirt.VIR_ERR_INTERNAL_ERROR, "client socket is closed"), errno.EIO),
    (GuestfsError(errno.EACCES, "EACCES", "Permission denied", "pread"), errno.EACCES),
    (GuestfsError(None, "", "mount: wrong fs type", "mount_ro"), errno.EIO),
    (GuestfsTimeout("pread took longer than 120 s"), errno.ETIMEDOUT),
    (ConnectionLost("guestfsd closed the connection"), errno.EIO),
    (ProtocolError("reply length 2147483647 over the limit"), errno.EIO),
    (ErrnoError("domain web1 is gone", errno.ENOENT), errno.ENOENT),
    (LibvirtDown("the libvirt connection is down"), errno.EIO),
    (RuntimeError("a bug"), errno.EIO),
])
def test_each_failure_answers_one_errno(failure: BaseException, expected: int) -> None:
    assert errno_of(failure) == expected


def test_reasons_are_one_line() -> None:
    assert reason_of(FakeLibvirtError(libvirt.VIR_ERR_INTERNAL_ERROR, "two\n  lines")) == "two lines"
    assert reason_of(RuntimeError()) == "RuntimeError"


class FakeConnection:
    """Stands for a virConnect: holds the close callback libvirt would call, and whether libvirt counts it open."""

    def __init__(self) -> None:
        self.close_callback: Callable[..., None] | None = None
        self.closed = False
        self.alive = True

    def isAlive(self) -> int:
        return int(self.alive)

    def registerCloseCallback(self, callback: Callable[..., None], opaque: Any) -> None:
        self.close_callback = callback

    def unregisterCloseCallback(self) -> None:
        self.close_callback = None

    def close(self) -> None:
        self.closed = True


async def test_a_closed_connection_answers_at_once_and_is_reopened_with_backoff(
        monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock) -> None:
    first, second = FakeConnection(), FakeConnection()
    attempts: list[float] = []

    async def open_connection(uri: str, timeout: float = 60.0) -> Any:
        attempts.append(trio.current_time())
        if len(attempts) < 4:
            raise ConnectionFailed(f"cannot connect to {uri}: Connection refused")
        return second

    monkeypatch.setattr(link_module, "open_connection", open_connection)
    link = LibvirtLink("qemu+tcp://host/system", cast(libvirt.virConnect, first))
    events: list[object] = []

    async def on_lost() -> None:
        events.append("lost")

    async def on_reopened(conn: libvirt.virConnect) -> None:
        events.append(conn)

    async with trio.open_nursery() as nursery:
        await nursery.start(link.keep_open, on_lost, on_reopened)
        assert first.close_callback is not None
        first.close_callback(first, libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT, None)  # our own close: ignored
        await trio.testing.wait_all_tasks_blocked()
        assert link.conn is cast(libvirt.virConnect, first)
        first.close_callback(first, libvirt.VIR_CONNECT_CLOSE_REASON_EOF, None)
        await trio.testing.wait_all_tasks_blocked()
        assert events[:1] == ["lost"]
        assert await link.connected() is cast(libvirt.virConnect, second)
        assert events == ["lost", second] and link.reconnects == 1
        assert [round(b - a, 1) for a, b in zip(attempts, attempts[1:])] == [0.5, 1.0, 2.0]
        assert second.close_callback is not None  # watched in turn
        nursery.cancel_scope.cancel()


async def test_a_connection_libvirt_found_dead_is_lost_without_its_close_callback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep-alives that time out inside a call mark the connection closed long before the close callback
    comes (a dead network path): the link notices it by asking libvirt."""
    monkeypatch.setattr(link_module, "ALIVE_CHECK_S", 0.05)
    first = FakeConnection()
    link = LibvirtLink("qemu+tcp://host/system", cast(libvirt.virConnect, first))
    lost = trio.Event()

    async def on_lost() -> None:
        lost.set()

    async def on_reopened(conn: libvirt.virConnect) -> None:
        pass

    async def never_reopens(uri: str, timeout: float = 60.0) -> Any:
        await trio.sleep_forever()

    monkeypatch.setattr(link_module, "open_connection", never_reopens)
    async with trio.open_nursery() as nursery:
        await nursery.start(link.keep_open, on_lost, on_reopened)
        await trio.sleep(0.2)
        assert not lost.is_set()  # alive: nothing happens
        first.alive = False
        with trio.fail_after(2):
            await lost.wait()
        with pytest.raises(LibvirtDown):
            link.ensure_up()
        nursery.cancel_scope.cancel()


async def test_while_down_every_user_gets_libvirtdown() -> None:
    first = FakeConnection()
    link = LibvirtLink("qemu:///system", cast(libvirt.virConnect, first))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(link.wait_lost, cast(libvirt.virConnect, first))  # returns once it is lost
        await trio.testing.wait_all_tasks_blocked()
        link._mark_lost(cast(libvirt.virConnect, first), "the server closed it")
    with pytest.raises(LibvirtDown, match="is down"):
        link.ensure_up()
    with trio.move_on_after(1) as scope:
        await link.wait_lost(cast(libvirt.virConnect, first))  # an old connection: at once
    assert not scope.cancelled_caught


def test_throw_away_overlays_are_named_after_the_image_and_the_domain() -> None:
    live = """<domain><name>virtmount-appliance-saved-1</name><devices>
      <disk type='file'><source file='/img/a.qcow2.TRANSIENT-virtmount-appliance-saved-1'/>
        <backingStore type='file'><source file='/img/a.qcow2'/></backingStore><transient shareBacking='yes'/></disk>
      <disk type='file'><source file='/pool/run.qcow2'/></disk>
      <disk type='network'><source protocol='nbd' name='vda'/><transient/></disk>
    </devices></domain>"""
    assert transient_overlays(live) == ["/img/a.qcow2.TRANSIENT-virtmount-appliance-saved-1"]
    defined = live.replace(".TRANSIENT-virtmount-appliance-saved-1", "")
    assert transient_overlays(defined) == ["/img/a.qcow2.TRANSIENT-virtmount-appliance-saved-1"]
