"""Load: 64 parallel readers on one guest, then on several guests at once, through one mount.

Every reader reads every file of its guest whole, each reader starting at another file, and checks
its SHA-256 (tests/load_guests.py). Afterwards: the mount's peak RSS, the RSS of each appliance's QEMU
on the host, one appliance per guest, and none left after unmount. The suite boots
``VIRTMOUNT_LOAD_GUESTS`` guests at once (default 3: eight TCG appliances booting together on two
cores take minutes); ``VIRTMOUNT_LOAD_GUESTS=8`` runs the full case by hand.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Iterator

import pytest

from tests import load_guests
from tests.acceptance.conftest import unmount
from tests.acceptance.helpers import appliances_of, mount_foreground, peak_rss_kib

READERS = 64
GUESTS_AT_ONCE = int(os.environ.get("VIRTMOUNT_LOAD_GUESTS", "3"))
DEADLINE_S = 900  # boots under load included; proves "no hang", not speed
MOUNT_PEAK_BOUND_KIB = 400 * 1024
APPLIANCE_RSS_BOUND_KIB = 1536 * 1024  # 1024 MiB of guest RAM (the default) and QEMU's own


@pytest.fixture(scope="module")
def load_mount(libvirtd: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """(mountpoint, pid) of a mount for this module; nothing of it may be left after unmount."""
    for guest in range(GUESTS_AT_ONCE):
        load_guests.ensure_domain(libvirtd, guest)
    mountpoint = tmp_path_factory.mktemp("virtmount-load")
    process = mount_foreground(libvirtd, mountpoint, "idle=600")
    try:
        yield mountpoint, process.pid
    finally:
        unmount(mountpoint)
        assert appliances_of(process.pid, libvirtd) == [], "appliances left behind by the mount"


def _read_and_check(files: Path, expected: dict[str, str], first: int) -> list[str]:
    """Read every file whole, starting at the ``first``-th; the names of those that came out wrong."""
    names = sorted(expected)
    wrong = []
    for name in names[first % len(names):] + names[:first % len(names)]:
        digest = hashlib.sha256()
        with open(files / name, "rb") as f:
            while chunk := f.read(128 * 1024):
                digest.update(chunk)
        if digest.hexdigest() != expected[name]:
            wrong.append(f"{files}/{name}")
    return wrong


def _readers(mountpoint: Path, guests: list[int]) -> tuple[list[str], float]:
    """READERS threads over ``guests`` (round robin): the files read wrong, and the seconds taken."""
    started = time.monotonic()
    executor = ThreadPoolExecutor(READERS)
    futures = [executor.submit(_read_and_check,
                               mountpoint / "domains" / load_guests.domain_name(guests[k % len(guests)]) / "devices" / "sda",
                               load_guests.guest_files(guests[k % len(guests)]), k)
               for k in range(READERS)]
    _, hung = wait(futures, timeout=DEADLINE_S)
    executor.shutdown(wait=not hung)
    assert not hung, f"{len(hung)} readers still reading after {DEADLINE_S} s"
    return [name for future in futures for name in future.result()], time.monotonic() - started


def _qemu_rss_kib(domains: list[str]) -> dict[str, int]:
    """RSS of the QEMU process of each running appliance domain (libvirt's pid file of it), in KiB."""
    return {name: peak_rss_kib(int(Path(f"/run/libvirt/qemu/{name}.pid").read_text()))[0] for name in domains}


def test_64_readers_on_one_guest(load_mount: tuple[Path, int]) -> None:
    mountpoint, pid = load_mount
    wrong, seconds = _readers(mountpoint, [0])
    rss, peak = peak_rss_kib(pid)
    print(f"{READERS} readers on one guest: {seconds:.0f} s (boot included); virtmount RSS {rss // 1024} MiB, "
          f"peak {peak // 1024} MiB")
    assert wrong == []
    assert peak < MOUNT_PEAK_BOUND_KIB
    assert len(appliances_of(pid)) == 1


def test_64_readers_on_several_guests_at_once(load_mount: tuple[Path, int]) -> None:
    mountpoint, pid = load_mount
    guests = list(range(GUESTS_AT_ONCE))  # guest 0's appliance runs already (one boot less); the others boot together
    wrong, seconds = _readers(mountpoint, guests)
    rss, peak = peak_rss_kib(pid)
    running = appliances_of(pid)
    qemu = _qemu_rss_kib(running)
    print(f"{READERS} readers on {len(guests)} guests at once: {seconds:.0f} s (boots included); virtmount RSS "
          f"{rss // 1024} MiB, peak {peak // 1024} MiB; QEMU RSS per appliance (MiB): "
          f"{sorted(v // 1024 for v in qemu.values())}")
    assert wrong == []
    assert peak < MOUNT_PEAK_BOUND_KIB
    assert len(running) == len(guests)  # one appliance per guest, none twice
    assert all(v < APPLIANCE_RSS_BOUND_KIB for v in qemu.values()), qemu
