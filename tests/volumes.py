"""Storage pools and volumes for the volume tests, made through libvirt only (virsh over the URI given).

Test pools are dir pools named ``virtmount-test-vol-*`` in directories under
/var/lib/libvirt/images, and a disk pool and an fs pool on loop devices;
volumes are uploaded with ``virsh vol-upload`` from the cached test images
(tests/images.py) or from conversions of them, which are cached beside them,
each under a lock of its own.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from tests import images

POOL = "virtmount-test-vol-pool"
POOL_PARENT = Path("/var/lib/libvirt/images")


def virsh(uri: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["virsh", "-q", "-c", uri, *args], capture_output=True, text=True, timeout=300,
                            stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise RuntimeError(f"virsh {' '.join(args)}: {result.stderr.strip()}")
    return result


def start_dir_pool(uri: str, name: str) -> None:
    """A running, empty, transient dir pool ``name`` (started afresh if it runs already), in a directory
    of its own that libvirt makes."""
    virsh(uri, "pool-destroy", name, check=False)
    virsh(uri, "pool-create-as", name, "dir", "--target", str(POOL_PARENT / name), "--build")
    for line in virsh(uri, "vol-list", "--pool", name).stdout.splitlines():  # "NAME PATH" (test names: no spaces)
        virsh(uri, "vol-delete", "--pool", name, line.split()[0])


def stop_pool(uri: str, name: str) -> None:
    virsh(uri, "pool-destroy", name, check=False)


def put_volume(uri: str, pool: str, name: str, image: Path) -> str:
    """Upload ``image`` as volume ``name`` (replacing one of that name); libvirt's format for it."""
    virsh(uri, "vol-delete", "--pool", pool, name, check=False)
    virsh(uri, "vol-create-as", pool, name, str(image.stat().st_size), "--format", "raw")
    virsh(uri, "vol-upload", "--pool", pool, name, str(image))
    virsh(uri, "pool-refresh", pool)
    return volume_format(uri, pool, name)


def volume_format(uri: str, pool: str, name: str) -> str:
    xml = virsh(uri, "vol-dumpxml", "--pool", pool, name).stdout
    return xml.split("<format type='", 1)[1].split("'", 1)[0]


def overlay_volume(uri: str, pool: str, name: str, backing: str, capacity: int) -> None:
    """A qcow2 volume ``name`` over the volume ``backing`` of the same pool (libvirt makes it)."""
    virsh(uri, "vol-delete", "--pool", pool, name, check=False)
    virsh(uri, "vol-create-as", pool, name, str(capacity), "--format", "qcow2",
          "--backing-vol", backing, "--backing-vol-format", volume_format(uri, pool, backing))


def converted(image: Path, fmt: str) -> Path:
    """``image`` converted with qemu-img to ``fmt``, cached beside it."""
    target = image.with_name(f"{image.stem}.{fmt}")

    def convert(tmp: Path) -> None:
        subprocess.run(["qemu-img", "convert", "-O", fmt, str(image), str(tmp)], check=True, capture_output=True)
    return _cached(target, convert)


def random_bytes_image(size: int) -> Path:
    """A file of pseudo-random bytes (no partition table, no filesystem), cached."""
    def fill(tmp: Path) -> None:
        tmp.write_bytes(images.pseudo_random("random volume", size))
    return _cached(images.IMAGE_DIR / f"random-{size}.img", fill)


def _cached(target: Path, fill: Callable[[Path], None]) -> Path:
    if not target.exists():
        with images.locked(target.name):
            if not target.exists():
                images.write_atomically(target.name, target, fill)
    return target


@contextlib.contextmanager
def loop_device(size: int) -> Iterator[str]:
    """A loop device over a new sparse file of ``size`` bytes, with partition scanning; detached after."""
    backing = tempfile.NamedTemporaryFile(prefix="virtmount-loop-", dir="/var/tmp")
    with backing:
        os.truncate(backing.name, size)
        device = subprocess.run(["losetup", "--find", "--show", "--partscan", backing.name], check=True,
                                capture_output=True, text=True).stdout.strip()
        try:
            yield device
        finally:
            subprocess.run(["losetup", "--detach", device], check=False, capture_output=True)


def start_disk_pool(uri: str, name: str, device: str) -> None:
    """A running transient disk pool ``name`` on ``device`` with a new, empty GPT."""
    virsh(uri, "pool-destroy", name, check=False)
    virsh(uri, "pool-create-as", name, "disk", "--source-dev", device, "--source-format", "gpt",
          "--target", "/dev", "--build", "--overwrite")


def start_fs_pool(uri: str, name: str, device: str) -> None:
    """A running transient fs pool ``name``: a new ext4 filesystem on ``device``, which libvirt mounts on a
    directory of its own under /var/lib/libvirt/images."""
    virsh(uri, "pool-destroy", name, check=False)
    subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True, capture_output=True)
    virsh(uri, "pool-create-as", name, "fs", "--source-dev", device, "--source-format", "ext4",
          "--target", str(POOL_PARENT / name), "--build")


@contextlib.contextmanager
def defined_domain(uri: str, name: str, xml: Path) -> Iterator[str]:
    """The domain ``name`` defined from ``xml`` (replacing one an interrupted run left), undefined after."""
    virsh(uri, "undefine", name, check=False)
    virsh(uri, "define", str(xml))
    try:
        yield name
    finally:
        virsh(uri, "undefine", name, check=False)
