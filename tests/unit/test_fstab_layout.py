"""Reading a Linux guest's layout from its own fstab (virtmount.fstab_layout): what blkid says, how
fstab names resolve, and every case that must be left to inspect_os."""

from __future__ import annotations

from virtmount.fstab_layout import (
    BlockDevice,
    filesystems,
    lv_path,
    mountpoints,
    parse_blkid,
    parse_fstab,
    resolve,
    root_candidates,
)

BLKID = b"""DEVNAME=/dev/sda
UUID=0c1b
BLOCK_SIZE=4096
TYPE=ext2

DEVNAME=/dev/sdb
PTUUID=5d8e
PTTYPE=gpt

DEVNAME=/dev/sdb1
UUID=2c82d591
BLOCK_SIZE=1024
TYPE=ext4
PARTLABEL=boot
PARTUUID=c559a549

DEVNAME=/dev/sdb2
UUID=Xk3p
TYPE=LVM2_member
PARTLABEL=lvm
PARTUUID=070565ea

DEVNAME=/dev/mapper/vg0-root
UUID=6f0e
BLOCK_SIZE=4096
TYPE=ext4

DEVNAME=/dev/mapper/my--vg-data
LABEL=big\\ data
UUID=77aa
TYPE=xfs

virtmount-blkid-status 0
"""

FSTAB = """# /etc/fstab: static file system information.
/dev/vg0/root   /          ext4  errors=remount-ro 0 1
UUID=2c82d591   /boot      ext4  defaults          0 2
LABEL=big\\040data /srv/big\\040data xfs defaults 0 2
/dev/sr0        /media/cdrom0 udf,iso9660 user,noauto 0 0
tmpfs           /tmp       tmpfs defaults 0 0
/swapfile       none       swap  sw 0 0
"""


def _devices() -> list[BlockDevice]:
    devices = parse_blkid(BLKID, "/dev/sda")
    assert devices is not None
    return devices


def test_blkid_gives_the_guests_devices_with_lvs_named_as_the_daemon_names_them() -> None:
    names = [device.name for device in _devices()]
    assert names == ["/dev/sdb", "/dev/sdb1", "/dev/sdb2", "/dev/vg0/root", "/dev/my-vg/data"]
    data = _devices()[-1]
    assert (data.fstype, data.label) == ("xfs", "big data")


def test_lv_names_with_hyphens_and_other_mapper_names() -> None:
    assert lv_path("vg0-root") == "/dev/vg0/root"
    assert lv_path("my--vg-my--lv") == "/dev/my-vg/my-lv"
    assert lv_path("luks-1234-5678") is None
    assert lv_path("cryptroot") is None


def test_a_failed_blkid_or_a_device_of_another_kind_means_inspect() -> None:
    assert parse_blkid(b"DEVNAME=/dev/sdb1\nTYPE=ext4\n", "/dev/sda") is None  # no status line
    assert parse_blkid(b"virtmount-blkid-status 4\n", "/dev/sda") is None
    assert parse_blkid(b"DEVNAME=/dev/md0\nTYPE=ext4\n\nvirtmount-blkid-status 0\n", "/dev/sda") is None
    assert parse_blkid(b"virtmount-blkid-status 2\n", "/dev/sda") == []


def test_content_other_than_plain_linux_filesystems_means_inspect() -> None:
    for fstype in ("btrfs", "crypto_LUKS", "ntfs", "linux_raid_member", "zfs_member"):
        assert filesystems([*_devices(), BlockDevice("/dev/sdc1", fstype)]) is None
    found = filesystems(_devices())
    assert found is not None
    assert [device.name for device in found] == ["/dev/sdb1", "/dev/vg0/root", "/dev/my-vg/data"]


def test_a_root_named_so_is_tried_first() -> None:
    found = filesystems(_devices())
    assert found is not None
    assert [device.name for device in root_candidates(found)][0] == "/dev/vg0/root"


def test_the_fstab_gives_every_mountpoint() -> None:
    found = filesystems(_devices())
    assert found is not None
    root = next(device for device in found if device.name == "/dev/vg0/root")
    assert mountpoints(parse_fstab(FSTAB), found, root, None) == {
        "/": "/dev/vg0/root", "/boot": "/dev/sdb1", "/srv/big data": "/dev/my-vg/data"}


def test_an_fstab_read_from_another_filesystem_than_its_root_is_not_the_roots() -> None:
    found = filesystems(_devices())
    assert found is not None
    boot = next(device for device in found if device.name == "/dev/sdb1")
    assert mountpoints(parse_fstab(FSTAB), found, boot, None) is None


def test_a_filesystem_the_fstab_does_not_name_may_be_another_os() -> None:
    found = filesystems(_devices())
    assert found is not None
    root = next(device for device in found if device.name == "/dev/vg0/root")
    without_data = "\n".join(line for line in FSTAB.splitlines() if "big" not in line)
    assert mountpoints(parse_fstab(without_data), found, root, None) is None


def test_a_mounted_device_that_is_not_there_means_inspect() -> None:
    found = filesystems(_devices())
    assert found is not None
    root = next(device for device in found if device.name == "/dev/vg0/root")
    missing = FSTAB + "UUID=0000-1111 /home ext4 defaults 0 2\n"
    assert mountpoints(parse_fstab(missing), found, root, None) is None


def test_kernel_names_resolve_only_on_a_single_disk_guest() -> None:
    found = filesystems(_devices())
    assert found is not None
    assert resolve("/dev/vda1", found, "/dev/sdb") == found[0]
    assert resolve("/dev/sda1", found, "/dev/sdb") == found[0]
    assert resolve("/dev/vda1", found, None) is None


def test_other_spellings_of_a_device() -> None:
    found = filesystems(_devices())
    assert found is not None
    boot, root, data = found
    assert resolve('UUID="2c82d591"', found, None) == boot
    assert resolve("/dev/disk/by-uuid/2c82d591", found, None) == boot
    assert resolve("PARTUUID=C559A549", found, None) == boot
    assert resolve("PARTLABEL=boot", found, None) == boot
    assert resolve("/dev/mapper/vg0-root", found, None) == root
    assert resolve("/dev/disk/by-label/big data", found, None) == data
    assert resolve("/dev/disk/by-id/ata-QEMU_1", found, None) is None
