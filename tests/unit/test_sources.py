"""Sources (virtmount.sources): domains by UUID, volumes by key, the disks they give the appliance."""

from __future__ import annotations

import errno
import xml.etree.ElementTree as ET
from typing import Any, cast

import libvirt
import pytest

from virtmount.sources import Attach, SourceUnavailable
from virtmount.sources.domain import DomainRef
from virtmount.sources.volume import VolumeRef, volume_disk

from .test_tree import libvirt_error

UUID = "0e1d2c3b-4a59-4867-8756-a4b3c2d1e0f9"


def volume_xml(kind: str = "file", fmt: str | None = "qcow2", path: str = "/pool/a.qcow2", extra: str = "") -> str:
    format_element = f"<format type='{fmt}'/>" if fmt else ""
    return (f"<volume type='{kind}'><name>a.qcow2</name><key>{path}</key>"
            f"<target><path>{path}</path>{format_element}{extra}</target></volume>")


def text(element: ET.Element) -> str:
    return ET.tostring(element, encoding="unicode")


def test_a_file_volume_is_a_file_disk_in_the_format_libvirt_reports() -> None:
    assert text(volume_disk(volume_xml(), "images")) == (
        '<disk type="file" device="disk"><driver name="qemu" type="qcow2" />'
        '<source file="/pool/a.qcow2" /></disk>')


def test_a_block_volume_is_a_block_disk() -> None:
    disk = volume_disk(volume_xml("block", "raw", "/dev/vg/lv"), "vg")
    assert (disk.get("type"), disk.find("source").get("dev")) == ("block", "/dev/vg/lv")  # type: ignore[union-attr]


def test_a_network_volume_is_named_by_pool_and_volume_for_libvirt_to_resolve() -> None:
    disk = volume_disk(volume_xml("network", "raw", "rbdpool/a"), "ceph")
    source = disk.find("source")
    assert disk.get("type") == "volume" and source is not None
    assert (source.get("pool"), source.get("volume")) == ("ceph", "a.qcow2")


@pytest.mark.parametrize(("reported", "driver"), [
    ("raw", "raw"), ("qcow2", "qcow2"), ("vmdk", "vmdk"), ("vdi", "vdi"), ("vpc", "vpc"), ("vhd", "vpc"),
    ("iso", "raw"), ("none", "raw"), (None, "raw"),
])
def test_the_format_is_never_probed(reported: str | None, driver: str) -> None:
    disk = volume_disk(volume_xml(fmt=reported), "images")
    assert disk.find("driver").get("type") == driver  # type: ignore[union-attr]


@pytest.mark.parametrize("partition_type", ["none", "linux", "fat32", "linux-lvm", "linux-swap"])
def test_a_disk_pool_partition_is_raw_whatever_its_partition_type(partition_type: str) -> None:
    disk = volume_disk(volume_xml("block", partition_type, "/dev/sdb1"), "disks")
    assert disk.find("driver").get("type") == "raw"  # type: ignore[union-attr]


@pytest.mark.parametrize("reported", ["dir", "fat", "ploop", "extended"])
def test_formats_that_are_not_disk_images_are_refused(reported: str) -> None:
    with pytest.raises(SourceUnavailable, match="not a disk image"):
        volume_disk(volume_xml(fmt=reported), "images")


def test_the_volume_encryption_goes_with_the_source() -> None:
    encryption = "<encryption format='luks'><secret type='passphrase' uuid='%s'/></encryption>" % UUID
    disk = volume_disk(volume_xml(extra=encryption), "images")
    assert disk.find("./source/encryption/secret") is not None


class Domain:
    def __init__(self, xml: str, active: bool = False) -> None:
        self.xml, self.active = xml, active

    def isActive(self) -> int:
        return int(self.active)

    def XMLDesc(self, flags: int = 0) -> str:
        return self.xml


class Connection:
    def __init__(self, domain: Domain | None = None) -> None:
        self.domain = domain
        self.looked_up: list[str] = []

    def lookupByUUIDString(self, uuid: str) -> Domain:
        self.looked_up.append(uuid)
        if self.domain is None:
            raise libvirt_error(libvirt.VIR_ERR_NO_DOMAIN, "Domain not found")
        return self.domain


GUEST_XML = f"""<domain type='kvm'><name>web1</name><uuid>{UUID}</uuid><devices>
  <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/i/os.qcow2'/><target dev='vda'/></disk>
  <disk type='block' device='disk'><source dev='/dev/vg/data'/><target dev='vdb'/></disk>
  <disk type='network' device='disk'><source protocol='nbd' name='x'><host name='h' port='10809'/></source>
    <target dev='vdc'/></disk>
  <disk type='file' device='cdrom'><source file='/i/install.iso'/><target dev='hdc'/><readonly/></disk>
  <disk type='file' device='floppy'><source file='/i/boot.img'/><target dev='fda'/></disk>
</devices></domain>"""


async def test_a_domain_is_resolved_by_its_uuid_with_its_disks_as_they_are_and_no_cdrom_or_floppy() -> None:
    conn = Connection(Domain(GUEST_XML))
    source = await DomainRef("web1", UUID).resolve(cast(Any, conn), Attach.READ_ONLY_OVERLAY)
    assert conn.looked_up == [UUID]
    assert (source.identity, source.name, source.attach) == (UUID, "web1", Attach.READ_ONLY_OVERLAY)
    assert [disk.get("type") for disk in source.disks] == ["file", "block", "network"]
    assert source.disks[2].find("./source/host").get("port") == "10809"  # type: ignore[union-attr]


async def test_a_running_or_vanished_domain_cannot_be_served() -> None:
    with pytest.raises(SourceUnavailable, match="is running") as running:
        await DomainRef("web1", UUID).resolve(cast(Any, Connection(Domain(GUEST_XML, active=True))), Attach.READ_WRITE)
    assert running.value.errno == errno.EIO
    with pytest.raises(SourceUnavailable) as gone:
        await DomainRef("web1", UUID).resolve(cast(Any, Connection()), Attach.READ_WRITE)
    assert gone.value.errno == errno.ENOENT


class Pool:
    def __init__(self, active: bool) -> None:
        self.active = active

    def isActive(self) -> int:
        return int(self.active)

    def name(self) -> str:
        return "images"


class Volume:
    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def storagePoolLookupByVolume(self) -> Pool:
        return self.pool

    def XMLDesc(self, flags: int = 0) -> str:
        return volume_xml()


class VolumeConnection:
    def __init__(self, volume: Volume | None) -> None:
        self.volume = volume

    def storageVolLookupByKey(self, key: str) -> Volume:
        if self.volume is None:
            raise libvirt_error(libvirt.VIR_ERR_NO_STORAGE_VOL, "Storage volume not found")
        return self.volume


async def test_a_volume_is_resolved_by_its_key_into_one_disk() -> None:
    ref = VolumeRef("images", "a.qcow2", "/pool/a.qcow2")
    source = await ref.resolve(cast(Any, VolumeConnection(Volume(Pool(True)))), Attach.READ_ONLY_OVERLAY)
    assert (source.identity, source.name) == ( "volume:/pool/a.qcow2", "images/a.qcow2")
    assert [disk.find("source").get("file") for disk in source.disks] == ["/pool/a.qcow2"]  # type: ignore[union-attr]


@pytest.mark.parametrize("volume", [None, Volume(Pool(False))], ids=["deleted", "pool stopped"])
async def test_a_deleted_volume_or_stopped_pool_is_gone(volume: Volume | None) -> None:
    with pytest.raises(SourceUnavailable) as gone:
        await VolumeRef("images", "a.qcow2", "/pool/a.qcow2").resolve(cast(Any, VolumeConnection(volume)),
                                                                       Attach.READ_ONLY_OVERLAY)
    assert gone.value.errno == errno.ENOENT


class PoolVolume:
    def __init__(self, kind: int, path: str) -> None:
        self.kind, self._path = kind, path

    def info(self) -> list[int]:
        return [self.kind, 1 << 30, 1 << 20]

    def path(self) -> str:
        return self._path


class StoragePool:
    def __init__(self, volumes: dict[str, PoolVolume]) -> None:
        self.volumes = volumes

    def storageVolLookupByName(self, name: str) -> PoolVolume:
        return self.volumes[name]


class PoolsConnection(Connection):
    def __init__(self, domain: Domain, pools: dict[str, StoragePool]) -> None:
        super().__init__(domain)
        self.pools = pools

    def storagePoolLookupByName(self, name: str) -> StoragePool:
        if name not in self.pools:
            raise libvirt_error(libvirt.VIR_ERR_NO_STORAGE_POOL, "Storage pool not found")
        return self.pools[name]


VOLUME_DISKS_XML = f"""<domain type='kvm'><name>web1</name><uuid>{UUID}</uuid><devices>
  <disk type='volume' device='disk'><driver name='qemu' type='qcow2'/><source pool='p' volume='f'/>
    <target dev='vda'/></disk>
  <disk type='volume' device='disk'><source pool='lvm' volume='lv' mode='host'/><target dev='vdb'/></disk>
  <disk type='volume' device='disk'><source pool='ceph' volume='rbd'/><target dev='vdc'/></disk>
</devices></domain>"""


async def test_disks_naming_pool_volumes_become_the_file_or_block_device_libvirt_resolves_them_to() -> None:
    conn = PoolsConnection(Domain(VOLUME_DISKS_XML), {
        "p": StoragePool({"f": PoolVolume(libvirt.VIR_STORAGE_VOL_FILE, "/pool/f.qcow2")}),
        "lvm": StoragePool({"lv": PoolVolume(libvirt.VIR_STORAGE_VOL_BLOCK, "/dev/vg/lv")}),
        "ceph": StoragePool({"rbd": PoolVolume(libvirt.VIR_STORAGE_VOL_NETWORK, "rbd/rbd")}),
    })
    source = await DomainRef("web1", UUID).resolve(cast(Any, conn), Attach.READ_ONLY_OVERLAY)
    assert [disk.find("source").attrib for disk in source.disks] == [  # type: ignore[union-attr]
        {"file": "/pool/f.qcow2"}, {"dev": "/dev/vg/lv"}, {"pool": "ceph", "volume": "rbd"}]
    assert [disk.get("type") for disk in source.disks] == ["file", "block", "volume"]
    assert source.disks[0].find("driver").get("type") == "qcow2"  # type: ignore[union-attr]


async def test_a_disk_naming_a_missing_pool_cannot_be_served() -> None:
    with pytest.raises(SourceUnavailable, match="cannot find volume f of pool p"):
        await DomainRef("web1", UUID).resolve(cast(Any, PoolsConnection(Domain(VOLUME_DISKS_XML), {})),
                                              Attach.READ_ONLY_OVERLAY)


@pytest.mark.parametrize("disk, writable", [
    ("<disk type='file'><source file='/a.qcow2'/></disk>", True),
    ("<disk type='block'><source dev='/dev/sdx'/></disk>", True),
    ("<disk type='file'><source file='/a.qcow2'/><readonly/></disk>", False),
    ("<disk type='file'><source file='/a.qcow2'/><shareable/></disk>", False),
    ("<disk type='network'><source protocol='nbd' name='x'/></disk>", False),
    ("<disk type='volume'><source pool='ceph' volume='x'/></disk>", False),
])
def test_only_disks_an_image_lock_guards_are_written(disk: str, writable: bool) -> None:
    from virtmount.sources import writable_attach
    disks = (ET.fromstring("<disk type='file'><source file='/b.qcow2'/></disk>"), ET.fromstring(disk))
    expected = Attach.READ_WRITE if writable else Attach.READ_ONLY_OVERLAY
    assert writable_attach("g", disks, Attach.READ_WRITE) is expected
    assert writable_attach("g", disks, Attach.READ_ONLY_OVERLAY) is Attach.READ_ONLY_OVERLAY
