"""Shared helpers for acceptance tests: running the CLI, and looking for appliance domains."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import libvirt

from virtmount.virt.domainxml import APPLIANCE_NAME_PREFIX, appliance_guest_name, appliance_owner

REPO = Path(__file__).resolve().parents[2]
VIRTMOUNT = str(Path(sys.executable).parent / "virtmount")


def run_virtmount(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VIRTMOUNT, *args], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def appliance_domains(uri: str = "qemu:///system") -> list[str]:
    """Names of the appliance domains that exist now (running or not)."""
    conn = libvirt.open(uri)
    try:
        return [d.name() for d in conn.listAllDomains(0) if d.name().startswith(APPLIANCE_NAME_PREFIX)]
    finally:
        conn.close()


def appliances_of(pid: int, uri: str = "qemu:///system") -> list[str]:
    """Names of the appliance domains the process ``pid`` runs (their metadata names the owner)."""
    conn = libvirt.open(uri)
    try:
        owned = []
        for domain in conn.listAllDomains(0):
            try:
                if domain.name().startswith(APPLIANCE_NAME_PREFIX) and appliance_owner(domain.XMLDesc(0)) == str(pid):
                    owned.append(domain.name())
            except libvirt.libvirtError:
                pass  # ended while we looked
        return owned
    finally:
        conn.close()


def appliances_serving(guest: str, pid: int, uri: str = "qemu:///system") -> list[str]:
    """Names of the appliance domains that the process ``pid`` runs for ``guest`` (a restored one is
    named after its saved appliance, so its metadata tells)."""
    conn = libvirt.open(uri)
    try:
        serving = []
        for name in appliances_of(pid, uri):
            try:
                if appliance_guest_name(conn.lookupByName(name).XMLDesc(0)) == guest:
                    serving.append(name)
            except libvirt.libvirtError:
                pass  # ended while we looked
        return serving
    finally:
        conn.close()


def wait_for_no_appliances(uri: str = "qemu:///system", timeout: float = 60) -> list[str]:
    """Wait until no appliance domain exists; return those still there at the deadline."""
    deadline = time.monotonic() + timeout
    while (left := appliance_domains(uri)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode != 0, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("virtmount: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def mount_foreground(uri: str, mountpoint: Path, *options: str) -> subprocess.Popen[bytes]:
    """virtmount -f -v with ``options``, its log in MOUNTPOINT.log; returns once mounted."""
    with mountpoint.with_suffix(".log").open("w") as log:
        process = subprocess.Popen([VIRTMOUNT, "-f", "-v", "-o", ",".join(options), uri, str(mountpoint)],
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 120
    while not os.path.ismount(mountpoint):
        assert process.poll() is None and time.monotonic() < deadline, mountpoint.with_suffix(".log").read_text()
        time.sleep(0.2)
    return process


def peak_rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.25) -> float | None:
    """Seconds until ``condition()`` held, or None if it did not within ``timeout``."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(interval)
    return None
