"""One running libguestfs appliance: boot it as a libvirt domain beside a guest, talk to it, shut it down.

The appliance domain is created paused with auto-destroy (so a killed client
leaves nothing running), its console and daemon channel are opened through
the libvirt connection, and only then is it resumed, so neither the boot log
nor the daemon's launch flag can be missed.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass
from typing import Literal
from xml.etree import ElementTree as ET

import libvirt
import trio

from .errors import VirtmountError
from .guestfs.client import GuestfsClient
from .guestfs.errors import ConnectionLost, GuestfsClientError, GuestfsTimeout
from .inspection_cache import disks_identity
from .virt.connection import libvirt_message, run_blocking
from .virt.console import ConsoleLog
from .virt.domainxml import (
    APPLIANCE_NAME_PREFIX,
    DAEMON_CHANNEL,
    ApplianceSpec,
    build_appliance_xml,
    read_guest_definition,
)
from .virt.provision import HostAppliance
from .virt.stream import LibvirtByteStream

log = logging.getLogger(__name__)

Accelerator = Literal["auto", "kvm", "tcg"]
ACCELERATORS: tuple[Accelerator, ...] = ("auto", "kvm", "tcg")

_SHUTDOWN_SYNC_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ApplianceSettings:
    """How appliances are booted; every field is a user setting (see ``virtmount --help``)."""

    accelerator: Accelerator = "auto"
    memory_mib: int = 1024
    vcpus: int = 1
    boot_timeout: float = 300.0
    call_timeout: float = 120.0
    pool: str = "virtmount"
    writable: bool = False
    verbose: bool = False
    extra_kernel_args: str = ""


class GuestNotFound(VirtmountError):
    """No domain of that name on the connection."""


class GuestUnavailable(VirtmountError):
    """The guest cannot be read now (e.g. it is running)."""


class BootFailed(VirtmountError):
    """The appliance domain could not be created or its daemon never answered."""


# Per connection URI: the accelerator that worked, so "auto" probes KVM once per process.
_accelerator_that_worked: dict[str, str] = {}


def _domain_types_to_try(conn_uri: str, accelerator: Accelerator, host_has_kvm: bool) -> list[str]:
    if accelerator == "kvm":
        return ["kvm"]
    if accelerator == "tcg":
        return ["qemu"]
    if conn_uri in _accelerator_that_worked:
        return [_accelerator_that_worked[conn_uri]]
    return ["kvm", "qemu"] if host_has_kvm else ["qemu"]


def _host_has_kvm(conn: libvirt.virConnect) -> bool:
    try:
        conn.getDomainCapabilities(None, "x86_64", None, "kvm", 0)
    except libvirt.libvirtError:
        return False
    return True


def _appliance_name(guest_name: str) -> str:
    return f"{APPLIANCE_NAME_PREFIX}{guest_name}-{os.getpid()}-{secrets.token_hex(3)}"


def _uses_embedded_driver(conn: libvirt.virConnect) -> bool:
    return conn.getURI().startswith("qemu:///embed")


async def _lookup_guest(conn: libvirt.virConnect, guest_name: str) -> libvirt.virDomain:
    try:
        domain = await run_blocking(conn.lookupByName, guest_name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise GuestNotFound(f"no domain named {guest_name!r} on {conn.getURI()}") from None
        raise VirtmountError(f"cannot look up domain {guest_name!r}: {libvirt_message(exc)}") from None
    if await run_blocking(domain.isActive):
        raise GuestUnavailable(
            f"domain {guest_name!r} is running; virtmount reads shut-off domains only for now"
        )
    return domain


class Appliance:
    """A booted appliance domain and the client of its daemon."""

    def __init__(self, guest_name: str, domain: libvirt.virDomain, client: GuestfsClient, console: ConsoleLog) -> None:
        self.guest_name = guest_name
        self.domain = domain
        self.client = client
        self.console = console
        self.boot_seconds = 0.0
        self.disks_key = ""  # identifies the guest's disk set (inspection_cache.disks_identity)

    async def shutdown(self) -> None:
        """Sync and unmount inside the appliance, then destroy its domain; never raises."""
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_SHUTDOWN_SYNC_TIMEOUT_S):
                try:
                    await self.client.internal_autosync()
                except GuestfsClientError as exc:
                    log.warning("appliance for %s: final sync failed: %s", self.guest_name, exc)
            await self.client.aclose()
            await _destroy_quietly(self.domain)


async def _destroy_quietly(domain: libvirt.virDomain) -> None:
    try:
        await trio.to_thread.run_sync(domain.destroy)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
            log.warning("could not destroy appliance domain: %s", libvirt_message(exc))


async def boot_appliance(
    conn: libvirt.virConnect,
    guest_name: str,
    host_appliance: HostAppliance,
    settings: ApplianceSettings,
    nursery: trio.Nursery,
) -> Appliance:
    """Boot an appliance holding ``guest_name``'s disks and wait until its daemon answers.

    Background tasks (the daemon client's reader, the console reader) run in
    ``nursery``; ``Appliance.shutdown`` ends them.
    """
    guest = await _lookup_guest(conn, guest_name)
    definition = read_guest_definition(await run_blocking(guest.XMLDesc, 0))
    uri = await run_blocking(conn.getURI)
    domain_types = _domain_types_to_try(uri, settings.accelerator, await run_blocking(_host_has_kvm, conn))
    failure: BootFailed | None = None
    for attempt, domain_type in enumerate(domain_types):
        spec = ApplianceSpec(
            name=_appliance_name(guest_name),
            guest=definition,
            kernel_path=host_appliance.kernel_path,
            initrd_path=host_appliance.initrd_path,
            root_path=host_appliance.root_path,
            root_uuid=host_appliance.root_uuid,
            domain_type=domain_type,
            memory_mib=settings.memory_mib,
            vcpus=settings.vcpus,
            writable=settings.writable,
            verbose=settings.verbose,
            extra_kernel_args=settings.extra_kernel_args,
        )
        try:
            appliance = await _boot_once(conn, spec, settings, nursery)
        except BootFailed as exc:
            failure = exc
            if attempt + 1 < len(domain_types):
                log.info("appliance for %s: %s; trying %s", guest_name, exc, domain_types[attempt + 1])
            continue
        _accelerator_that_worked[uri] = domain_type
        appliance.disks_key = disks_identity(
            uri, await run_blocking(guest.UUIDString), [ET.tostring(disk, encoding="unicode") for disk in definition.disks]
        )
        return appliance
    assert failure is not None
    raise failure


# Most telling first: the line that names why a boot failed.
_TELLING_CONSOLE_WORDS = ("kernel panic", "error", "failed", "not found", "cannot")


def _console_summary(console: ConsoleLog) -> str:
    """The telling console lines of a failed boot: the one naming the failure, and the very last."""
    tail = console.tail(40)
    if not tail:
        return "; the console printed nothing"
    shown = [tail[-1]]
    for word in _TELLING_CONSOLE_WORDS:
        telling = [line for line in tail if word in line.lower()]
        if telling:
            if telling[-1] != tail[-1]:
                shown.insert(0, telling[-1])
            break
    return f"; last console lines: {' | '.join(shown)}"


async def _boot_once(
    conn: libvirt.virConnect, spec: ApplianceSpec, settings: ApplianceSettings, nursery: trio.Nursery
) -> Appliance:
    accel = "KVM" if spec.domain_type == "kvm" else "TCG"
    what = f"appliance for {spec.guest.name} ({accel})"
    flags = libvirt.VIR_DOMAIN_START_PAUSED
    if not _uses_embedded_driver(conn):
        flags |= libvirt.VIR_DOMAIN_START_AUTODESTROY
    started = time.monotonic()
    try:
        domain = await run_blocking(conn.createXML, build_appliance_xml(spec), flags)
    except libvirt.libvirtError as exc:
        raise BootFailed(f"cannot start {what}: {libvirt_message(exc)}") from None

    console = ConsoleLog(spec.name)
    client: GuestfsClient | None = None
    try:
        console_stream = console.attach(conn, domain)
        nursery.start_soon(console.collect, console_stream)
        raw_channel = LibvirtByteStream.new_stream(conn)
        await run_blocking(domain.openChannel, DAEMON_CHANNEL, raw_channel, 0)
        channel = LibvirtByteStream(raw_channel, f"daemon channel of {spec.name}")
        channel.start()
        client = GuestfsClient(channel, call_timeout=settings.call_timeout)
        client.start(nursery)
        await run_blocking(domain.resume)
        await client.wait_for_launch(settings.boot_timeout)
    except (libvirt.libvirtError, GuestfsTimeout, ConnectionLost) as exc:
        if isinstance(exc, libvirt.libvirtError):
            reason = libvirt_message(exc)
        elif isinstance(exc, GuestfsTimeout):
            reason = f"its daemon did not answer within {settings.boot_timeout:.0f} s"
        else:
            reason = "it stopped before its daemon answered"
        if client is not None:
            await client.aclose()
        await _destroy_quietly(domain)
        await trio.sleep(0.2)  # let the console reader take the last output
        last = _console_summary(console)
        raise BootFailed(f"{what} failed to boot: {reason}{last}") from None
    except BaseException:
        with trio.CancelScope(shield=True):
            if client is not None:
                await client.aclose()
            await _destroy_quietly(domain)
        raise
    appliance = Appliance(spec.guest.name, domain, client, console)
    appliance.boot_seconds = time.monotonic() - started
    log.info("%s booted in %.1f s as %s", what, appliance.boot_seconds, spec.name)
    return appliance
