"""Making the libguestfs appliance available on a connection's host.

Locally we find (or have supermin build) the appliance libguestfs itself
uses, name it by a hash of its content, and keep a compressed qcow2 of its
root in the user's cache. On the host we upload kernel, initrd and root as
volumes of a storage pool through the libvirt storage API only — client and
host never need to share a filesystem — so each host receives each appliance
version once. A marker volume, created last, says an upload completed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import libvirt
import trio

from ..cachedir import cache_dir
from ..failures import ErrnoError, errno_of
from .connection import libvirt_message, pool_directory, run_blocking
from .stream import LibvirtByteStream, StreamClosed

log = logging.getLogger(__name__)

SUPERMIN_D_CANDIDATES = (
    Path("/usr/lib/x86_64-linux-gnu/guestfs/supermin.d"),
    Path("/usr/lib64/guestfs/supermin.d"),
    Path("/usr/lib/guestfs/supermin.d"),
)
APPLIANCE_FILES = ("kernel", "initrd", "root")
UPLOAD_CHUNK = 4 * 1024 * 1024
UPLOAD_LOCK_STALE_S = 900.0  # an upload of ~200 MB that takes longer is taken as dead
UPLOAD_WAIT_STEP_S = 1.0


class ProvisionError(ErrnoError):
    """The appliance could not be built locally or placed on the host."""


@dataclass(frozen=True)
class LocalAppliance:
    """The appliance files on the client, named by the hash of their content."""

    kernel: Path
    initrd: Path
    root_qcow2: Path
    root_uuid: str
    content_hash: str


@dataclass(frozen=True)
class HostAppliance:
    """Host-side paths of an uploaded appliance, as the appliance domain XML needs them."""

    kernel_path: str
    initrd_path: str
    root_path: str
    root_uuid: str


# --- the local appliance ---------------------------------------------------------


def _libguestfs_appliance_dirs() -> Iterator[Path]:
    """Where libguestfs keeps appliances: LIBGUESTFS_PATH (fixed ones), then its supermin cache."""
    for entry in os.environ.get("LIBGUESTFS_PATH", "").split(":"):
        if entry:
            yield Path(entry)
    tmp = os.environ.get("LIBGUESTFS_CACHEDIR") or os.environ.get("TMPDIR") or "/var/tmp"
    yield Path(tmp) / f".guestfs-{os.getuid()}" / "appliance.d"


def _supermin_cache_dir() -> Path:
    return list(_libguestfs_appliance_dirs())[-1]


def _is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in APPLIANCE_FILES)


def _build_with_supermin(output: Path) -> None:
    """Build or refresh libguestfs's supermin appliance exactly as libguestfs would."""
    supermin = shutil.which("supermin")
    supermin_d = next((path for path in SUPERMIN_D_CANDIDATES if path.is_dir()), None)
    if supermin is None or supermin_d is None:
        raise ProvisionError("no libguestfs appliance found and supermin or libguestfs's supermin.d is missing (install libguestfs-tools)")
    output.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    command = [
        supermin, "--build", "--if-newer", "--lock", str(output.parent / "lock"), "--copy-kernel",
        "-f", "ext2", "--host-cpu", os.uname().machine, str(supermin_d), "-o", str(output),
    ]
    log.debug("building or refreshing the libguestfs appliance with supermin")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise ProvisionError(f"supermin failed to build the appliance: {last}")


def find_appliance_dir() -> Path:
    """A directory holding kernel, initrd and root, building the supermin one if needed."""
    for directory in _libguestfs_appliance_dirs():
        if _is_complete(directory) and (directory / "README.fixed").exists():
            return directory  # a fixed appliance is used as it is
    supermin_dir = _supermin_cache_dir()
    _build_with_supermin(supermin_dir)
    if not _is_complete(supermin_dir):
        raise ProvisionError(f"supermin ran but {supermin_dir} has no kernel/initrd/root")
    return supermin_dir


def ext2_uuid(image: Path) -> str:
    """The filesystem UUID of an ext2/3/4 image (the appliance boots with root=UUID=…)."""
    with image.open("rb") as f:
        f.seek(1024)
        superblock = f.read(1024)
    if len(superblock) < 136 or superblock[56:58] != b"\x53\xef":
        raise ProvisionError(f"{image} is not an ext2 filesystem image")
    return str(uuid.UUID(bytes=superblock[104:120]))


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the data regions of a sparse file, via SEEK_DATA/SEEK_HOLE."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole remains
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end - start
        offset = end


def content_hash(paths: list[Path]) -> str:
    """SHA-256 over the files' sizes and data regions (holes are skipped, not read)."""
    digest = hashlib.sha256()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            digest.update(f"{path.name}:{size}\n".encode())
            for start, length in _data_extents(fd, size):
                digest.update(f"@{start}\n".encode())
                os.lseek(fd, start, os.SEEK_SET)
                remaining = length
                while remaining:
                    block = os.read(fd, min(remaining, 8 * 1024 * 1024))
                    if not block:
                        break
                    digest.update(block)
                    remaining -= len(block)
        finally:
            os.close(fd)
    return digest.hexdigest()


def _identity(paths: list[Path]) -> str:
    """A cheap key for 'these files have not changed': device, inode, size, mtime."""
    parts = []
    for path in paths:
        st = path.stat()
        parts.append(f"{path}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _memoized_hash(paths: list[Path]) -> str:
    index_path = cache_dir() / "hash-index.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    key = _identity(paths)
    if key not in index:
        index[key] = content_hash(paths)
        index_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(index_path, json.dumps(index, indent=1).encode())
    return str(index[key])


def _write_atomically(path: Path, data: bytes) -> None:
    with tempfile.NamedTemporaryFile(dir=path.parent, delete=False) as tmp:
        tmp.write(data)
    os.replace(tmp.name, path)


def _compressed_root(root: Path, digest: str, unchanged: Callable[[], bool]) -> Path | None:
    """The appliance root as a compressed qcow2 in the cache (made once per appliance version);
    None if ``unchanged()`` says the appliance was replaced while it was being compressed."""
    target = cache_dir() / "appliances" / digest[:16] / "root.qcow2"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".partial-{os.getpid()}")
    started = time.monotonic()
    result = subprocess.run(
        ["qemu-img", "convert", "-c", "-O", "qcow2", "-f", "raw", str(root), str(partial)],
        capture_output=True, text=True,
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise ProvisionError(f"qemu-img could not compress the appliance root: {result.stderr.strip()}")
    if not unchanged():
        partial.unlink(missing_ok=True)
        return None
    os.replace(partial, target)
    log.info("compressed the appliance root to %d MB in %.1f s", target.stat().st_size >> 20, time.monotonic() - started)
    return target


_PREPARE_ATTEMPTS = 3


def prepare_local_appliance() -> LocalAppliance:
    """Find or build the appliance and its compressed root (blocking; run in a thread).

    Another libguestfs user may have supermin rebuild the appliance meanwhile (it renames a new
    directory into place): hash, root UUID and compressed root are taken again until they all come
    from one version, else the appliance would wait forever for a root UUID that is not there.
    Other virtmounts of this user wait for one preparation at a time (a lock file in the cache):
    two compressing at once once mixed their outputs into a root that never booted.
    """
    lock_path = cache_dir() / "appliances" / ".lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _prepare_local_appliance()


def _prepare_local_appliance() -> LocalAppliance:
    for _ in range(_PREPARE_ATTEMPTS):
        directory = find_appliance_dir()
        files = [directory / name for name in APPLIANCE_FILES]
        identity = _identity(files)

        def unchanged() -> bool:
            try:
                return _identity(files) == identity
            except OSError:  # between the old directory going and the new one coming
                return False
        digest = _memoized_hash(files)
        root_uuid = ext2_uuid(files[2])
        root_qcow2 = _compressed_root(files[2], digest, unchanged)
        if root_qcow2 is not None and unchanged():
            return LocalAppliance(kernel=files[0], initrd=files[1], root_qcow2=root_qcow2, root_uuid=root_uuid,
                                  content_hash=digest)
        log.info("the libguestfs appliance was rebuilt while it was being prepared; preparing it again")
    raise ProvisionError(f"the libguestfs appliance kept changing while it was being prepared ({_PREPARE_ATTEMPTS} tries)")


# --- the host side -----------------------------------------------------------------


def volume_names(digest: str) -> dict[str, str]:
    prefix = f"virtmount-appliance-{digest[:16]}"
    return {
        "kernel": f"{prefix}-kernel",
        "initrd": f"{prefix}-initrd",
        "root": f"{prefix}-root.qcow2",
        "marker": f"{prefix}-complete",
        "uploading": f"{prefix}-uploading",  # held by the one virtmount uploading this version
    }


def _default_pool_directory(conn: libvirt.virConnect, name: str) -> str:
    """A directory named as the pool beside the host's 'default' pool when it has one (e.g.
    /var/lib/libvirt/virtmount), else in /var/lib/libvirt; each pool gets a directory of its own."""
    try:
        default = conn.storagePoolLookupByName("default")
        path = pool_directory(default)
        if path:
            return os.path.join(os.path.dirname(path), name)
    except libvirt.libvirtError:
        pass
    return os.path.join("/var/lib/libvirt", name)


def ensure_pool(conn: libvirt.virConnect, name: str) -> libvirt.virStoragePool:
    """The named pool, defined as a directory pool and started if needed (blocking)."""
    try:
        pool = conn.storagePoolLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_POOL:
            raise
        pool_xml = ET.Element("pool", type="dir")
        ET.SubElement(pool_xml, "name").text = name
        target = ET.SubElement(pool_xml, "target")
        ET.SubElement(target, "path").text = _default_pool_directory(conn, name)
        pool = conn.storagePoolDefineXML(ET.tostring(pool_xml, encoding="unicode"), 0)
        pool.build(0)
        pool.setAutostart(1)
        log.info("defined storage pool %s", name)
    if not pool.isActive():
        pool.create(0)
    try:
        pool.refresh(0)  # volumes made on the host without libvirt
    except libvirt.libvirtError as exc:  # e.g. "has asynchronous jobs running": another virtmount uploads
        log.debug("pool %s not refreshed: %s", name, libvirt_message(exc))
    return pool


def lookup_volume(pool: libvirt.virStoragePool, name: str) -> libvirt.virStorageVol | None:
    """The named volume of ``pool``, or None (blocking)."""
    try:
        return pool.storageVolLookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
            return None
        raise


def delete_volume(pool: libvirt.virStoragePool, name: str) -> None:
    """Delete the named volume of ``pool`` if there is one (blocking)."""
    volume = lookup_volume(pool, name)
    if volume is not None:
        volume.delete(0)


def _create_raw_volume(pool: libvirt.virStoragePool, name: str, size: int) -> libvirt.virStorageVol:
    volume = ET.Element("volume")
    ET.SubElement(volume, "name").text = name
    ET.SubElement(volume, "capacity", unit="bytes").text = str(max(size, 512))
    ET.SubElement(volume, "allocation", unit="bytes").text = "0"
    target = ET.SubElement(volume, "target")
    ET.SubElement(target, "format", type="raw")
    return pool.createXML(ET.tostring(volume, encoding="unicode"), 0)


async def _upload_sparse(conn: libvirt.virConnect, volume: libvirt.virStorageVol, path: Path) -> None:
    """Upload a local file into a volume, sending holes as holes."""
    raw_stream = LibvirtByteStream.new_stream(conn)
    size = path.stat().st_size
    await run_blocking(volume.upload, raw_stream, 0, size, libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM)
    stream = LibvirtByteStream(raw_stream, f"upload of {path.name}")
    stream.start()
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            position = 0
            for start, length in _data_extents(fd, size):
                if start > position:
                    await stream.send_hole(start - position)
                end = start + length
                while start < end:
                    block = os.pread(fd, min(UPLOAD_CHUNK, end - start), start)
                    await stream.send_all(block)
                    start += len(block)
                position = end
            if size > position:
                await stream.send_hole(size - position)
        finally:
            os.close(fd)
        await stream.finish()
    except BaseException:
        await stream.aclose()
        raise


async def _upload_once(conn: libvirt.virConnect, pool: libvirt.virStoragePool, pool_name: str,
                       names: dict[str, str], sources: dict[str, Path]) -> None:
    """Upload the appliance unless another virtmount is uploading it to this pool: then wait for its
    marker. The uploader holds the ``uploading`` volume (made exclusively); one older than
    UPLOAD_LOCK_STALE_S was left by an uploader that died. Two uploaders once deleted each other's
    volumes, and a marker came before a whole root."""
    while True:
        try:
            await run_blocking(_create_raw_volume, pool, names["uploading"], 0)
            break
        except libvirt.libvirtError as exc:
            if exc.get_error_code() != libvirt.VIR_ERR_STORAGE_VOL_EXIST:
                raise
        if await run_blocking(lookup_volume, pool, names["marker"]) is not None:
            return
        age = await run_blocking(_delete_if_older, pool, names["uploading"], UPLOAD_LOCK_STALE_S)
        if age is not None:
            log.warning("pool %s: an upload of the appliance began %.0f s ago and never ended; uploading again",
                        pool_name, age)
            continue
        await trio.sleep(UPLOAD_WAIT_STEP_S)
    try:
        if await run_blocking(lookup_volume, pool, names["marker"]) is not None:
            return  # finished by the uploader we waited for
        started = time.monotonic()
        total = 0
        for role, path in sources.items():
            await run_blocking(delete_volume, pool, names[role])  # left by an upload that did not finish
            volume = await run_blocking(_create_raw_volume, pool, names[role], path.stat().st_size)
            await _upload_sparse(conn, volume, path)
            total += path.stat().st_size
        await run_blocking(_create_raw_volume, pool, names["marker"], 0)
        log.info("uploaded the appliance (%d MB) to pool %s in %.1f s", total >> 20, pool_name,
                 time.monotonic() - started)
    finally:
        with trio.CancelScope(shield=True):
            try:
                await run_blocking(delete_volume, pool, names["uploading"])
            except libvirt.libvirtError as exc:
                log.warning("pool %s: cannot delete %s: %s", pool_name, names["uploading"], libvirt_message(exc))


def _delete_if_older(pool: libvirt.virStoragePool, name: str, seconds: float) -> float | None:
    """Delete the named volume if it was made (its ctime on the host) more than ``seconds`` ago; its
    age if it was deleted, else None (blocking). Age and deletion come milliseconds apart, so a lock
    another virtmount has just taken is not broken."""
    volume = lookup_volume(pool, name)
    if volume is None:
        return None
    try:
        ctime = ET.fromstring(volume.XMLDesc(0)).findtext("./target/timestamps/ctime")
        age = None if not ctime else time.time() - float(ctime)
        if age is None or age <= seconds:
            return None
        volume.delete(0)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_STORAGE_VOL:
            return None  # another virtmount broke that lock first
        raise
    return age


async def provision(conn: libvirt.virConnect, pool_name: str) -> HostAppliance:
    """Make sure the host holds this client's appliance; upload it if not."""
    local = await trio.to_thread.run_sync(prepare_local_appliance)
    names = volume_names(local.content_hash)
    try:
        pool = await run_blocking(ensure_pool, conn, pool_name)
        marker = await run_blocking(lookup_volume, pool, names["marker"])
        sources = {"kernel": local.kernel, "initrd": local.initrd, "root": local.root_qcow2}
        if marker is None:
            await _upload_once(conn, pool, pool_name, names, sources)
        paths = {}
        for role in sources:
            volume = await run_blocking(lookup_volume, pool, names[role])
            if volume is None:
                raise ProvisionError(f"appliance volume {names[role]} vanished from pool {pool_name}")
            paths[role] = await run_blocking(volume.path)
    except libvirt.libvirtError as exc:
        raise ProvisionError(f"cannot place the appliance in storage pool {pool_name!r}: {libvirt_message(exc)}",
                             errno_of(exc)) from None
    except StreamClosed as exc:
        raise ProvisionError(f"uploading the appliance to pool {pool_name!r} failed: {exc}", errno_of(exc)) from None
    return HostAppliance(paths["kernel"], paths["initrd"], paths["root"], local.root_uuid)
