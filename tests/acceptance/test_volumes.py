"""volumes/<pool>/<volume>/ over qemu+tcp: pools and volumes made through libvirt, read through a real mount.

One mount of ``qemu+tcp://127.0.0.1/system`` serves the module; the test
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
from tests.acceptance.conftest import unmount
from tests.acceptance.helpers import run_virtmount

POOL = volumes.POOL
OTHER_POOL = "virtmount-test-vol-other"
LISTING_TTL_S = 1.5  # listings of volumes/ and of a pool are kept for a second


@pytest.fixture(scope="module")
def pool(tcp_uri: str) -> Iterator[str]:
    """The test pool with noos.qcow2, noos.raw (the same filesystem) and standard.qcow2 (an OS)."""
    volumes.start_dir_pool(tcp_uri, POOL)
    noos = images.build(images.NOOS)
    assert volumes.put_volume(tcp_uri, POOL, "noos.qcow2", noos) == "qcow2"
    assert volumes.put_volume(tcp_uri, POOL, "noos.raw", volumes.converted(noos, "raw")) == "raw"
    assert volumes.put_volume(tcp_uri, POOL, "standard.qcow2", images.build(images.STANDARD)) == "qcow2"
    try:
        yield POOL
    finally:
        volumes.stop_pool(tcp_uri, POOL)


@pytest.fixture(scope="module")
def mount(tcp_uri: str, pool: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    mountpoint = tmp_path_factory.mktemp("virtmount-volumes")
    result = run_virtmount("-o", "idle=600", tcp_uri, str(mountpoint))
    assert result.returncode == 0, result.stderr
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


def test_volumes_lists_active_pools_and_their_volumes(mount: Path, tcp_uri: str) -> None:
    assert sorted(os.listdir(mount)) == ["domains", "volumes"]
    assert POOL in os.listdir(mount / "volumes")
    assert sorted(os.listdir(mount / "volumes" / POOL)) == ["noos.qcow2", "noos.raw", "standard.qcow2"]
    volume = mount / "volumes" / POOL / "noos.qcow2"
    assert (volume / "volume.xml").read_text() == volumes.virsh(
        tcp_uri, "vol-dumpxml", "--pool", POOL, "noos.qcow2").stdout.rstrip("\n") + "\n"


@pytest.mark.parametrize("volume", ["noos.qcow2", "noos.raw"])
def test_files_of_a_qcow2_and_a_raw_volume(mount: Path, volume: str) -> None:
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
