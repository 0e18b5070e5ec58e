"""Pools on block devices: partitions of a disk pool as volumes, an fs pool, and a domain whose disk is a
block device.

A disk pool on a loop device (libvirt writes its GPT and makes its
partitions) holds the NOOS filesystem as raw bytes in one partition and the
NOOS image as a qcow2 file in another. libvirt reports neither format from
the content (a partition's "format" is its partition type), so the second
partition is read as the raw bytes it is: no filesystem, although a prober
would have found the image's ext4 inside. An fs pool (an ext4 filesystem on
another loop device, mounted by libvirt) holds the NOOS image and its own
lost+found, which libvirt lists as a volume of format "dir".

Logical pools are not tested: the kernel of these machines has no
device-mapper, so lvcreate fails on the host ("/dev/mapper/control: open
failed"); LVM inside guests is read by the appliance's own kernel
(test_layouts, test_volumes).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Iterator

import pytest

from tests import images, volumes

POOL = "virtmount-test-vol-disk"
FS_POOL = "virtmount-test-vol-fs"
DOMAIN = "virtmount-test-block-disk"


@pytest.fixture(scope="module")
def partitions(tcp_uri: str) -> Iterator[tuple[str, str]]:
    """The pool's two partitions (names = device names): raw NOOS filesystem, NOOS qcow2 image."""
    noos = images.build(images.NOOS)
    with volumes.loop_device(160 << 20) as device:
        volumes.start_disk_pool(tcp_uri, POOL, device)
        try:
            names = (f"{os.path.basename(device)}p1", f"{os.path.basename(device)}p2")
            for name in names:
                volumes.virsh(tcp_uri, "vol-create-as", POOL, name, str(images.NOOS.size))
            volumes.virsh(tcp_uri, "vol-upload", "--pool", POOL, names[0], str(volumes.converted(noos, "raw")))
            volumes.virsh(tcp_uri, "vol-upload", "--pool", POOL, names[1], str(noos))
            volumes.virsh(tcp_uri, "pool-refresh", POOL)
            yield names
        finally:
            volumes.stop_pool(tcp_uri, POOL)


@pytest.fixture(scope="module")
def block_disk_domain(tcp_uri: str, partitions: tuple[str, str],
                      tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    xml = tmp_path_factory.mktemp("block") / "domain.xml"
    xml.write_text(f"""<domain type='qemu'><name>{DOMAIN}</name><memory unit='MiB'>256</memory>
      <os><type arch='x86_64'>hvm</type></os><devices>
      <disk type='block' device='disk'><driver name='qemu' type='raw'/><source dev='/dev/{partitions[0]}'/>
      <target dev='vda'/></disk></devices></domain>""")
    with volumes.defined_domain(tcp_uri, DOMAIN, xml) as name:
        yield name


def test_a_partition_of_a_disk_pool_is_read_as_a_block_device(tcp_mounted: Path, tcp_uri: str,
                                                                partitions: tuple[str, str]) -> None:
    assert sorted(os.listdir(tcp_mounted / "volumes" / POOL)) == sorted(partitions)
    assert "<volume type='block'>" in volumes.virsh(tcp_uri, "vol-dumpxml", "--pool", POOL, partitions[0]).stdout
    device = tcp_mounted / "volumes" / POOL / partitions[0] / "devices" / "sda"
    assert (device / "hello.txt").read_bytes() == images.NOOS.files["/hello.txt"]


def test_a_raw_volume_holding_a_qcow2_image_stays_raw(tcp_mounted: Path, tcp_uri: str,
                                                       partitions: tuple[str, str]) -> None:
    assert volumes.volume_format(tcp_uri, POOL, partitions[1]) == "none"
    with open(tcp_mounted / "volumes" / POOL / partitions[1] / "volume.xml", "rb") as xml:
        assert b"qcow2" not in xml.read()
    assert os.listdir(tcp_mounted / "volumes" / POOL / partitions[1] / "devices") == []


def test_a_domain_whose_disk_is_a_block_device(tcp_mounted: Path, block_disk_domain: str) -> None:
    device = tcp_mounted / "domains" / block_disk_domain / "devices" / "sda"
    assert (device / "hello.txt").read_bytes() == images.NOOS.files["/hello.txt"]


@pytest.fixture(scope="module")
def fs_pool(tcp_uri: str) -> Iterator[str]:
    """The fs pool, holding noos.qcow2 (uploaded through libvirt) beside the filesystem's lost+found."""
    with volumes.loop_device(96 << 20) as device:
        volumes.start_fs_pool(tcp_uri, FS_POOL, device)
        try:
            assert volumes.put_volume(tcp_uri, FS_POOL, "noos.qcow2", images.build(images.NOOS)) == "qcow2"
            yield FS_POOL
        finally:
            volumes.stop_pool(tcp_uri, FS_POOL)


def test_a_volume_of_an_fs_pool(tcp_mounted: Path, fs_pool: str) -> None:
    pool = tcp_mounted / "volumes" / fs_pool
    assert sorted(os.listdir(pool)) == ["lost+found", "noos.qcow2"]
    assert (pool / "noos.qcow2" / "devices" / "sda" / "hello.txt").read_bytes() == images.NOOS.files["/hello.txt"]


def test_a_directory_in_an_fs_pool_is_not_read_as_a_disk(tcp_mounted: Path, fs_pool: str) -> None:
    directory = tcp_mounted / "volumes" / fs_pool / "lost+found"
    assert b"<format type='dir'/>" in (directory / "volume.xml").read_bytes()
    with pytest.raises(OSError) as refused:
        os.listdir(directory / "devices")
    assert refused.value.errno == errno.EIO
