"""volumes/<pool>/<volume>/ over qemu+tcp: pools and volumes made through libvirt, read through a real mount.

One mount of ``qemu+tcp://127.0.0.1/system`` serves the session; the test
pool's volumes are uploaded with virsh over that URI only, so the client
reaches them only through libvirt. Appliances stay up (idle=600) and are
shared by the tests that read the same volume.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests import images, volumes
from virtmount.lifecycle import PRESENCE_CHECK_S

POOL = volumes.POOL
OTHER_POOL = "virtmount-test-vol-other"
LISTING_TTL_S = 1.5  # listings of volumes/ and of a pool are kept for a second
CONVERTED_FORMATS = ("vmdk", "vdi", "vpc")  # the noos image converted with qemu-img


@pytest.fixture(scope="module")
def pool(tcp_uri: str) -> Iterator[str]:
    """The test pool: noos.{qcow2,raw,vmdk,vdi,vpc} (one ext4 filesystem, no OS, in each format),
    overlay.qcow2 (over noos.qcow2), standard.qcow2 (an OS), random.img (random bytes) and orphan.qcow2
    (over a deleted volume)."""
    volumes.start_dir_pool(tcp_uri, POOL)
    noos = images.build(images.NOOS)
    assert volumes.put_volume(tcp_uri, POOL, "noos.qcow2", noos) == "qcow2"
    assert volumes.put_volume(tcp_uri, POOL, "noos.raw", volumes.converted(noos, "raw")) == "raw"
    assert volumes.put_volume(tcp_uri, POOL, "standard.qcow2", images.build(images.STANDARD)) == "qcow2"
    for fmt in CONVERTED_FORMATS:
        assert volumes.put_volume(tcp_uri, POOL, f"noos.{fmt}", volumes.converted(noos, fmt)) == fmt
    volumes.overlay_volume(tcp_uri, POOL, "overlay.qcow2", "noos.qcow2", images.NOOS.size)
    volumes.put_volume(tcp_uri, POOL, "random.img", volumes.random_bytes_image(8 << 20))
    volumes.put_volume(tcp_uri, POOL, "doomed.raw", volumes.converted(noos, "raw"))
    volumes.overlay_volume(tcp_uri, POOL, "orphan.qcow2", "doomed.raw", images.NOOS.size)
    volumes.virsh(tcp_uri, "vol-delete", "--pool", POOL, "doomed.raw")  # orphan.qcow2 loses its backing file
    try:
        yield POOL
    finally:
        volumes.stop_pool(tcp_uri, POOL)


@pytest.fixture(scope="module")
def mount(tcp_mounted: Path, pool: str) -> Path:
    return tcp_mounted


def test_volumes_lists_active_pools_and_their_volumes(mount: Path, tcp_uri: str) -> None:
    assert sorted(os.listdir(mount)) == ["domains", "volumes"]
    assert POOL in os.listdir(mount / "volumes")
    assert sorted(os.listdir(mount / "volumes" / POOL)) == [
        "noos.qcow2", "noos.raw", "noos.vdi", "noos.vmdk", "noos.vpc", "orphan.qcow2", "overlay.qcow2",
        "random.img", "standard.qcow2"]
    volume = mount / "volumes" / POOL / "noos.qcow2"
    assert (volume / "volume.xml").read_text() == volumes.virsh(
        tcp_uri, "vol-dumpxml", "--pool", POOL, "noos.qcow2").stdout.rstrip("\n") + "\n"


@pytest.mark.parametrize("volume", ["noos.qcow2", "noos.raw", *(f"noos.{fmt}" for fmt in CONVERTED_FORMATS),
                                    "overlay.qcow2"])
def test_files_of_each_format_and_through_a_backing_chain(mount: Path, volume: str) -> None:
    directory = mount / "volumes" / POOL / volume
    assert os.listdir(directory / "devices") == ["sda"]
    assert (directory / "devices" / "sda" / "hello.txt").read_bytes() == images.NOOS.files["/hello.txt"]
    assert sorted(os.listdir(directory)) == ["devices", "volume.xml"]  # no OS: no fs/


def test_a_volume_with_an_os_has_fs(mount: Path) -> None:
    directory = mount / "volumes" / POOL / "standard.qcow2"
    assert (directory / "fs" / "etc" / "virtmount-test").read_bytes() == images.STANDARD.files["/etc/virtmount-test"]
    assert (directory / "fs" / "srv" / "data" / "hello.txt").read_bytes() == images.STANDARD.files["/srv/data/hello.txt"]
    assert sorted(os.listdir(directory / "devices")) == ["sda1", "vg0-data", "vg0-root"]


def test_pools_and_volumes_appear_and_disappear_while_mounted(mount: Path, tcp_uri: str) -> None:
    volumes_dir = mount / "volumes"
    volumes.start_dir_pool(tcp_uri, OTHER_POOL)
    try:
        volumes.virsh(tcp_uri, "vol-create-as", OTHER_POOL, "empty.raw", "1M", "--format", "raw")
        time.sleep(LISTING_TTL_S)
        assert OTHER_POOL in os.listdir(volumes_dir)
        assert os.listdir(volumes_dir / OTHER_POOL) == ["empty.raw"]
        volumes.virsh(tcp_uri, "vol-delete", "--pool", OTHER_POOL, "empty.raw")
        time.sleep(LISTING_TTL_S)
        assert os.listdir(volumes_dir / OTHER_POOL) == []
        assert not (volumes_dir / OTHER_POOL / "empty.raw").exists()
    finally:
        volumes.stop_pool(tcp_uri, OTHER_POOL)
    time.sleep(LISTING_TTL_S)
    assert OTHER_POOL not in os.listdir(volumes_dir)
    with pytest.raises(FileNotFoundError) as gone:
        os.listdir(volumes_dir / OTHER_POOL)
    assert gone.value.errno == errno.ENOENT
    assert POOL in os.listdir(volumes_dir)  # the mount stays up, the rest unchanged


def test_a_volume_of_random_bytes_has_empty_devices(mount: Path) -> None:
    directory = mount / "volumes" / POOL / "random.img"
    assert os.listdir(directory / "devices") == []
    assert sorted(os.listdir(directory)) == ["devices", "volume.xml"]


def test_a_missing_backing_file_is_eio_below_that_volume_only(mount: Path) -> None:
    with pytest.raises(OSError) as failed:
        os.listdir(mount / "volumes" / POOL / "orphan.qcow2" / "devices")
    assert failed.value.errno == errno.EIO
    assert (mount / "volumes" / POOL / "orphan.qcow2" / "volume.xml").read_bytes().startswith(b"<volume")
    assert (mount / "volumes" / POOL / "noos.raw" / "devices" / "sda" / "hello.txt").exists()


def test_a_pool_stopped_while_its_volume_is_served_is_enoent_below(mount: Path, tcp_uri: str) -> None:
    volumes.start_dir_pool(tcp_uri, OTHER_POOL)
    try:
        volumes.put_volume(tcp_uri, OTHER_POOL, "noos.qcow2", images.build(images.NOOS))
        time.sleep(LISTING_TTL_S)
        hello = mount / "volumes" / OTHER_POOL / "noos.qcow2" / "devices" / "sda" / "hello.txt"
        assert hello.read_bytes() == images.NOOS.files["/hello.txt"]
    finally:
        volumes.stop_pool(tcp_uri, OTHER_POOL)
    time.sleep(LISTING_TTL_S)
    with pytest.raises(FileNotFoundError):
        hello.read_bytes()
    assert (mount / "volumes" / POOL / "noos.qcow2" / "devices" / "sda" / "hello.txt").exists()


def test_a_volume_deleted_while_served_answers_eio_and_nothing_else_changes(mount: Path, tcp_uri: str) -> None:
    volumes.start_dir_pool(tcp_uri, OTHER_POOL)
    try:
        volumes.put_volume(tcp_uri, OTHER_POOL, "doomed.qcow2", images.build(images.NOOS))
        time.sleep(LISTING_TTL_S)
        device = mount / "volumes" / OTHER_POOL / "doomed.qcow2" / "devices" / "sda"
        assert "hello.txt" in os.listdir(device)  # booted; hello.txt not read yet
        with open(device / "hello.txt", "rb") as opened:
            volumes.virsh(tcp_uri, "vol-delete", "--pool", OTHER_POOL, "doomed.qcow2")
            time.sleep(PRESENCE_CHECK_S + 0.5)  # QEMU still holds the deleted file: only virtmount's check sees it
            with pytest.raises(OSError) as failed:
                opened.read()
            assert failed.value.errno == errno.EIO
        time.sleep(LISTING_TTL_S)
        assert os.listdir(mount / "volumes" / OTHER_POOL) == []
        assert not (mount / "volumes" / OTHER_POOL / "doomed.qcow2").exists()
    finally:
        volumes.stop_pool(tcp_uri, OTHER_POOL)
    assert (mount / "volumes" / POOL / "noos.qcow2" / "devices" / "sda" / "hello.txt").read_bytes() == \
        images.NOOS.files["/hello.txt"]
