"""Disk layouts and filesystems as volumes and as a domain with several disks, over qemu+tcp.

The images (tests/layouts.py) are uploaded as volumes of a pool made through
libvirt; the domain virtmount-test-vol-multi holds the standard test image
(an OS), the two disks of one volume group (one of them named by pool and
volume), and a cdrom and a floppy that must not be served.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests import images, layouts, volumes

POOL = "virtmount-test-vol-layouts"
DOMAIN = "virtmount-test-vol-multi"


@pytest.fixture(scope="module")
def pool(tcp_uri: str) -> Iterator[str]:
    volumes.start_dir_pool(tcp_uri, POOL)
    for recipe in (layouts.ZOO, layouts.MBR, layouts.SPAN_DISKS):
        for index, image in enumerate(layouts.build(recipe)):
            assert volumes.put_volume(tcp_uri, POOL, f"{recipe.name}{index}.qcow2", image) == "qcow2"
    volumes.put_volume(tcp_uri, POOL, "noos.raw", volumes.converted(images.build(images.NOOS), "raw"))
    try:
        yield POOL
    finally:
        volumes.stop_pool(tcp_uri, POOL)


def multi_disk_domain_xml(pool_dir: Path) -> str:
    def disk(kind: str, source: str, target: str, device: str = "disk", fmt: str = "qcow2") -> str:
        return (f"<disk type='{kind}' device='{device}'><driver name='qemu' type='{fmt}'/>{source}"
                f"<target dev='{target}'/></disk>")
    return f"""<domain type='qemu'><name>{DOMAIN}</name><memory unit='MiB'>256</memory>
      <os><type arch='x86_64'>hvm</type></os><devices>
      {disk('file', f"<source file='{images.build(images.STANDARD)}'/>", 'vda')}
      {disk('volume', f"<source pool='{POOL}' volume='span0.qcow2'/>", 'vdb')}
      {disk('file', f"<source file='{pool_dir / 'span1.qcow2'}'/>", 'vdc')}
      {disk('file', f"<source file='{pool_dir / 'noos.raw'}'/>", 'hdc', 'cdrom', 'raw')}
      {disk('file', f"<source file='{pool_dir / 'noos.raw'}'/>", 'fda', 'floppy', 'raw')}
      </devices></domain>"""


@pytest.fixture(scope="module")
def multi_disk_domain(tcp_uri: str, pool: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    xml = tmp_path_factory.mktemp("domain") / "domain.xml"
    xml.write_text(multi_disk_domain_xml(volumes.POOL_PARENT / POOL))
    with volumes.defined_domain(tcp_uri, DOMAIN, xml) as name:
        yield name


def read_hellos(devices: Path) -> dict[str, bytes]:
    """What each filesystem of a devices/ directory holds in its /hello-*.txt."""
    found = {}
    for name in sorted(os.listdir(devices)):
        hellos = [entry for entry in os.listdir(devices / name) if entry.startswith("hello-")]
        found[name] = (devices / name / hellos[0]).read_bytes() if len(hellos) == 1 else b"?"
    return found


@pytest.mark.parametrize("recipe", [layouts.ZOO, layouts.MBR], ids=["gpt-vfat-ntfs-btrfs-swap-luks-ext2", "mbr"])
def test_filesystems_of_a_volume(tcp_mounted: Path, pool: str, recipe: layouts.Recipe) -> None:
    """Swap and LUKS partitions are not shown; every btrfs subvolume is."""
    devices = tcp_mounted / "volumes" / POOL / f"{recipe.name}0.qcow2" / "devices"
    assert read_hellos(devices) == recipe.files


def test_a_domain_with_an_os_disk_and_a_volume_group_over_two_disks(
        tcp_mounted: Path, multi_disk_domain: str) -> None:
    time.sleep(1.5)  # domains/ is listed anew after a second
    directory = tcp_mounted / "domains" / multi_disk_domain
    assert (directory / "fs" / "etc" / "virtmount-test").read_bytes() == images.STANDARD.files["/etc/virtmount-test"]
    devices = sorted(os.listdir(directory / "devices"))
    assert devices == ["sda1", "vg0-data", "vg0-root", "vgspan-big"]  # no cdrom, no floppy
    assert (directory / "devices" / "vgspan-big" / "hello-span.txt").read_bytes() == layouts.SPAN_DISKS.files[
        "vgspan-big"]


def test_a_volume_a_domain_uses_is_reachable_both_ways(tcp_mounted: Path, multi_disk_domain: str) -> None:
    volume = tcp_mounted / "volumes" / POOL / "span0.qcow2"
    assert b"span0.qcow2" in (volume / "volume.xml").read_bytes()
    assert os.listdir(volume / "devices") == []  # half a volume group: nothing to mount on its own
    assert "vgspan-big" in os.listdir(tcp_mounted / "domains" / multi_disk_domain / "devices")
