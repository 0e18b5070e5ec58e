"""Issue 16, item 7: the soak run, on demand only (``make soak``: ``VIRTMOUNT_SOAK_MINUTES=30``).

One mount of ``VIRTMOUNT_SOAK_GUESTS`` load guests (tests/load_guests.py: files of known content) and
READERS threads doing mixed random work on them for the given minutes: whole files checked by SHA-256,
reads at random offsets (half of them past the page cache) checked byte for byte, listings and stats.
A read(2) that returns less than asked is legal (the kernel returns what it has when a later page fails)
and is counted; what it returned must be right, and the rest is read again.
Meanwhile an appliance's QEMU is killed (SIGKILL) every KILL_EVERY_S and libvirtd is restarted once,
half-way. Every read that succeeds must be right; the ones that fail must fail with EIO or ETIMEDOUT, none
may hang. At the end every file of every guest is read once more and must be right, the mount's RSS and
open file count at the end are compared with those after the first full pass, and after unmount nothing
of the mount may be left: no appliance domain, no throw-away overlay, no scratch volume, no new volume in
the virtmount pool but saved appliances. It restarts the system libvirtd: run it alone on a machine.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import libvirt
import pytest

from tests import images, load_guests
from tests.acceptance.conftest import unmount
from tests.acceptance.helpers import appliances_of, mount_foreground, peak_rss_kib, wait_until
from tests.acceptance.test_faults import POOL_DIR, restart_libvirtd
from virtmount.virt.domainxml import APPLIANCE_NAME_PREFIX

SOAK_MINUTES = float(os.environ.get("VIRTMOUNT_SOAK_MINUTES", "0"))
GUESTS = int(os.environ.get("VIRTMOUNT_SOAK_GUESTS", "4"))
READERS = 8
KILL_EVERY_S = 150.0
NO_HANG_S = 150.0  # a call may wait for a boot on a loaded host; a hang never ends
ALLOWED_ERRORS = {"EIO", "ETIMEDOUT"}  # what a killed appliance or a lost connection may answer
RSS_GROWTH_BOUND_KIB = 64 * 1024
FD_GROWTH_BOUND = 16
KEPT_POOL_VOLUMES = re.compile(rf"^{APPLIANCE_NAME_PREFIX}(saved-[0-9a-f]{{16}}(-[0-9]+)?(\.state|-root\.qcow2|-run\.qcow2)"
                               rf"|[0-9a-f]{{16}}-(kernel|initrd|root\.qcow2|complete))$")

pytestmark = [pytest.mark.acceptance,
              pytest.mark.skipif(SOAK_MINUTES <= 0, reason="on demand: VIRTMOUNT_SOAK_MINUTES=30 (make soak)")]


class Guest:
    """A load guest's files as the mount shows them, with their expected content."""

    def __init__(self, number: int, mountpoint: Path) -> None:
        self.root = mountpoint / "domains" / load_guests.domain_name(number) / "devices" / "sda"
        self.digests = load_guests.guest_files(number)
        self.contents = {name: load_guests.file_content(number, name) for name in self.digests}


class Reader(threading.Thread):
    """Random work on the guests until stopped; counts outcomes ("ok", "wrong", errno names) and keeps the
    slowest call's seconds and the first few wrong answers."""

    def __init__(self, seed: int, guests: list[Guest]) -> None:
        super().__init__(daemon=True)
        self.random, self.guests = random.Random(seed), guests
        self.outcomes: Counter[str] = Counter()
        self.failing_seconds: set[int] = set()  # whole seconds (of time.monotonic()) in which a call failed
        self.slowest = 0.0
        self.wrong: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        work = [self.whole_file] * 2 + [self.random_read] * 5 + [self.listing, self.stat]
        while not self.stop.is_set():
            guest = self.random.choice(self.guests)
            name = self.random.choice(sorted(guest.contents))
            started = time.monotonic()
            try:
                problem = self.random.choice(work)(guest, name)
                outcome = "ok" if problem is None else "wrong"
                if problem is not None and len(self.wrong) < 10:
                    self.wrong.append(problem)
            except OSError as exc:
                outcome = errno.errorcode.get(exc.errno or 0, str(exc))
                self.failing_seconds.add(int(time.monotonic()))
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.outcomes[outcome] += 1

    def whole_file(self, guest: Guest, name: str) -> str | None:
        digest = hashlib.sha256((guest.root / name).read_bytes()).hexdigest()
        return None if digest == guest.digests[name] else f"{guest.root / name}: SHA-256 {digest}"

    def random_read(self, guest: Guest, name: str) -> str | None:
        """A range read as a careful program reads: read(2) may return less than asked when the kernel
        met an error after the first pages (an appliance killed meanwhile); what came must be right, and
        the rest is asked for again."""
        content = guest.contents[name]
        offset = self.random.randrange(len(content))
        expected = content[offset:offset + self.random.randint(1, 256 * 1024)]
        fd = os.open(guest.root / name, os.O_RDONLY)
        try:
            if self.random.random() < 0.5:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # past the page cache: the appliance answers
            data = b""
            while len(data) < len(expected):
                chunk = os.pread(fd, len(expected) - len(data), offset + len(data))
                if not chunk or not expected.startswith(data + chunk):
                    return f"{guest.root / name}: {len(data) + len(chunk)} bytes at {offset} differ"
                if len(data + chunk) < len(expected):
                    self.outcomes["short read"] += 1
                data += chunk
        finally:
            os.close(fd)
        return None

    def listing(self, guest: Guest, name: str) -> str | None:
        names = sorted(os.listdir(guest.root / "data"))
        expected = sorted(path.split("/", 1)[1] for path in guest.digests)
        return None if names == expected else f"{guest.root}/data lists {len(names)} names"

    def stat(self, guest: Guest, name: str) -> str | None:
        size = os.stat(guest.root / name).st_size
        return None if size == len(guest.contents[name]) else f"{guest.root / name}: size {size}"

    def finish(self) -> None:
        self.stop.set()
        self.join(NO_HANG_S)
        assert not self.is_alive(), "a call hung"


def windows(seconds: set[int], origin: float) -> str:
    """Runs of consecutive seconds, relative to ``origin``: "12-15 40 …"."""
    runs: list[list[int]] = []
    for second in sorted(seconds):
        if runs and second == runs[-1][1] + 1:
            runs[-1][1] = second
        else:
            runs.append([second, second])
    return " ".join(f"{a - int(origin)}" if a == b else f"{a - int(origin)}-{b - int(origin)}" for a, b in runs)


def process_figures(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open file descriptors) of the mount's process."""
    return peak_rss_kib(pid)[0], len(os.listdir(f"/proc/{pid}/fd"))


def kill_an_appliance(pid: int, generator: random.Random) -> str | None:
    """SIGKILL the QEMU of one of the mount's running appliances; its name, or None if none runs."""
    running = appliances_of(pid)
    if not running:
        return None
    name = generator.choice(sorted(running))
    try:
        os.kill(int(Path(f"/run/libvirt/qemu/{name}.pid").read_text()), signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None  # ended meanwhile
    return name


def pool_volumes() -> set[str]:
    """The volumes of the virtmount pool (none before the first mount on a host made it)."""
    conn = libvirt.open("qemu:///system")
    try:
        try:
            pool = conn.storagePoolLookupByName("virtmount")
        except libvirt.libvirtError:
            return set()
        pool.refresh(0)
        return set(pool.listVolumes())
    finally:
        conn.close()


def full_pass(guests: list[Guest]) -> list[str]:
    """Every file of every guest read whole; those that came out wrong or failed."""
    bad = []
    for guest in guests:
        for name, digest in guest.digests.items():
            try:
                if hashlib.sha256((guest.root / name).read_bytes()).hexdigest() != digest:
                    bad.append(f"{guest.root / name}: wrong")
            except OSError as exc:
                bad.append(f"{guest.root / name}: {exc.strerror}")
    return bad


def test_soak(libvirtd: str, tmp_path: Path) -> None:
    domains = [load_guests.ensure_domain(libvirtd, number) for number in range(GUESTS)]
    volumes_before = pool_volumes()
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    process = mount_foreground(libvirtd, mountpoint, "ro")
    appliances_seen: set[str] = set()
    try:
        guests = [Guest(number, mountpoint) for number in range(GUESTS)]
        started = time.monotonic()
        assert full_pass(guests) == []  # boots every guest's appliance once
        rss_start, fds_start = process_figures(process.pid)
        print(f"first pass over {GUESTS} guests: {time.monotonic() - started:.0f} s; RSS {rss_start // 1024} MiB, "
              f"{fds_start} fds")

        readers = [Reader(seed, guests) for seed in range(READERS)]
        for reader in readers:
            reader.start()
        chaos = random.Random(7)
        deadline = time.monotonic() + SOAK_MINUTES * 60
        restart_at = time.monotonic() + SOAK_MINUTES * 30
        next_kill = time.monotonic() + KILL_EVERY_S
        soak_started = time.monotonic()
        kills: list[tuple[float, str]] = []
        restarts, restarted_at, samples = 0, 0.0, []
        next_sample = time.monotonic()
        while time.monotonic() < deadline:
            try:
                appliances_seen |= set(appliances_of(process.pid))
            except libvirt.libvirtError:
                pass  # libvirtd restarting
            if time.monotonic() >= next_sample:
                samples.append(process_figures(process.pid))
                next_sample += 60
            if time.monotonic() >= next_kill:
                try:
                    if (killed := kill_an_appliance(process.pid, chaos)) is not None:
                        kills.append((time.monotonic() - soak_started, killed))
                    next_kill += KILL_EVERY_S
                except libvirt.libvirtError:
                    pass  # libvirtd restarting: kill at the next turn
            if restarts == 0 and time.monotonic() >= restart_at:
                restarted_at = time.monotonic() - soak_started
                restart_libvirtd()
                restarts += 1
            time.sleep(1)
        for reader in readers:
            reader.finish()
        outcomes = sum((reader.outcomes for reader in readers), Counter())
        wrong = [problem for reader in readers for problem in reader.wrong]
        slowest = max(reader.slowest for reader in readers)
        print(f"soak {SOAK_MINUTES:.0f} min, {READERS} readers on {GUESTS} guests: {dict(outcomes)}; slowest call "
              f"{slowest:.1f} s; {len(kills)} appliances killed, libvirtd restarted {restarts} time(s)")
        failing = set().union(*(reader.failing_seconds for reader in readers))
        print(f"appliances killed at (s): {' '.join(f'{at:.0f}' for at, _ in kills)}; libvirtd restarted at "
              f"{restarted_at:.0f} s; seconds in which a call failed ({len(failing)}): {windows(failing, soak_started)}")
        print("RSS MiB / fds each minute: " + " ".join(f"{rss // 1024}/{fds}" for rss, fds in samples))

        back = wait_until(lambda: all(_lists(guest) for guest in guests), NO_HANG_S)
        assert back is not None, "the guests' views did not come back"
        bad = full_pass(guests)
        rss_end, fds_end = process_figures(process.pid)
        print(f"final pass: {len(bad)} files wrong or failing; RSS {rss_start // 1024} MiB after the first pass, "
              f"{rss_end // 1024} MiB at the end; fds {fds_start} -> {fds_end}")
        assert wrong == [] and outcomes["wrong"] == 0
        assert set(outcomes) - {"ok", "short read"} <= ALLOWED_ERRORS, outcomes
        assert outcomes["ok"] > 0 and restarts == 1 and len(kills) >= SOAK_MINUTES * 60 // KILL_EVERY_S - 2
        assert slowest < NO_HANG_S
        assert bad == []
        assert rss_end - rss_start < RSS_GROWTH_BOUND_KIB
        assert fds_end - fds_start < FD_GROWTH_BOUND
    finally:
        unmount(mountpoint)
        process.wait(60)
    assert appliances_of(process.pid) == [], "appliances left behind by the mount"
    overlays = [path for directory in (images.IMAGE_DIR, POOL_DIR) for name in appliances_seen
                for path in directory.glob(f"*.TRANSIENT-{name}")]
    assert overlays == []
    new_volumes = {name for name in pool_volumes() - volumes_before if not KEPT_POOL_VOLUMES.match(name)}
    assert new_volumes == set(), "volumes left in the virtmount pool"
    print(f"after unmount: no appliance, overlay or new volume left ({len(domains)} guests)")


def _lists(guest: Guest) -> bool:
    try:
        return len(os.listdir(guest.root / "data")) == load_guests.FILES
    except OSError:
        return False
