"""Test images for disk layouts and filesystems, built once with libguestfs and cached like tests/images.py.

* ``ZOO``: GPT; sda1 vfat, sda2 ntfs, sda3 btrfs with subvolumes ``sub1`` and
  ``sub2``, sda4 swap, sda5 LUKS (ext4 inside, passphrase ``LUKS_KEY``),
  sda6 ext2. Each filesystem holds ``/hello-<name>.txt``.
* ``MBR``: an MBR partition table; sda1 ext3, sda2 ext4.
* ``SPAN_DISKS``: two disks, whole-disk LVM PVs of one volume group ``vgspan``
  whose LV ``big`` (ext4) spans both.

``build(recipe)`` returns the image paths (cached; rebuilt when this file or
tests/images.py changes).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tests import images

MiB = images.MiB
LUKS_KEY = "virtmount-test"


@dataclass(frozen=True)
class Recipe:
    name: str
    disks: tuple[int, ...]  # sizes of its disks, in bytes
    make: Callable[[Any], None]  # fills the disks through a launched guestfs handle
    files: dict[str, bytes]  # devices/ view name -> the one file it holds (path, content)


def hello(name: str) -> tuple[str, bytes]:
    return f"/hello-{name}.txt", f"hello from {name}\n".encode()


def _write(g: Any, device: str, name: str, mountable: str | None = None) -> None:
    g.mount(mountable or device, "/")
    path, content = hello(name)
    g.write(path, content)
    g.umount("/")


def _partitions(g: Any, table: str, sizes_mib: list[int]) -> None:
    g.part_init("/dev/sda", table)
    start = MiB // 512
    for size in sizes_mib:
        end = start + size * MiB // 512 - 1
        g.part_add("/dev/sda", "p", start, end)
        start = end + 1


def _make_zoo(g: Any) -> None:
    _partitions(g, "gpt", [32, 32, 160, 16, 40, 16])
    g.mkfs("vfat", "/dev/sda1")
    _write(g, "/dev/sda1", "vfat")
    g.mkfs("ntfs", "/dev/sda2")
    _write(g, "/dev/sda2", "ntfs")
    g.mkfs_btrfs(["/dev/sda3"])
    g.mount("/dev/sda3", "/")
    g.btrfs_subvolume_create("/sub1")
    g.btrfs_subvolume_create("/sub2")
    g.umount("/")
    _write(g, "/dev/sda3", "btrfs")
    _write(g, "/dev/sda3", "sub1", "btrfsvol:/dev/sda3/sub1")
    _write(g, "/dev/sda3", "sub2", "btrfsvol:/dev/sda3/sub2")
    g.mkswap("/dev/sda4")
    g.luks_format("/dev/sda5", LUKS_KEY, 0)
    g.cryptsetup_open("/dev/sda5", LUKS_KEY, "secret")
    g.mkfs("ext4", "/dev/mapper/secret")
    _write(g, "/dev/mapper/secret", "luks")
    g.cryptsetup_close("/dev/mapper/secret")
    g.mkfs("ext2", "/dev/sda6")
    _write(g, "/dev/sda6", "ext2")


def _make_mbr(g: Any) -> None:
    _partitions(g, "mbr", [24, 24])
    for device, fstype in (("/dev/sda1", "ext3"), ("/dev/sda2", "ext4")):
        g.mkfs(fstype, device)
        _write(g, device, fstype)


def _make_span(g: Any) -> None:
    g.pvcreate("/dev/sda")
    g.pvcreate("/dev/sdb")
    g.vgcreate("vgspan", ["/dev/sda", "/dev/sdb"])
    g.lvcreate_free("big", "vgspan", 100)
    g.mkfs("ext4", "/dev/vgspan/big")
    _write(g, "/dev/vgspan/big", "span")


ZOO = Recipe("zoo", (320 * MiB,), _make_zoo, {
    "sda1": hello("vfat")[1], "sda2": hello("ntfs")[1], "sda3": hello("btrfs")[1],
    "sda3-sub1": hello("sub1")[1], "sda3-sub2": hello("sub2")[1], "sda6": hello("ext2")[1]})
MBR = Recipe("mbr", (64 * MiB,), _make_mbr, {"sda1": hello("ext3")[1], "sda2": hello("ext4")[1]})
SPAN_DISKS = Recipe("span", (64 * MiB, 64 * MiB), _make_span, {"vgspan-big": hello("span")[1]})


def paths(recipe: Recipe) -> list[Path]:
    digest = images.recipe_hash(Path(__file__))
    return [images.IMAGE_DIR / f"{recipe.name}{index}-{digest}.qcow2" for index in range(len(recipe.disks))]


def build(recipe: Recipe) -> list[Path]:
    """The recipe's disk images, built on first use (all disks in one appliance run)."""
    targets = paths(recipe)
    if all(path.exists() for path in targets):
        return targets
    with images.locked(recipe.name):
        if all(path.exists() for path in targets):
            return targets
        temporaries = [path.with_suffix(".qcow2.tmp") for path in targets]
        g = images.new_handle()
        try:
            for path, size in zip(temporaries, recipe.disks):
                g.disk_create(str(path), "qcow2", size)
                g.add_drive_opts(str(path), format="qcow2", readonly=False)
            g.launch()
            recipe.make(g)
            g.sync()
            g.shutdown()
        finally:
            g.close()
        for old in images.IMAGE_DIR.glob(f"{recipe.name}[0-9]-*.qcow2"):
            old.unlink()
        for temporary, path in zip(temporaries, targets):
            temporary.chmod(0o644)
            temporary.rename(path)
    return targets
