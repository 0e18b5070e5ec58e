"""Bad input through a real mount: names of every byte, a directory of 100,000 entries, 200 corrupt filesystems.

One mount serves the module, with the default ``call_timeout`` (120 s) given explicitly: libguestfs'
inspection of 100 small disks took more than 30 s here with two such appliances at once under TCG; its log is MOUNTPOINT.log. The images come from
tests/hostile_images.py (made in user space, cached). The corrupt images are served as the disks of
two domains of 100 disks each, so that two appliances read all 200 (the appliance puts a domain's
disks on one virtio-scsi controller).
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Iterator

import pytest

from tests import hostile_images, images
from tests.acceptance.conftest import unmount
from tests.acceptance.helpers import appliances_of, mount_foreground, peak_rss_kib
from tests.bounded_walk import WalkReport, walk
from virtmount.virt.domainxml import scsi_disk_name

CALL_TIMEOUT_S = 120
ODD_NAMES_GUEST = "virtmount-test-odd-names"
CORRUPT_DOMAINS = 2
# A pristine corrupt image holds dir0..dir5, big.bin and lost+found, and 12 files and a link in each dir.
PRISTINE_ENTRIES = 8 + 6 * 13
PEAK_RSS_BOUND_KIB = 400 * 1024  # seen: ~170 MiB with the 100,000 entries cached
WALK_DEADLINE_S = 900  # a boot of 100 disks (~90 s under TCG here) and the walk, with room for a loaded host


@pytest.fixture(scope="module")
def hostile_mount(libvirtd: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """qemu:///system mounted in the foreground for this module: (mountpoint, pid)."""
    mountpoint = tmp_path_factory.mktemp("virtmount-hostile")
    process = mount_foreground(libvirtd, mountpoint, "idle=600", f"call_timeout={CALL_TIMEOUT_S}")
    try:
        yield mountpoint, process.pid
    finally:
        unmount(mountpoint)
        assert appliances_of(process.pid, libvirtd) == [], "appliances left behind by the mount"


@pytest.fixture(scope="module")
def odd_names(libvirtd: str, hostile_mount: tuple[Path, int]) -> bytes:
    """devices/sda of the odd-names domain, as bytes."""
    hostile_images.ensure_multi_disk_domain(libvirtd, ODD_NAMES_GUEST, [hostile_images.odd_names_image()])
    return os.fsencode(hostile_mount[0] / "domains" / ODD_NAMES_GUEST / "devices" / "sda")


def test_names_of_every_byte_but_slash_and_nul(odd_names: bytes) -> None:
    names = odd_names + b"/names"
    want = hostile_images.odd_names()
    assert sorted(os.listdir(names)) == sorted(want)
    assert sorted(entry.name for entry in os.scandir(names)) == sorted(want)
    for name, content in want.items():
        path = names + b"/" + name
        st = os.lstat(path)
        assert stat.S_ISREG(st.st_mode) and st.st_size == len(content), name
        with open(path, "rb") as f:
            assert f.read() == content, name


def test_a_directory_of_100000_entries_in_bounded_memory(odd_names: bytes, hostile_mount: tuple[Path, int]) -> None:
    big = odd_names + b"/big"
    pid = hostile_mount[1]
    rss_before, _ = peak_rss_kib(pid)
    for _ in range(2):  # listed and walked (every entry lstat'ed), then again from the cache
        names = set()
        for entry in os.scandir(big):
            assert stat.S_ISREG(entry.stat(follow_symlinks=False).st_mode)
            names.add(entry.name)
        assert names == {b"%08d" % i for i in range(hostile_images.BIG_DIR_ENTRIES)}
    rss_after, peak = peak_rss_kib(pid)
    print(f"100,000 entries: virtmount RSS {rss_before // 1024} MiB before, {rss_after // 1024} MiB after, "
          f"peak {peak // 1024} MiB")
    assert peak < PEAK_RSS_BOUND_KIB


def test_a_directory_too_large_for_one_readdir_reply(odd_names: bytes) -> None:
    """40,000 names of 100 bytes: libguestfs 1.48's readdir cannot send them in one 4 MiB reply (it answers
    with an error), so the listing comes from ls0, streamed."""
    long = odd_names + b"/long"
    assert set(os.listdir(long)) == {hostile_images.long_name(i) for i in range(hostile_images.LONG_DIR_ENTRIES)}
    assert stat.S_ISREG(os.lstat(long + b"/" + hostile_images.long_name(12345)).st_mode)


@pytest.fixture(scope="module")
def corrupt_guests(libvirtd: str) -> list[tuple[str, list[hostile_images.CorruptImage]]]:
    made = hostile_images.corrupt_images()
    assert len(made) >= 200
    per_domain = -(-len(made) // CORRUPT_DOMAINS)
    guests = []
    for index in range(CORRUPT_DOMAINS):
        name = f"virtmount-test-corrupt-{index}"
        share = made[index * per_domain:(index + 1) * per_domain]
        hostile_images.ensure_multi_disk_domain(libvirtd, name, [image.path for image in share])
        guests.append((name, share))
    return guests


def _walk_guest(devices: Path, count: int) -> dict[str, WalkReport | None]:
    """Each disk's devices/ view walked (None: not shown: no filesystem found, or it refused to mount)."""
    shown = set(os.listdir(devices))  # boots the appliance and mounts every filesystem
    top = os.fsencode(devices)
    return {scsi_disk_name(index): walk(top + b"/" + scsi_disk_name(index).encode())
            if scsi_disk_name(index) in shown else None for index in range(count)}


def _host_parses_nothing() -> None:
    """No loop or NBD device and no mount on the host reads a test image: only the appliances' kernels do."""
    image_dir = str(images.IMAGE_DIR)
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert image_dir not in loops, loops
    assert not [d for d in Path("/sys/block").glob("nbd*") if (d / "pid").exists()], "an NBD device is connected"
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fstype, source = line.split(" - ", 1)[1].split()[:2]
        assert not fstype.startswith("ext") or not source.startswith(("/dev/loop", "/dev/nbd")), line
        assert image_dir not in line, line


def test_200_corrupt_filesystems_give_errors_or_partial_trees(
        hostile_mount: tuple[Path, int], corrupt_guests: list[tuple[str, list[hostile_images.CorruptImage]]]) -> None:
    mountpoint, pid = hostile_mount
    started = time.monotonic()
    executor = ThreadPoolExecutor(len(corrupt_guests))
    futures = [executor.submit(_walk_guest, mountpoint / "domains" / name / "devices", len(share))
               for name, share in corrupt_guests]
    _, hung = wait(futures, timeout=WALK_DEADLINE_S)  # all of them, so that none walks on during the teardown
    executor.shutdown(wait=not hung)
    assert not hung, f"walks still running after {WALK_DEADLINE_S} s"
    reports = [future.result() for future in futures]
    elapsed = time.monotonic() - started
    _host_parses_nothing()

    outcomes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    slowest = WalkReport()
    for (_, share), walked in zip(corrupt_guests, reports):
        for image, report in zip(share, walked.values()):
            if report is None:
                outcomes["not shown"] += 1
                continue
            errors.update(report.errors)
            whole = report.entries == PRISTINE_ENTRIES and not report.errors
            outcomes["whole tree" if whole else "partial tree or errors"] += 1
            if report.slowest > slowest.slowest:
                slowest = report
    print(f"{sum(outcomes.values())} corrupt images in {elapsed:.0f} s: {dict(outcomes)}; errors by errno: "
          f"{dict(errors)}; slowest operation {slowest.slowest:.2f} s ({slowest.slowest_what})")
    assert sum(outcomes.values()) == sum(len(share) for _, share in corrupt_guests)
    assert outcomes["not shown"] and outcomes["partial tree or errors"] and outcomes["whole tree"]
    assert slowest.slowest < CALL_TIMEOUT_S, "an operation waited past call_timeout"
    # the mount lives on and still serves
    os.kill(pid, 0)
    assert ODD_NAMES_GUEST.encode() in os.listdir(os.fsencode(mountpoint / "domains"))
    assert len(appliances_of(pid)) <= 1 + len(corrupt_guests)  # one per source at most
