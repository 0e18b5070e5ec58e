"""Hostile guest disks, made on the host without any kernel mount and cached like tests/images.py.

``mke2fs -d`` fills a filesystem image from a directory in user space, so nothing here needs an
appliance, and the host kernel never mounts or parses any of these images (only the appliances'
kernels do, when a mount serves them).

* ``odd_names_image()``: one ext4 filesystem with ``/names`` (a file per byte value 0x01-0xff but
  0x2f, named ``<byte>-<hex>``, holding its hex; plus one file whose 254-byte name is every such byte
  in order, holding its own name), ``/big`` (``BIG_DIR_ENTRIES`` empty files ``00000000``…) and
  ``/long`` (``LONG_DIR_ENTRIES`` empty files named ``long_name(i)``, 100 bytes each).
* ``corrupt_images()``: ``CORRUPT_COUNT`` small ext2/ext3/ext4 images of one tree, each damaged
  with a fixed seed in its superblock, its inode table or its directory blocks (or all three).
"""

from __future__ import annotations

import hashlib
import inspect
import random
import re
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tests import images

BIG_DIR_ENTRIES = 100_000
# /long: names of 100 bytes; 40,000 of them as dirents are 4.6 MB, past the 4 MiB of one readdir reply
LONG_DIR_ENTRIES = 40_000
CORRUPT_COUNT = 200
CORRUPT_SEED = 16_3  # issue 16, item 3
CORRUPT_SIZE = 4 * images.MiB
CORRUPT_FSTYPES = ("ext2", "ext3", "ext4")
DAMAGE_KINDS = ("superblock", "inode table", "directory blocks", "all three")

NAME_BYTES = bytes(b for b in range(1, 256) if b != 0x2F)


def odd_names() -> dict[bytes, bytes]:
    """/names: file name -> content."""
    files = {bytes([b]) + b"-%02x" % b: b"%02x\n" % b for b in NAME_BYTES}
    files[NAME_BYTES] = NAME_BYTES
    return files


def long_name(number: int) -> bytes:
    return b"%0100d" % number


def _long_names_tar(path: Path) -> None:
    """A tar of LONG_DIR_ENTRIES empty files with long names (GNU format: a 100-byte name fits its header)."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for number in range(LONG_DIR_ENTRIES):
            info = tarfile.TarInfo(long_name(number).decode())
            info.mtime = images.FILE_MTIME
            tar.addfile(info)


def _digest(*parts: object) -> str:
    """A cache key over what makes an image (the recipe's own source among them)."""
    digest = hashlib.sha256(inspect.getsource(make_ext_image).encode())
    for part in parts:
        digest.update(repr(part).encode())
    return digest.hexdigest()[:12]


def make_ext_image(fstype: str, image: Path, size: int, tree: Path, *extra: str) -> None:
    """An ext2/3/4 image of ``size`` bytes holding a copy of the directory ``tree`` (``mke2fs -d``)."""
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(["mke2fs", "-q", "-F", "-t", fstype, "-E", "root_owner=0:0", *extra, "-d", str(tree), str(image)],
                   check=True, capture_output=True,
                   env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "E2FSPROGS_FAKE_TIME": str(images.FILE_MTIME)})


def odd_names_image() -> Path:
    """The image with /names, /big and /long (cached). ``mke2fs -d`` would take minutes over /big (it
    adds entries to an unindexed directory one by one), so /big and /long are made in an appliance
    instead: libguestfs' fill_dir (one call) and tar_in."""
    recipe = [inspect.getsource(f) for f in (odd_names, long_name, _long_names_tar)]
    target = images.IMAGE_DIR / f"hostile-names-{_digest(recipe, BIG_DIR_ENTRIES, LONG_DIR_ENTRIES)}.img"

    def fill(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(dir=images.IMAGE_DIR) as tree:
            names = Path(tree, "names").resolve()
            names.mkdir()
            for name, content in odd_names().items():
                with open(bytes(names) + b"/" + name, "wb") as f:
                    f.write(content)
            inodes = BIG_DIR_ENTRIES + LONG_DIR_ENTRIES + 2000
            make_ext_image("ext4", tmp, 256 * images.MiB, Path(tree), "-N", str(inodes))
        g = images.new_handle()
        try:
            g.add_drive_opts(str(tmp), format="raw", readonly=False)
            g.launch()
            g.mount("/dev/sda", "/")
            g.mkdir("/big")
            g.fill_dir("/big", BIG_DIR_ENTRIES)
            with tempfile.TemporaryDirectory(dir=images.IMAGE_DIR) as scratch:
                _long_names_tar(Path(scratch, "long.tar"))
                g.mkdir("/long")
                g.tar_in(str(Path(scratch, "long.tar")), "/long")
            g.umount_all()
            g.shutdown()
        finally:
            g.close()

    return _cached(target, fill)


@dataclass(frozen=True)
class CorruptImage:
    path: Path
    fstype: str
    damage: str  # one of DAMAGE_KINDS
    bytes_damaged: int


def _small_tree(tree: Path) -> None:
    """What each corrupt image holds before the damage: a few directories, files and links."""
    for d in range(6):
        directory = tree / f"dir{d}"
        directory.mkdir()
        for f in range(12):
            (directory / f"file{f:02d}.txt").write_bytes(images.pseudo_random(f"{d}/{f}", 100 + 300 * f))
        (directory / "link").symlink_to("file00.txt")
    (tree / "big.bin").write_bytes(images.pseudo_random("big", 256 * 1024))


def _regions(image: Path, fstype: str) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges of the superblock, the inode tables and the directory blocks of a pristine image
    (read by e2fsprogs in user space)."""
    dump = subprocess.run(["dumpe2fs", str(image)], check=True, capture_output=True, text=True).stdout
    block_size = int(re.search(r"^Block size:\s+(\d+)", dump, re.M).group(1))  # type: ignore[union-attr]
    tables = [(int(a) * block_size, (int(b) + 1) * block_size)
              for a, b in re.findall(r"Inode table at (\d+)-(\d+)", dump)]
    blocks: list[tuple[int, int]] = []
    for directory in ["/"] + [f"/dir{d}" for d in range(6)]:
        out = subprocess.run(["debugfs", "-R", f"blocks {directory}", str(image)],
                             check=True, capture_output=True, text=True).stdout
        blocks += [(int(b) * block_size, (int(b) + 1) * block_size) for b in out.split()]
    return {"superblock": [(1024, 2048)], "inode table": tables, "directory blocks": blocks}


def _damage(data: bytearray, ranges: list[tuple[int, int]], rng: random.Random) -> int:
    """Overwrite random bytes (single ones, or a run) inside ``ranges``; how many were changed."""
    changed = 0
    for _ in range(rng.randint(1, 8)):
        start, end = rng.choice(ranges)
        at = rng.randrange(start, end)
        run = 1 if rng.random() < 0.6 else rng.randint(1, min(256, end - at))
        for position in range(at, min(at + run, end)):
            new = rng.randrange(256)
            changed += data[position] != new
            data[position] = new
    return changed


def corrupt_images() -> list[CorruptImage]:
    """``CORRUPT_COUNT`` damaged images (cached; made again when this file changes)."""
    recipe = [inspect.getsource(f) for f in (_small_tree, _regions, _damage, _make_corrupt_images)]
    directory = images.IMAGE_DIR / f"hostile-corrupt-{_digest(CORRUPT_SEED, CORRUPT_COUNT, DAMAGE_KINDS, recipe)}"
    plan_file = directory / "plan.txt"
    if not plan_file.exists():
        with images.locked("hostile-corrupt"):
            if not plan_file.exists():
                _make_corrupt_images(directory, plan_file)
    made = []
    for line in plan_file.read_text().splitlines():
        name, fstype, damage, count = line.split("\t")
        made.append(CorruptImage(directory / name, fstype, damage, int(count)))
    return made


def _make_corrupt_images(directory: Path, plan_file: Path) -> None:
    for old in images.IMAGE_DIR.glob("hostile-corrupt-*"):
        subprocess.run(["rm", "-rf", str(old)], check=True)
    directory.mkdir()
    pristine: dict[str, tuple[bytes, dict[str, list[tuple[int, int]]]]] = {}
    with tempfile.TemporaryDirectory(dir=images.IMAGE_DIR) as tree:
        _small_tree(Path(tree))
        for fstype in CORRUPT_FSTYPES:
            base = directory / f"pristine.{fstype}"
            make_ext_image(fstype, base, CORRUPT_SIZE, Path(tree), "-b", "1024")
            pristine[fstype] = (base.read_bytes(), _regions(base, fstype))
            base.unlink()
    rng = random.Random(CORRUPT_SEED)
    lines = []
    for index in range(CORRUPT_COUNT):
        fstype = CORRUPT_FSTYPES[index % len(CORRUPT_FSTYPES)]
        damage = rng.choice(DAMAGE_KINDS)
        data, regions = bytearray(pristine[fstype][0]), pristine[fstype][1]
        kinds = DAMAGE_KINDS[:3] if damage == "all three" else (damage,)
        count = sum(_damage(data, regions[kind], rng) for kind in kinds)
        name = f"c{index:03d}.{fstype}"
        (directory / name).write_bytes(data)
        (directory / name).chmod(0o644)
        lines.append(f"{name}\t{fstype}\t{damage}\t{count}")
    plan_file.write_text("\n".join(lines) + "\n")


def _cached(target: Path, fill: Callable[[Path], None]) -> Path:
    if not target.exists():
        with images.locked(target.name.rsplit("-", 1)[0]):
            if not target.exists():
                for old in images.IMAGE_DIR.glob(target.name.rsplit("-", 1)[0] + "-*"):
                    old.unlink()
                images.write_atomically(target.stem, target, fill)
    return target


def multi_disk_xml(name: str, disks: list[Path]) -> str:
    """A TCG domain with ``disks`` (raw) on one virtio-scsi controller: sda, sdb, … (virtio-blk would
    need a PCI slot per disk)."""
    from xml.sax.saxutils import escape, quoteattr

    from virtmount.virt.domainxml import scsi_disk_name

    devices = "".join(
        f"""    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file={quoteattr(str(disk))}/>
      <target dev='{scsi_disk_name(index)}' bus='scsi'/>
    </disk>
""" for index, disk in enumerate(disks))
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <controller type='scsi' index='0' model='virtio-scsi'/>
{devices}  </devices>
</domain>
"""


def ensure_multi_disk_domain(uri: str, name: str, disks: list[Path]) -> None:
    images.ensure_domain_xml(uri, name, multi_disk_xml(name, disks))
