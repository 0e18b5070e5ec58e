"""Which accelerator appliances boot with on a host, decided in seconds and remembered across processes.

``/dev/kvm`` and libvirt's ``kvm`` domain type do not prove that KVM runs guests: on some hosts
QEMU aborts at once, on others the guest spins at 100% CPU without ever printing a console line.
A KVM boot therefore gets a short window for its first console output (the appliance's kernel
command line turns on early console output, see ``domainxml.kernel_command_line``): a working
KVM prints within a fraction of a second, a TCG boot here within ~3.5 s. A silent KVM appliance
is destroyed when the window closes and ``auto`` goes on with TCG.

The outcome is a *verdict*, kept in a small file per host identity (libvirt URI, host name,
libvirt and QEMU versions, host CPU and microcode, the host kernel where the connection is local,
the emulator): later processes go straight to the accelerator that works, and any change to those
makes the next boot test KVM again. (libvirt reports no kernel version of a remote host, and its
host UUID is random per daemon start on hosts without SMBIOS data, so neither is part of it.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal
from xml.etree import ElementTree as ET

import libvirt

from .cachedir import cache_dir
from .virt.connection import run_blocking

log = logging.getLogger(__name__)

Accelerator = Literal["auto", "kvm", "tcg"]
ACCELERATORS: tuple[Accelerator, ...] = ("auto", "kvm", "tcg")
KVM, TCG = "kvm", "qemu"  # libvirt domain types

# A KVM appliance that printed nothing on its console this long after it was resumed is not booting.
KVM_FIRST_OUTPUT_WINDOW_S = 10.0
_LOOPBACK_HOSTS = {"", "localhost", "127.0.0.1", "::1"}


@dataclass(frozen=True)
class HostIdentity:
    """What a verdict about KVM depends on; any change means KVM is tried again."""

    uri: str
    hostname: str
    libvirt_version: int
    qemu_version: int
    cpu: str  # vendor, model, signature and microcode version from libvirt's host capabilities
    kernel: str  # the host kernel release when the connection is local; libvirt does not report it
    emulator: str  # -o emulator, "" for libvirt's default

    def key(self) -> str:
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _host_cpu(capabilities: ET.Element) -> str:
    cpu = capabilities.find("./host/cpu")
    if cpu is None:
        return ""
    signature = cpu.find("signature")
    microcode = cpu.find("microcode")
    parts = [cpu.findtext("vendor") or "", cpu.findtext("model") or "",
             "" if signature is None else "/".join(signature.get(a, "") for a in ("family", "model", "stepping")),
             "" if microcode is None else microcode.get("version", "")]
    return " ".join(parts)


def is_local_uri(uri: str) -> bool:
    """Whether a libvirt URI names this machine (no host, or a loopback address)."""
    return (urllib.parse.urlsplit(uri).hostname or "") in _LOOPBACK_HOSTS


async def host_identity(conn: libvirt.virConnect, emulator: str) -> HostIdentity:
    uri = await run_blocking(conn.getURI)
    capabilities = ET.fromstring(await run_blocking(conn.getCapabilities))
    return HostIdentity(
        uri=uri,
        hostname=await run_blocking(conn.getHostname),
        libvirt_version=await run_blocking(conn.getLibVersion),
        qemu_version=await run_blocking(conn.getVersion),
        cpu=_host_cpu(capabilities),
        kernel=os.uname().release if is_local_uri(uri) else "",
        emulator=emulator,
    )


@dataclass(frozen=True)
class Verdict:
    """The accelerator that boots appliances on a host, and why KVM is not it (when it is not)."""

    domain_type: str  # KVM or TCG
    kvm_failure: str = ""
    decided_at: float = field(default_factory=time.time)


def default_directory() -> Path:
    """$XDG_CACHE_HOME/virtmount/accelerators, or ~/.cache/virtmount/accelerators."""
    return cache_dir() / "accelerators"


class VerdictStore:
    """One JSON file per host identity; an unreadable file counts as no verdict."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or default_directory()

    def _path(self, host: HostIdentity) -> Path:
        return self.directory / f"{host.key()}.json"

    def load(self, host: HostIdentity) -> Verdict | None:
        try:
            data = json.loads(self._path(host).read_text())
            verdict = Verdict(str(data["domain_type"]), str(data["kvm_failure"]), float(data["decided_at"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return verdict if verdict.domain_type in (KVM, TCG) else None

    def store(self, host: HostIdentity, verdict: Verdict) -> None:
        """Write atomically; a cache that cannot be written costs a KVM test per process, nothing more."""
        path = self._path(host)
        record = {**asdict(verdict), "host": asdict(host)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(record, indent=1, sort_keys=True))
            os.replace(temporary, path)
        except OSError as exc:
            log.warning("cannot remember the accelerator verdict in %s: %s", path, exc)


_told: set[str] = set()  # host identities whose remembered verdict this process has logged
_REASON_SHOWN = 200


_QEMU_ERROR = re.compile(r"qemu-system-\w+: error: (.+?)(?= qemu-system-\w+:|$)")


def _shortened(reason: str) -> str:
    """Why KVM failed, in a few words: QEMU's own error when libvirt passes its log on."""
    if match := _QEMU_ERROR.search(reason):
        return f"QEMU: {match.group(1).strip()}"
    return reason if len(reason) <= _REASON_SHOWN else reason[:_REASON_SHOWN - 1] + "…"


def accelerator_name(domain_type: str) -> str:
    """How users call the accelerator of a libvirt domain type ("" for none, e.g. a guest's own daemon)."""
    return {KVM: "KVM", TCG: "TCG"}.get(domain_type, "")


def _host_has_kvm(conn: libvirt.virConnect) -> bool:
    try:
        conn.getDomainCapabilities(None, "x86_64", None, KVM, 0)
    except libvirt.libvirtError:
        return False
    return True


class AcceleratorPlan:
    """The domain types one boot tries, in order, and what the outcome teaches about the host.

    ``auto`` tries KVM first unless the host's verdict says TCG (or libvirt offers no KVM);
    ``kvm`` and ``tcg`` try only that. Report each attempt with ``failed``/``worked``.
    """

    def __init__(self, host: HostIdentity, accelerator: Accelerator, host_has_kvm: bool,
                 verdicts: VerdictStore) -> None:
        self.host = host
        self._verdicts = verdicts
        self._auto = accelerator == "auto"
        self._kvm_failure = ""
        self.remembered = verdicts.load(host) if self._auto else None
        if accelerator == "kvm":
            self.domain_types = [KVM]
        elif accelerator == "tcg" or not host_has_kvm:
            self.domain_types = [TCG]
        elif self.remembered is not None and self.remembered.domain_type == TCG:
            self.domain_types = [TCG]
            if host.key() not in _told:
                _told.add(host.key())
                log.info("using TCG on %s: KVM did not start appliances there (%s; remembered in %s)",
                         host.hostname, _shortened(self.remembered.kvm_failure), verdicts.directory)
        else:
            self.domain_types = [KVM, TCG]

    def first_output_window(self, domain_type: str) -> float | None:
        """How long a boot under ``domain_type`` may stay silent before it counts as not booting."""
        return KVM_FIRST_OUTPUT_WINDOW_S if domain_type == KVM else None

    def failed(self, domain_type: str, reason: str, *, silent: bool = False) -> None:
        """A boot under ``domain_type`` failed. KVM is not tried again in this plan when TCG remains.
        ``silent``: the appliance printed nothing in its window, which says KVM does not run guests
        here whatever becomes of TCG, so ``auto`` remembers TCG at once."""
        if domain_type != KVM:
            return
        self._kvm_failure = reason
        if TCG in self.domain_types:
            self.domain_types = [TCG]
        if silent:
            self._remember_kvm_failure()

    def worked(self, domain_type: str) -> None:
        """Remember the verdict when ``auto`` learnt something new."""
        if domain_type == TCG and self._kvm_failure:
            self._remember_kvm_failure()
        elif domain_type == KVM and (self.remembered is None or self.remembered.domain_type != KVM):
            self._remember(Verdict(KVM))

    def _remember_kvm_failure(self) -> None:
        """TCG from now on, with why KVM failed (logged once: later processes read the verdict)."""
        if self._auto:
            log.warning("KVM does not start appliances on %s (%s); using TCG",
                        self.host.hostname, _shortened(self._kvm_failure))
            self._remember(Verdict(TCG, self._kvm_failure))
        self._kvm_failure = ""

    def _remember(self, verdict: Verdict) -> None:
        if self._auto:
            self._verdicts.store(self.host, verdict)
            self.remembered = self._verdicts.load(self.host)


async def plan_accelerators(conn: libvirt.virConnect, accelerator: Accelerator, emulator: str,
                            verdicts: VerdictStore | None = None) -> AcceleratorPlan:
    host = await host_identity(conn, emulator)
    return AcceleratorPlan(host, accelerator, await run_blocking(_host_has_kvm, conn), verdicts or VerdictStore())
