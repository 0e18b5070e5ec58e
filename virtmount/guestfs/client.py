"""trio client for guestfsd, speaking the wire protocol over any byte stream.

One background task reads the stream and feeds :class:`DaemonProtocol`;
callers in any number of trio tasks send requests immediately (pipelined,
in serial order, under a send lock) and wait for the reply with their
serial.  The daemon serves calls strictly one at a time, in order.

Usage::

    async with GuestfsClient(stream) as client:      # owns a nursery
        await client.wait_for_launch(120)
        st = await client.lstatns(b"/etc")

or ``client.start(nursery)`` to run the receive task in a nursery you own,
then ``await client.aclose()`` when done.

FileOut caveat (daemon/proto.c): while guestfsd streams FileOut chunks it
polls its input before every chunk and *consumes 4 bytes* if anything is
readable, expecting a cancel flag.  A request pipelined behind a FileOut
call would be corrupted, so after sending a FileOut request no further
bytes are written until that call's transfer has ended.

Timeouts: each call has a deadline (``call_timeout`` or its ``timeout``
argument) covering queueing, sending and waiting.  When it passes, that
call raises :class:`GuestfsTimeout`, the stream is closed and every other
pending call fails with :class:`ConnectionLost` -- the daemon cannot be
interrupted, so the connection is no longer usable.
"""

from __future__ import annotations

import functools
import logging
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Awaitable, Callable, Protocol, TypeVar

import trio

from ..concurrency import gather
from . import procs
from .errors import ConnectionLost, GuestfsError, GuestfsTimeout, ProtocolError
from .procs import Dirent, Proc, Statns, Statvfs, Xattr
from .protocol import (
    DaemonProtocol,
    Event,
    FileChunk,
    FileEnd,
    LaunchFlag,
    NeedData,
    Progress,
    Reply,
    encode_call,
)

__all__ = ["ByteStream", "GuestfsClient"]

log = logging.getLogger(__name__)

R = TypeVar("R")

_RECEIVE_SIZE = 256 * 1024
_CLOSE_GRACE = 5.0


class ByteStream(Protocol):
    """What the client needs from a stream; trio.abc.Stream satisfies it."""

    async def send_all(self, data: bytes) -> None: ...

    async def receive_some(self, max_bytes: int) -> bytes | bytearray: ...

    async def aclose(self) -> None: ...


@dataclass(eq=False)
class _Call:
    """Book-keeping for one request sent and not yet answered."""

    proc: Proc[Any]
    serial: int
    done: trio.Event = field(default_factory=trio.Event)
    payload: bytes | None = None
    error: BaseException | None = None
    chunks: list[bytes] = field(default_factory=list)

    def succeed(self, payload: bytes) -> None:
        if not self.done.is_set():
            self.payload = payload
            self.done.set()

    def fail(self, error: BaseException) -> None:
        if not self.done.is_set():
            self.error = error
            self.done.set()


class GuestfsClient:
    """Pipelined, typed client of one guestfsd connection.

    ``require_launch_flag``: calls first wait for the daemon's launch flag
    (within their own deadline).  Pass False when attaching to a daemon
    that has already sent it.
    """

    def __init__(
        self,
        stream: ByteStream,
        *,
        call_timeout: float = 60.0,
        require_launch_flag: bool = True,
    ) -> None:
        self._stream = stream
        self._call_timeout = call_timeout
        self._require_launch = require_launch_flag
        # Procedures whose OK reply is followed by chunks: the table's, plus
        # any FileOut Proc passed to call().
        self._fileout_numbers: set[int] = set(procs.FILEOUT_NUMBERS)
        self._proto = DaemonProtocol(self._fileout_numbers.__contains__)
        self._pending: dict[int, _Call] = {}
        self._next_serial = 1
        self._send_lock = trio.Lock()
        # Set while a FileOut call is in flight; no bytes may be written.
        self._fileout_gate: trio.Event | None = None
        self._transfer: _Call | None = None
        self._launched = False
        self._launch_wakeup = trio.Event()  # set on launch *or* close
        self._closed: ConnectionLost | None = None
        self._stream_closed = False
        self._recv_scope = trio.CancelScope()
        self._started = False
        self._exit_stack: AsyncExitStack | None = None
        self._probe: dict[str, bool] = {}
        #: The exception that brought the connection down, for diagnostics.
        self.failure: BaseException | None = None
        #: Calls answered so far, and the bytes of their replies (for ``virtmount status``).
        self.calls_done = 0
        self.bytes_received = 0

    @property
    def calls_in_flight(self) -> int:
        """Calls sent (or waiting to be sent) and not answered yet."""
        return len(self._pending)

    # ------------------------------------------------------------------
    # lifecycle

    def start(self, nursery: trio.Nursery) -> None:
        """Run the receive task in ``nursery`` (it never raises)."""
        if self._started:
            raise RuntimeError("GuestfsClient already started")
        self._started = True
        nursery.start_soon(self._receive_loop)

    async def __aenter__(self) -> GuestfsClient:
        stack = AsyncExitStack()
        nursery = await stack.enter_async_context(trio.open_nursery())
        self._exit_stack = stack
        self.start(nursery)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.aclose()
        finally:
            stack, self._exit_stack = self._exit_stack, None
            if stack is not None:
                # The receive task is cancelled by now; exit the nursery
                # without the body's exception so it is not wrapped in an
                # ExceptionGroup, and let it propagate unchanged.
                await stack.aclose()

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def launched(self) -> bool:
        return self._launched

    async def aclose(self) -> None:
        """Close the connection; pending calls fail with ConnectionLost."""
        self._fail_all(ConnectionLost("client closed the connection"))
        self._recv_scope.cancel()
        await self._close_stream()

    async def wait_for_launch(self, timeout: float) -> None:
        """Wait for guestfsd's launch flag (GuestfsTimeout/ConnectionLost)."""
        if not self._launched:
            with trio.move_on_after(timeout):
                await self._launch_wakeup.wait()
        if self._launched:
            return
        if self._closed is not None:
            raise self._lost()
        raise GuestfsTimeout(f"guestfsd did not signal launch within {timeout:g}s")

    # ------------------------------------------------------------------
    # generic call machinery

    async def call(
        self, proc: Proc[R], *args: Any, timeout: float | None = None, **optargs: Any
    ) -> R:
        """Call ``proc`` with positional args and optional args; decode result.

        Raises GuestfsError (daemon error reply), GuestfsTimeout,
        ConnectionLost, ProtocolError (undecodable reply body: only this
        call fails, the stream framing is intact), TypeError/ValueError for
        bad arguments (nothing is sent).
        """
        optvalues = {k: v for k, v in optargs.items() if v is not None}
        args_xdr, bitmask = proc.encode_args(*args, **optvalues)
        payload = await self._roundtrip(proc, args_xdr, bitmask, timeout)
        try:
            return proc.decode_result(payload)
        except ProtocolError as exc:
            raise ProtocolError(f"{proc.name}: undecodable reply: {exc}") from exc

    async def _roundtrip(
        self, proc: Proc[Any], args_xdr: bytes, bitmask: int, timeout: float | None
    ) -> bytes:
        if not self._started:
            raise RuntimeError("use 'async with GuestfsClient(...)' or start(nursery) first")
        if self._closed is not None:
            raise self._lost()
        limit = self._call_timeout if timeout is None else timeout
        deadline = trio.current_time() + limit
        call: _Call | None = None
        with trio.move_on_at(deadline):
            call = await self._send(proc, args_xdr, bitmask, deadline)
            await call.done.wait()
        if call is None or not call.done.is_set():
            error = GuestfsTimeout(f"{proc.name}: no reply within {limit:g}s")
            await self._shutdown(
                ConnectionLost(f"connection closed after {proc.name} timed out ({limit:g}s)"),
                error,
            )
            raise error
        self.calls_done += 1
        if call.error is not None:
            raise call.error
        assert call.payload is not None
        self.bytes_received += len(call.payload)
        return call.payload

    async def _send(
        self, proc: Proc[Any], args_xdr: bytes, bitmask: int, deadline: float
    ) -> _Call:
        if self._require_launch and not self._launched:
            await self._launch_wakeup.wait()
        async with self._send_lock:
            while self._fileout_gate is not None:
                await self._fileout_gate.wait()
            if self._closed is not None:
                raise self._lost()
            serial = self._next_serial
            self._next_serial = (serial + 1) & 0xFFFFFFFF
            message = encode_call(proc.number, serial, args_xdr, bitmask)
            call = _Call(proc, serial)
            self._pending[serial] = call
            if proc.fileout:
                self._fileout_numbers.add(proc.number)
                self._fileout_gate = trio.Event()
            # A half-written message would desynchronise the daemon, so the
            # write is shielded from the caller's cancellation; it is still
            # bounded by the call deadline.
            with trio.CancelScope(shield=True, deadline=deadline):
                try:
                    await self._stream.send_all(message)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    lost = ConnectionLost(f"sending {proc.name} failed: {exc!r}")
                    lost.__cause__ = exc
                    self._fail_all(lost)
                    await self._close_stream()
                    raise lost from exc
            # If the deadline interrupted send_all (scope.cancelled_caught),
            # _roundtrip's timeout path closes the connection.
            return call

    # ------------------------------------------------------------------
    # receive side

    async def _receive_loop(self) -> None:
        try:
            with self._recv_scope:
                try:
                    await self._receive_until_error()
                except ConnectionLost as exc:
                    self._fail_all(exc)
                except ProtocolError as exc:
                    log.warning("guestfsd protocol error: %s", exc)
                    lost = ConnectionLost(f"protocol error: {exc}")
                    lost.__cause__ = exc
                    self._fail_all(lost, exc)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    lost = ConnectionLost(f"connection to guestfsd broken: {exc!r}")
                    lost.__cause__ = exc
                    self._fail_all(lost, exc)
                except Exception as exc:  # a bug here must not hang callers
                    log.exception("unexpected error in guestfsd receive task")
                    lost = ConnectionLost(f"internal error in receive task: {exc!r}")
                    lost.__cause__ = exc
                    self._fail_all(lost, exc)
                await self._close_stream()
        finally:
            if self._closed is None:  # cancelled from outside
                self._fail_all(ConnectionLost("receive task cancelled"))

    async def _receive_until_error(self) -> None:
        while True:
            data = await self._stream.receive_some(_RECEIVE_SIZE)
            if not data:
                raise ConnectionLost("guestfsd closed the connection")
            self._proto.receive_data(data)
            while True:
                event = self._proto.next_event()
                if isinstance(event, NeedData):
                    break
                self._handle(event)

    def _handle(self, event: Event) -> None:
        if isinstance(event, Reply):
            self._handle_reply(event)
        elif isinstance(event, FileChunk):
            if self._transfer is None:
                raise ProtocolError("file chunk without a FileOut call")
            self._transfer.chunks.append(event.data)
        elif isinstance(event, FileEnd):
            call, self._transfer = self._transfer, None
            if call is None:
                raise ProtocolError("end of file without a FileOut call")
            if event.cancelled:
                call.fail(GuestfsError(None, "", "file transfer cancelled by daemon", call.proc.name))
            else:
                call.succeed(b"".join(call.chunks))
            call.chunks = []
            self._open_gate()
        elif isinstance(event, Progress):
            pass  # notifications only; nothing to do
        elif isinstance(event, LaunchFlag):
            if self._launched:
                raise ProtocolError("second launch flag: the daemon restarted")
            self._launched = True
            self._launch_wakeup.set()
        else:  # pragma: no cover - exhaustive
            raise ProtocolError(f"unexpected event {event!r}")

    def _handle_reply(self, reply: Reply) -> None:
        call = self._pending.get(reply.serial)
        if call is None:
            raise ProtocolError(f"reply with unknown serial {reply.serial}")
        if reply.proc != call.proc.number:
            # still pending, so that the protocol error fails it instead of leaving it to its timeout
            raise ProtocolError(
                f"reply for serial {reply.serial} names proc {reply.proc}, "
                f"expected {call.proc.number} ({call.proc.name})"
            )
        del self._pending[reply.serial]
        if reply.error is not None:
            call.fail(
                GuestfsError.from_reply(reply.error.errno_name, reply.error.message, call.proc.name)
            )
            if call.proc.fileout:
                self._open_gate()
        elif call.proc.fileout:
            self._transfer = call  # chunks follow
        else:
            call.succeed(reply.payload)

    # ------------------------------------------------------------------
    # failure handling

    def _open_gate(self) -> None:
        gate, self._fileout_gate = self._fileout_gate, None
        if gate is not None:
            gate.set()

    def _fail_all(self, reason: ConnectionLost, failure: BaseException | None = None) -> None:
        """Mark the connection dead and fail every pending call (sync)."""
        if self._closed is None:
            self._closed = reason
            self.failure = failure if failure is not None else reason
        for call in self._pending.values():
            call.fail(self._lost())
        self._pending.clear()
        if self._transfer is not None:
            self._transfer.fail(self._lost())
            self._transfer = None
        self._open_gate()
        self._launch_wakeup.set()

    def _lost(self) -> ConnectionLost:
        """A fresh ConnectionLost for one caller, chained to the cause."""
        reason = self._closed
        assert reason is not None
        exc = ConnectionLost(str(reason))
        exc.__cause__ = reason.__cause__ if reason.__cause__ is not None else reason
        return exc

    async def _shutdown(self, reason: ConnectionLost, failure: BaseException) -> None:
        self._fail_all(reason, failure)
        self._recv_scope.cancel()
        await self._close_stream()

    async def _close_stream(self) -> None:
        if self._stream_closed:
            return
        self._stream_closed = True
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_CLOSE_GRACE):
                try:
                    await self._stream.aclose()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    pass

    # ------------------------------------------------------------------
    # devices, filesystems, inspection

    async def list_devices(self, *, timeout: float | None = None) -> list[str]:
        return await self.call(procs.LIST_DEVICES, timeout=timeout)

    async def list_partitions(self, *, timeout: float | None = None) -> list[str]:
        return await self.call(procs.LIST_PARTITIONS, timeout=timeout)

    async def lvs(self, *, timeout: float | None = None) -> list[str]:
        return await self.call(procs.LVS, timeout=timeout)

    async def lvm_scan(self, activate: bool, *, timeout: float | None = None) -> None:
        """Find LVM volumes on disks plugged in after the boot (and activate them)."""
        await self.call(procs.LVM_SCAN, activate, timeout=timeout)

    async def list_filesystems(self, *, timeout: float | None = None) -> dict[str, str]:
        """Mountable -> filesystem type ("unknown", "swap", ... included)."""
        return await self.call(procs.LIST_FILESYSTEMS, timeout=timeout)

    async def vfs_type(self, mountable: str, *, timeout: float | None = None) -> str:
        return await self.call(procs.VFS_TYPE, mountable, timeout=timeout)

    async def vfs_uuid(self, mountable: str, *, timeout: float | None = None) -> str:
        return await self.call(procs.VFS_UUID, mountable, timeout=timeout)

    async def vfs_label(self, mountable: str, *, timeout: float | None = None) -> str:
        return await self.call(procs.VFS_LABEL, mountable, timeout=timeout)

    async def blockdev_getsize64(self, device: str, *, timeout: float | None = None) -> int:
        return await self.call(procs.BLOCKDEV_GETSIZE64, device, timeout=timeout)

    async def inspect_os(self, *, timeout: float | None = None) -> list[str]:
        return await self.call(procs.INSPECT_OS, timeout=timeout)

    async def inspect_get_roots(self, *, timeout: float | None = None) -> list[str]:
        return await self.call(procs.INSPECT_GET_ROOTS, timeout=timeout)

    async def inspect_get_type(self, root: str, *, timeout: float | None = None) -> str:
        return await self.call(procs.INSPECT_GET_TYPE, root, timeout=timeout)

    async def inspect_get_distro(self, root: str, *, timeout: float | None = None) -> str:
        return await self.call(procs.INSPECT_GET_DISTRO, root, timeout=timeout)

    async def inspect_get_product_name(self, root: str, *, timeout: float | None = None) -> str:
        return await self.call(procs.INSPECT_GET_PRODUCT_NAME, root, timeout=timeout)

    async def inspect_get_major_version(self, root: str, *, timeout: float | None = None) -> int:
        return await self.call(procs.INSPECT_GET_MAJOR_VERSION, root, timeout=timeout)

    async def inspect_get_minor_version(self, root: str, *, timeout: float | None = None) -> int:
        return await self.call(procs.INSPECT_GET_MINOR_VERSION, root, timeout=timeout)

    async def inspect_get_arch(self, root: str, *, timeout: float | None = None) -> str:
        return await self.call(procs.INSPECT_GET_ARCH, root, timeout=timeout)

    async def inspect_get_hostname(self, root: str, *, timeout: float | None = None) -> str:
        return await self.call(procs.INSPECT_GET_HOSTNAME, root, timeout=timeout)

    async def inspect_get_mountpoints(
        self, root: str, *, timeout: float | None = None
    ) -> dict[str, str]:
        """Guest mount point -> mountable."""
        return await self.call(procs.INSPECT_GET_MOUNTPOINTS, root, timeout=timeout)

    async def inspect_get_filesystems(
        self, root: str, *, timeout: float | None = None
    ) -> list[str]:
        return await self.call(procs.INSPECT_GET_FILESYSTEMS, root, timeout=timeout)

    # ------------------------------------------------------------------
    # mounting and lifecycle of the daemon

    async def mount(
        self, mountable: str, mountpoint: bytes | str, *, timeout: float | None = None
    ) -> None:
        await self.call(procs.MOUNT, mountable, mountpoint, timeout=timeout)

    async def mount_ro(
        self, mountable: str, mountpoint: bytes | str, *, timeout: float | None = None
    ) -> None:
        await self.call(procs.MOUNT_RO, mountable, mountpoint, timeout=timeout)

    async def mount_options(
        self,
        options: str,
        mountable: str,
        mountpoint: bytes | str,
        *,
        timeout: float | None = None,
    ) -> None:
        await self.call(procs.MOUNT_OPTIONS, options, mountable, mountpoint, timeout=timeout)

    async def mount_vfs(
        self,
        options: str,
        vfstype: str,
        mountable: str,
        mountpoint: bytes | str,
        *,
        timeout: float | None = None,
    ) -> None:
        await self.call(
            procs.MOUNT_VFS, options, vfstype, mountable, mountpoint, timeout=timeout
        )

    async def mkmountpoint(self, exemptpath: bytes | str, *, timeout: float | None = None) -> None:
        await self.call(procs.MKMOUNTPOINT, exemptpath, timeout=timeout)

    async def rmmountpoint(self, exemptpath: bytes | str, *, timeout: float | None = None) -> None:
        await self.call(procs.RMMOUNTPOINT, exemptpath, timeout=timeout)

    async def umount(
        self,
        pathordevice: bytes | str,
        *,
        force: bool | None = None,
        lazyunmount: bool | None = None,
        timeout: float | None = None,
    ) -> None:
        await self.call(
            procs.UMOUNT, pathordevice, force=force, lazyunmount=lazyunmount, timeout=timeout
        )

    async def umount_all(self, *, timeout: float | None = None) -> None:
        await self.call(procs.UMOUNT_ALL, timeout=timeout)

    async def sync(self, *, timeout: float | None = None) -> None:
        await self.call(procs.SYNC, timeout=timeout)

    async def internal_autosync(self, *, timeout: float | None = None) -> None:
        """umount_all (unless guestfsd ran with -r) then sync the disks."""
        await self.call(procs.INTERNAL_AUTOSYNC, timeout=timeout)

    async def internal_exit(self, *, timeout: float | None = None) -> None:
        """guestfsd replies, then exits; the appliance /init syncs and reboots."""
        await self.call(procs.INTERNAL_EXIT, timeout=timeout)

    async def ping_daemon(self, *, timeout: float | None = None) -> None:
        await self.call(procs.PING_DAEMON, timeout=timeout)

    async def measure_round_trip(self, *, timeout: float | None = None) -> float:
        """Seconds for one ping_daemon round trip (needs no mounted root)."""
        start = trio.current_time()
        await self.ping_daemon(timeout=timeout)
        return trio.current_time() - start

    async def exit_daemon(self, *, timeout: float | None = None) -> None:
        """Clean shutdown: internal_autosync, internal_exit, close the stream.

        Errors of the two calls are logged, not raised; the connection is
        closed in every case.  With libguestfs' libvirt domain XML
        (on_reboot=destroy) the appliance's "reboot -f" ends the domain.
        """
        try:
            for proc in (procs.INTERNAL_AUTOSYNC, procs.INTERNAL_EXIT):
                try:
                    await self.call(proc, timeout=timeout)
                except GuestfsError as exc:
                    log.warning("%s failed during shutdown: %s", proc.name, exc)
        except (ConnectionLost, GuestfsTimeout, ProtocolError) as exc:
            log.warning("daemon shutdown incomplete: %s", exc)
        finally:
            await self.aclose()

    # ------------------------------------------------------------------
    # metadata

    async def lstatns(self, path: bytes | str, *, timeout: float | None = None) -> Statns:
        return await self.call(procs.LSTATNS, path, timeout=timeout)

    async def statns(self, path: bytes | str, *, timeout: float | None = None) -> Statns:
        return await self.call(procs.STATNS, path, timeout=timeout)

    async def internal_lstatnslist(
        self, path: bytes | str, names: list[bytes], *, timeout: float | None = None
    ) -> list[Statns]:
        """Raw call; entries for names that could not be stat'ed have st_ino -1."""
        return await self.call(procs.INTERNAL_LSTATNSLIST, path, names, timeout=timeout)

    async def _in_batches(
        self,
        call: Callable[[list[bytes]], Awaitable[list[R]]],
        names: list[bytes],
        what: str,
    ) -> list[R]:
        """Run a list call over ``names`` in batches of LIST_BATCH, all sent ahead, results in order."""
        batches = [names[start : start + procs.LIST_BATCH] for start in range(0, len(names), procs.LIST_BATCH)]

        async def run(batch: list[bytes]) -> list[R]:
            result = await call(batch)
            if len(result) != len(batch):
                raise ProtocolError(f"{what}: {len(result)} results for {len(batch)} names")
            return result

        results = await gather(*(functools.partial(run, batch) for batch in batches))
        return [item for batch in results for item in batch]

    async def lstatnslist(
        self, path: bytes | str, names: list[bytes], *, timeout: float | None = None
    ) -> list[Statns | None]:
        """lstat each name in directory ``path``; None where it failed."""
        stats = await self._in_batches(
            lambda batch: self.internal_lstatnslist(path, batch, timeout=timeout), names, "internal_lstatnslist"
        )
        return [None if st.st_ino == -1 else st for st in stats]

    async def internal_lxattrlist(
        self, path: bytes | str, names: list[bytes], *, timeout: float | None = None
    ) -> list[Xattr]:
        """Raw flat reply (see procs.split_lxattrlist for its layout)."""
        return await self.call(procs.INTERNAL_LXATTRLIST, path, names, timeout=timeout)

    async def lxattrlist(
        self, path: bytes | str, names: list[bytes], *, timeout: float | None = None
    ) -> list[list[Xattr] | None]:
        """Extended attributes of each name (no symlink following); None on error."""

        async def grouped(batch: list[bytes]) -> list[list[Xattr] | None]:
            return procs.split_lxattrlist(await self.internal_lxattrlist(path, batch, timeout=timeout), len(batch))

        return await self._in_batches(grouped, names, "internal_lxattrlist")

    async def internal_readlinklist(
        self, path: bytes | str, names: list[bytes], *, timeout: float | None = None
    ) -> list[bytes]:
        return await self.call(procs.INTERNAL_READLINKLIST, path, names, timeout=timeout)

    async def readlinklist(
        self, path: bytes | str, names: list[bytes], *, timeout: float | None = None
    ) -> list[bytes]:
        """Symlink targets of each name; b"" where it is not a link or failed."""
        return await self._in_batches(
            lambda batch: self.internal_readlinklist(path, batch, timeout=timeout), names, "internal_readlinklist"
        )

    async def readlink(self, path: bytes | str, *, timeout: float | None = None) -> bytes:
        return await self.call(procs.READLINK, path, timeout=timeout)

    async def statvfs(self, path: bytes | str, *, timeout: float | None = None) -> Statvfs:
        return await self.call(procs.STATVFS, path, timeout=timeout)

    async def lgetxattr(
        self, path: bytes | str, name: bytes | str, *, timeout: float | None = None
    ) -> bytes:
        return await self.call(procs.LGETXATTR, path, name, timeout=timeout)

    async def lgetxattrs(self, path: bytes | str, *, timeout: float | None = None) -> list[Xattr]:
        return await self.call(procs.LGETXATTRS, path, timeout=timeout)

    async def llistxattr(self, path: bytes | str, *, timeout: float | None = None) -> list[bytes]:
        """Attribute names without following symlinks.

        guestfsd has no listxattr-only call; this uses lgetxattrs.
        """
        return [x.name for x in await self.lgetxattrs(path, timeout=timeout)]

    async def is_dir(
        self,
        path: bytes | str,
        *,
        followsymlinks: bool | None = None,
        timeout: float | None = None,
    ) -> bool:
        return await self.call(
            procs.IS_DIR, path, followsymlinks=followsymlinks, timeout=timeout
        )

    async def is_file(
        self,
        path: bytes | str,
        *,
        followsymlinks: bool | None = None,
        timeout: float | None = None,
    ) -> bool:
        return await self.call(
            procs.IS_FILE, path, followsymlinks=followsymlinks, timeout=timeout
        )

    async def is_symlink(self, path: bytes | str, *, timeout: float | None = None) -> bool:
        return await self.call(procs.IS_SYMLINK, path, timeout=timeout)

    async def exists(self, path: bytes | str, *, timeout: float | None = None) -> bool:
        return await self.call(procs.EXISTS, path, timeout=timeout)

    # ------------------------------------------------------------------
    # directories and data

    async def _call_probed(
        self,
        newer: Proc[R],
        older: Proc[R],
        *args: Any,
        timeout: float | None = None,
    ) -> R:
        """Try ``newer``; if the daemon lacks it, remember that and use ``older``."""
        if self._probe.get(newer.name) is not False:
            try:
                result = await self.call(newer, *args, timeout=timeout)
            except GuestfsError as exc:
                if not exc.is_unknown_procedure:
                    raise
                log.debug("guestfsd lacks %s, falling back to %s", newer.name, older.name)
                self._probe[newer.name] = False
            else:
                self._probe[newer.name] = True
                return result
        return await self.call(older, *args, timeout=timeout)

    def supports(self, proc_name: str) -> bool | None:
        """Probe result for a procedure: True, False, or None if not tried."""
        return self._probe.get(proc_name)

    async def readdir(self, dir: bytes | str, *, timeout: float | None = None) -> list[Dirent]:
        """Directory entries including . and ..; internal_readdir or readdir. A listing too large for
        one readdir reply (4 MiB: ~100,000 names of 24 bytes) comes from ls0: names only, their type
        ``u`` (unknown) and inode number -1, without . and .."""
        try:
            return await self._call_probed(procs.INTERNAL_READDIR, procs.READDIR, dir, timeout=timeout)
        except GuestfsError as exc:
            if not exc.is_reply_too_large:
                raise
        log.debug("readdir %r: the listing is too large for one reply; listing names with ls0", dir)
        return [Dirent(-1, "u", name) for name in await self.call(procs.LS0, dir, timeout=timeout)]

    async def internal_readdir(
        self, dir: bytes | str, *, timeout: float | None = None
    ) -> list[Dirent]:
        """FileOut readdir (libguestfs >= 1.49.1); not in 1.48.6."""
        return await self.call(procs.INTERNAL_READDIR, dir, timeout=timeout)

    async def legacy_readdir(
        self, dir: bytes | str, *, timeout: float | None = None
    ) -> list[Dirent]:
        """Proc 138 readdir (libguestfs <= 1.48.x); one reply, 4 MiB limit."""
        return await self.call(procs.READDIR, dir, timeout=timeout)

    async def debug_sh(self, command: bytes, *, timeout: float | None = None) -> bytes:
        """Run ``command`` with /bin/sh -c in the appliance ($root: the sysroot); its output."""
        return await self.call(procs.DEBUG, "sh", [command], timeout=timeout)

    async def download(self, path: bytes | str, *, timeout: float | None = None) -> bytes:
        """The whole content of the file ``path``, streamed (no 4 MiB reply limit)."""
        return await self.call(procs.DOWNLOAD, path, timeout=timeout)

    async def pread(
        self, path: bytes | str, count: int, offset: int, *, timeout: float | None = None
    ) -> bytes:
        """Up to ``count`` bytes at ``offset`` (one pread(2); may be short)."""
        return await self.call(procs.PREAD, path, min(count, procs.PREAD_MAX), offset, timeout=timeout)

    async def pread_device(
        self, device: str, count: int, offset: int, *, timeout: float | None = None
    ) -> bytes:
        return await self.call(
            procs.PREAD_DEVICE, device, min(count, procs.PREAD_MAX), offset, timeout=timeout
        )

    # ------------------------------------------------------------------
    # writing (each call acts on one path, as the daemon's calls do)

    async def pwrite(self, path: bytes, content: bytes, offset: int, *, timeout: float | None = None) -> int:
        """Write ``content`` at ``offset`` (one pwrite(2): the count written may be short)."""
        return await self.call(procs.PWRITE, path, content, offset, timeout=timeout)

    async def truncate_size(self, path: bytes, size: int, *, timeout: float | None = None) -> None:
        await self.call(procs.TRUNCATE_SIZE, path, size, timeout=timeout)

    async def mknod(self, mode: int, major: int, minor: int, path: bytes, *, timeout: float | None = None) -> None:
        await self.call(procs.MKNOD, mode, major, minor, path, timeout=timeout)

    async def mkdir_mode(self, path: bytes, mode: int, *, timeout: float | None = None) -> None:
        await self.call(procs.MKDIR_MODE, path, mode, timeout=timeout)

    async def rm(self, path: bytes, *, timeout: float | None = None) -> None:
        await self.call(procs.RM, path, timeout=timeout)

    async def rmdir(self, path: bytes, *, timeout: float | None = None) -> None:
        await self.call(procs.RMDIR, path, timeout=timeout)

    async def rename(self, old: bytes, new: bytes, *, timeout: float | None = None) -> None:
        await self.call(procs.RENAME, old, new, timeout=timeout)

    async def ln(self, target: bytes, linkname: bytes, *, timeout: float | None = None) -> None:
        await self.call(procs.LN, target, linkname, timeout=timeout)

    async def ln_s(self, target: bytes, linkname: bytes, *, timeout: float | None = None) -> None:
        await self.call(procs.LN_S, target, linkname, timeout=timeout)

    async def chmod(self, mode: int, path: bytes, *, timeout: float | None = None) -> None:
        await self.call(procs.CHMOD, mode, path, timeout=timeout)

    async def lchown(self, owner: int, group: int, path: bytes, *, timeout: float | None = None) -> None:
        await self.call(procs.LCHOWN, owner, group, path, timeout=timeout)

    async def utimens(self, path: bytes, atime: tuple[int, int], mtime: tuple[int, int], *,
                      timeout: float | None = None) -> None:
        """Set (seconds, nanoseconds) times without following a symlink; nanoseconds -1: now, -2: unchanged."""
        await self.call(procs.UTIMENS, path, *atime, *mtime, timeout=timeout)

    async def lsetxattr(self, name: bytes, value: bytes, path: bytes, *, timeout: float | None = None) -> None:
        await self.call(procs.LSETXATTR, name, value, len(value), path, timeout=timeout)

    async def lremovexattr(self, name: bytes, path: bytes, *, timeout: float | None = None) -> None:
        await self.call(procs.LREMOVEXATTR, name, path, timeout=timeout)

    async def umask(self, mask: int, *, timeout: float | None = None) -> int:
        """Set the daemon's umask (new files' modes are exactly those asked for with 0); returns the old one."""
        return await self.call(procs.UMASK, mask, timeout=timeout)
