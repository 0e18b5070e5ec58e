"""Test guest images: built once with libguestfs, cached, described by constants.

Images are built with the ``guestfs`` Python module (Debian's, seen through the
venv's system site packages) using the direct backend and TCG (KVM is broken
on the CI machines).  Each image is cached as::

    $VIRTMOUNT_TEST_IMAGES/<recipe name>-<hash>.qcow2
    (default directory: /var/lib/libvirt/images/virtmount-tests)

where <hash> covers this file's source, so any change to a recipe or to the
builder makes a new image (stale images of the same recipe are deleted).  An
image is built into a temporary file and renamed into place only after it was
read back in the building appliance (its tree, filesystems and libguestfs
inspection checked against the recipe), so an interrupted or wrong build never
leaves a cached image.  A lock file per image serialises concurrent builders of it.

Recipes:

* ``STANDARD`` -- "Debian 12" look-alike: 2 GiB qcow2, GPT; sda1 ext4 /boot;
  sda2 LVM PV of VG ``vg0`` with LV ``root`` (ext4, /) and LV ``data``
  (XFS, /srv/data).  Known files on each filesystem (``STANDARD.files``).
* ``NOOS`` -- tiny qcow2 with one ext4 filesystem on the bare disk (no
  partition table) and no operating system.
* ``DEMO`` -- same layout as STANDARD with other names, for ``make demo``.

Device names in ``mountpoints``/``Filesystem.device`` are those the libguestfs
appliance gives the image when it is the *first* (and only) guest disk.

Usage::

    from tests import images
    path = images.build(images.STANDARD)     # cached after the first call
    images.STANDARD.files["/etc/virtmount-test"]  # expected bytes

Run ``python -m tests.images [recipe...]`` to build (or find) images by hand.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import sys
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Mapping

MiB = 1024 * 1024
GiB = 1024 * MiB

IMAGE_DIR = Path(
    os.environ.get("VIRTMOUNT_TEST_IMAGES", "/var/lib/libvirt/images/virtmount-tests")
)

# All files, directories and symlinks created by the builder get this mtime
# and atime (2024-01-02T03:04:05Z), so getattr tests can compare it.
FILE_MTIME = 1704164645

_UUID_NS = uuid.UUID("6b1f0c1e-1d7a-4f55-9a53-3c6a2f0b7d11")


def _fs_uuid(recipe: str, role: str) -> str:
    """Deterministic filesystem UUID, distinct per recipe and filesystem."""
    return str(uuid.uuid5(_UUID_NS, f"{recipe}/{role}"))


def pseudo_random(seed: str, size: int) -> bytes:
    """Deterministic pseudo-random bytes (SHAKE-256 of the seed)."""
    return hashlib.shake_256(seed.encode()).digest(size)


@dataclass(frozen=True)
class Filesystem:
    """One filesystem of a test image."""

    device: str        # appliance device name, e.g. "/dev/sda1", "/dev/vg0/root"
    fstype: str        # "ext4", "xfs"
    label: str
    uuid: str
    size_mib: int      # partition/LV size (0: the rest of the disk)
    mountpoint: str | None  # in the guest; None: not mounted by the guest


@dataclass(frozen=True)
class Inspection:
    """What libguestfs inspection must report for the image's OS."""

    root: str                       # root device, e.g. "/dev/vg0/root"
    os_type: str                    # inspect_get_type
    distro: str                     # inspect_get_distro
    major: int                      # inspect_get_major_version
    minor: int                      # inspect_get_minor_version
    product_name: str               # inspect_get_product_name
    hostname: str                   # inspect_get_hostname
    package_format: str             # inspect_get_package_format
    mountpoints: Mapping[str, str]  # inspect_get_mountpoints: mountpoint -> device


@dataclass(frozen=True)
class ImageSpec:
    """A test image recipe and everything a test may want to check."""

    name: str
    layout: Literal["gpt-lvm", "bare"]
    size: int                           # virtual size, bytes
    filesystems: tuple[Filesystem, ...]
    # Regular files, by absolute path in the guest (for "bare": from the
    # filesystem's root), with their exact contents.
    files: Mapping[str, bytes]
    # Directories created explicitly (parents of files are created too).
    dirs: tuple[str, ...] = ()
    # Symlinks: path -> target (stored verbatim).
    symlinks: Mapping[str, str] = field(default_factory=dict)
    # Hard links: new path -> existing file path (same filesystem).
    hardlinks: Mapping[str, str] = field(default_factory=dict)
    # Permission bits (without file type) of paths; files not listed: 0o644,
    # dirs not listed: 0o755.
    modes: Mapping[str, int] = field(default_factory=dict)
    # Owner (uid, gid) of paths; not listed: (0, 0).
    owners: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    # Extended attributes: path -> {name: value}.
    xattrs: Mapping[str, Mapping[str, bytes]] = field(default_factory=dict)
    inspection: Inspection | None = None  # None: no operating system

    @property
    def mountpoints(self) -> dict[str, str]:
        """Guest mountpoint -> device, for the mounted filesystems."""
        return {f.mountpoint: f.device for f in self.filesystems if f.mountpoint}


# ---------------------------------------------------------------- recipes


def _debian_like(
    name: str, hostname: str, marker: bytes, random_size: int, many: int
) -> ImageSpec:
    """A Debian 12 look-alike with /boot, / (LVM) and /srv/data (LVM, XFS)."""
    boot = Filesystem("/dev/sda1", "ext4", "boot", _fs_uuid(name, "boot"), 200, "/boot")
    root = Filesystem("/dev/vg0/root", "ext4", "root", _fs_uuid(name, "root"), 1024, "/")
    # XFS refuses filesystems smaller than 300 MiB.
    data = Filesystem("/dev/vg0/data", "xfs", "data", _fs_uuid(name, "data"), 512, "/srv/data")

    os_release = (
        'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n'
        'NAME="Debian GNU/Linux"\n'
        'VERSION_ID="12"\n'
        'VERSION="12 (bookworm)"\n'
        "VERSION_CODENAME=bookworm\n"
        "ID=debian\n"
        'HOME_URL="https://www.debian.org/"\n'
    ).encode()
    fstab = (
        "# /etc/fstab: static file system information (virtmount test image)\n"
        f"/dev/vg0/root  /          ext4  errors=remount-ro  0  1\n"
        f"UUID={boot.uuid}  /boot  ext4  defaults  0  2\n"
        f"/dev/vg0/data  /srv/data  xfs   defaults  0  2\n"
    ).encode()

    files: dict[str, bytes] = {
        # What libguestfs inspection looks at (see _check_inspection).
        "/etc/os-release": os_release,
        "/etc/debian_version": b"12.5\n",
        "/etc/hostname": hostname.encode() + b"\n",
        "/etc/hosts": b"127.0.0.1\tlocalhost\n127.0.1.1\t" + hostname.encode() + b"\n",
        "/etc/fstab": fstab,
        "/var/lib/dpkg/status": b"",
        # Known test files, one set per filesystem.
        "/etc/virtmount-test": marker + b" on the root filesystem\n",
        "/etc/empty": b"",
        "/boot/virtmount-boot": marker + b" on /boot\n",
        "/srv/data/hello.txt": b"Hello from /srv/data!\n",
        # Not a multiple of any block size, to catch short/long reads.
        "/srv/data/random.bin": pseudo_random(name + "/random.bin", random_size),
        "/srv/data/d\u00efr with spaces/\u00fcn\u00efc\u00f8d\u00e9.txt": "\u00e9t\u00e9\n".encode(),
        "/srv/data/owned.txt": b"owned by 1000:1000, mode 0600\n",
    }
    # A directory with many entries (readdir paging).
    for i in range(many):
        files[f"/srv/data/many/f{i:04d}"] = f"{i}\n".encode()

    return ImageSpec(
        name=name,
        layout="gpt-lvm",
        size=2 * GiB,
        filesystems=(boot, root, data),
        files=files,
        dirs=("/bin", "/usr/bin", "/usr/sbin", "/usr/lib", "/tmp", "/root", "/srv/data/empty-dir"),
        symlinks={
            "/etc/virtmount-link": "virtmount-test",   # relative
            "/srv/data/abs-link": "/srv/data/hello.txt",  # absolute
            "/srv/data/dangling": "does/not/exist",
        },
        hardlinks={"/srv/data/hello-hardlink.txt": "/srv/data/hello.txt"},
        modes={"/srv/data/owned.txt": 0o600, "/tmp": 0o1777, "/root": 0o700},
        owners={"/srv/data/owned.txt": (1000, 1000)},
        xattrs={"/etc/virtmount-test": {"user.virtmount": b"xattr-value"}},
        inspection=Inspection(
            root=root.device,
            os_type="linux",
            distro="debian",
            major=12,
            # On Debian, libguestfs takes the version and product name from
            # /etc/debian_version rather than os-release.
            minor=5,
            product_name="12.5",
            hostname=hostname,
            package_format="deb",
            mountpoints={"/": root.device, "/boot": boot.device, "/srv/data": data.device},
        ),
    )


STANDARD = _debian_like(
    "standard", "virtmount-test", b"virtmount standard test guest", 3 * MiB + 12345, 300
)
DEMO = _debian_like("demo", "virtmount-demo", b"virtmount demo guest", 1 * MiB + 7, 20)

NOOS = ImageSpec(
    name="noos",
    layout="bare",
    size=64 * MiB,
    filesystems=(Filesystem("/dev/sda", "ext4", "noos", _fs_uuid("noos", "fs"), 0, None),),
    files={"/hello.txt": b"no operating system here\n"},
    inspection=None,
)

RECIPES: dict[str, ImageSpec] = {s.name: s for s in (STANDARD, NOOS, DEMO)}

# Flat constants for the standard guest, for convenience in tests.
STANDARD_FILES = STANDARD.files
ROOT_TEST_FILE = "/etc/virtmount-test"
BOOT_TEST_FILE = "/boot/virtmount-boot"
DATA_TEST_FILE = "/srv/data/hello.txt"
DATA_RANDOM_FILE = "/srv/data/random.bin"
MANY_DIR = "/srv/data/many"
assert STANDARD.inspection is not None
EXPECTED_OS_TYPE = STANDARD.inspection.os_type            # "linux"
EXPECTED_DISTRO = STANDARD.inspection.distro              # "debian"
EXPECTED_MAJOR = STANDARD.inspection.major                # 12
EXPECTED_MINOR = STANDARD.inspection.minor                # 0
EXPECTED_HOSTNAME = STANDARD.inspection.hostname          # "virtmount-test"
EXPECTED_PRODUCT_NAME = STANDARD.inspection.product_name
EXPECTED_MOUNTPOINTS = dict(STANDARD.inspection.mountpoints)
NOOS_FILES = NOOS.files


# ---------------------------------------------------------------- building


class ImageBuildError(RuntimeError):
    pass


def recipe_hash(*more_sources: Path) -> str:
    """Hash of this module's source (and of the callers' recipe files): any change rebuilds."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    for source in more_sources:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def image_path(spec: ImageSpec) -> Path:
    return IMAGE_DIR / f"{spec.name}-{recipe_hash()}.qcow2"


def new_handle():  # -> guestfs.GuestFS
    """A guestfs handle on the direct backend with TCG (KVM broken here)."""
    import guestfs

    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend("direct")
    g.set_backend_settings(["force_tcg"])
    return g


@contextlib.contextmanager
def locked(name: str) -> Iterator[None]:
    """Serialise the builds of one cached image (or set of images) ``name`` between processes; other
    images build at the same time (tests/prebuild.py builds two at once)."""
    IMAGE_DIR.mkdir(parents=True, exist_ok=True)
    with open(IMAGE_DIR / f".lock-{name}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build(spec: ImageSpec, *, log=None) -> Path:
    """Return the path of spec's cached image, building it if needed."""
    path = image_path(spec)
    if path.exists():
        return path
    with locked(spec.name):
        if path.exists():  # built by a concurrent process meanwhile
            return path
        start = time.monotonic()
        write_atomically(spec.name, path, lambda tmp: build_into(spec, tmp))
        # Remove stale images of this recipe (older recipe hashes) and
        # leftovers of interrupted builds.
        for old in IMAGE_DIR.glob(f"{spec.name}-*.qcow2"):
            if old != path:
                old.unlink(missing_ok=True)
        for old in IMAGE_DIR.glob(f".{spec.name}-????????.qcow2.tmp"):  # write_atomically's, not another image's
            old.unlink(missing_ok=True)
        if log:
            log(f"built {path} in {time.monotonic() - start:.1f}s")
    return path


def write_atomically(name: str, target: Path, fill: Callable[[Path], None]) -> None:
    """Make an image with ``fill(tmp)`` in a temporary file, then rename it to ``target``,
    so that an interrupted build never leaves a corrupt cached image (hold ``locked(name)``)."""
    fd, tmp_name = tempfile.mkstemp(dir=IMAGE_DIR, prefix=f".{name}-", suffix=".qcow2.tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        fill(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.chmod(0o644)
        tmp.rename(target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build_into(spec: ImageSpec, target: Path) -> None:
    g = new_handle()
    try:
        g.disk_create(str(target), "qcow2", spec.size)
        g.add_drive_opts(str(target), format="qcow2", readonly=False)
        g.launch()
        if spec.layout == "gpt-lvm":
            _make_gpt_lvm(g, spec)
        elif spec.layout == "bare":
            _make_bare(g, spec)
        else:
            raise ImageBuildError(f"unknown layout {spec.layout!r}")
        _populate(g, spec)
        _check_contents(g, spec)
        g.umount_all()
        g.sync()
        _check_inspection(g, spec)
        g.shutdown()
    finally:
        g.close()


def _make_gpt_lvm(g, spec: ImageSpec) -> None:
    boot, root, data = spec.filesystems
    g.part_init("/dev/sda", "gpt")
    sector = 512
    first = MiB // sector  # 1 MiB aligned
    boot_end = first + boot.size_mib * MiB // sector - 1
    g.part_add("/dev/sda", "p", first, boot_end)
    g.part_add("/dev/sda", "p", boot_end + 1, -(MiB // sector))  # leave 1 MiB at the end
    g.part_set_name("/dev/sda", 1, "boot")
    g.part_set_name("/dev/sda", 2, "lvm")
    g.pvcreate("/dev/sda2")
    g.vgcreate("vg0", ["/dev/sda2"])
    g.lvcreate("root", "vg0", root.size_mib)
    g.lvcreate("data", "vg0", data.size_mib)
    for fs in spec.filesystems:
        _mkfs(g, fs)
    # Mount in mountpoint order so parents come first.
    for fs in sorted(spec.filesystems, key=lambda f: f.mountpoint or ""):
        assert fs.mountpoint
        if fs.mountpoint != "/":
            g.mkdir_p(fs.mountpoint)
        g.mount(fs.device, fs.mountpoint)


def _make_bare(g, spec: ImageSpec) -> None:
    (fs,) = spec.filesystems
    _mkfs(g, fs)
    g.mount(fs.device, "/")


def _mkfs(g, fs: Filesystem) -> None:
    g.mkfs(fs.fstype, fs.device, label=fs.label)
    g.set_uuid(fs.device, fs.uuid)


def _populate(g, spec: ImageSpec) -> None:
    """Copy spec's tree in with a single tar_in (one call instead of
    thousands: every guestfs call costs milliseconds under TCG)."""
    with tempfile.NamedTemporaryFile(suffix=".tar") as f:
        f.write(make_tar(spec))
        f.flush()
        g.tar_in(f.name, "/", xattrs=True)


def make_tar(spec: ImageSpec) -> bytes:
    """spec's directories, files, links and metadata as a pax tar archive."""
    import io

    def info(path: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo("." + path if path != "/" else ".")
        ti.type = kind
        ti.mode = spec.modes.get(path, mode)
        ti.uid, ti.gid = spec.owners.get(path, (0, 0))
        ti.uname = ti.gname = ""  # numeric ids
        ti.mtime = FILE_MTIME
        xattrs = spec.xattrs.get(path, {})
        # GNU tar --xattrs reads these pax records.
        ti.pax_headers = {f"SCHILY.xattr.{k}": v.decode() for k, v in xattrs.items()}
        return ti

    # Every directory: explicit ones, mountpoints, the root, parents of all.
    paths = [*spec.files, *spec.symlinks, *spec.hardlinks, *spec.dirs]
    paths += [fs.mountpoint for fs in spec.filesystems if fs.mountpoint]
    dirs = {"/"}
    for p in paths:
        parts = p.strip("/").split("/")
        dirs.update("/" + "/".join(parts[:i]) for i in range(1, len(parts)))
    dirs.update(spec.dirs)
    dirs.update(fs.mountpoint for fs in spec.filesystems if fs.mountpoint)

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for d in sorted(dirs):
            tar.addfile(info(d, tarfile.DIRTYPE, 0o755))
        for path, content in spec.files.items():
            ti = info(path, tarfile.REGTYPE, 0o644)
            ti.size = len(content)
            tar.addfile(ti, io.BytesIO(content))
        for path, target in spec.symlinks.items():
            ti = info(path, tarfile.SYMTYPE, 0o777)
            ti.linkname = target
            tar.addfile(ti)
        for path, existing in spec.hardlinks.items():
            ti = info(path, tarfile.LNKTYPE, 0o644)
            ti.linkname = "." + existing
            tar.addfile(ti)
    return buf.getvalue()


def _check_contents(g, spec: ImageSpec) -> None:
    """Fail loudly unless the mounted image reads back as the spec says: each filesystem's type, label
    and UUID, and every listed file, directory and link with its content, mode, owner, mtime and xattrs
    (read back in one ``tar_out`` of the whole tree, not a call per file)."""
    for fs in spec.filesystems:
        got = (g.vfs_type(fs.device), g.vfs_label(fs.device), g.vfs_uuid(fs.device))
        if got != (fs.fstype, fs.label, fs.uuid):
            raise ImageBuildError(f"{spec.name}: {fs.device} is {got}, want {(fs.fstype, fs.label, fs.uuid)}")
    with tempfile.NamedTemporaryFile(suffix=".tar") as archive:
        g.tar_out("/", archive.name, numericowner=True, xattrs=True)
        problems = _tree_differences(spec, tarfile.open(archive.name))
    if problems:
        raise ImageBuildError(f"{spec.name}: read back differs: {'; '.join(problems[:5])}")


def _tree_differences(spec: ImageSpec, archive: tarfile.TarFile) -> list[str]:
    """How the archive of the image's tree differs from what ``spec`` lists (nothing: [])."""
    def guest_path(name: str) -> str:  # tar's "./etc/x" (or "etc/x") as the spec's "/etc/x"
        return "/" + name.removeprefix("./")

    members = {guest_path(member.name): member for member in archive.getmembers()}
    problems = []

    def check(path: str, what: str, got: object, want: object) -> None:
        if got != want:
            problems.append(f"{path}: {what} {got!r}, want {want!r}")

    hard_linked = {*spec.hardlinks, *spec.hardlinks.values()}
    for path, content in spec.files.items():
        member = members.get(path)
        # the names of a hard-linked file: tar stores the one it meets first, the others as links to it
        stored = members.get(guest_path(member.linkname)) if member and member.islnk() else member
        if member is None or stored is None or not stored.isfile() or member.islnk() and path not in hard_linked:
            problems.append(f"{path}: not a regular file")
            continue
        data = archive.extractfile(stored)
        check(path, "content of", data.read() if data else None, content)
        check(path, "mode", stored.mode & 0o7777, spec.modes.get(path, 0o644))
        check(path, "owner", (stored.uid, stored.gid), spec.owners.get(path, (0, 0)))
        check(path, "mtime", int(stored.mtime), FILE_MTIME)
    for path in spec.dirs:
        member = members.get(path)
        check(path, "directory with mode", member.mode & 0o7777 if member and member.isdir() else None,
              spec.modes.get(path, 0o755))
    for path, target in spec.symlinks.items():
        member = members.get(path)
        check(path, "symlink to", member.linkname if member and member.issym() else None, target)
    for path, existing in spec.hardlinks.items():
        pair = (members.get(path), members.get(existing))
        link_targets = {guest_path(m.linkname) for m in pair if m is not None and m.islnk()}
        check(path, "hard link to", bool(link_targets & {path, existing}), True)
    for path, attributes in spec.xattrs.items():
        member = members.get(path)
        headers = member.pax_headers if member else {}
        got = {name: headers.get(f"SCHILY.xattr.{name}", "").encode("utf-8", "surrogateescape")
               for name in attributes}
        check(path, "xattrs", got, dict(attributes))
    return problems


def _check_inspection(g, spec: ImageSpec) -> None:
    """Fail loudly unless libguestfs inspection sees what the spec says."""
    roots = g.inspect_os()
    want = spec.inspection
    if want is None:
        if roots:
            raise ImageBuildError(f"{spec.name}: inspection found an OS in {roots}")
        return
    if roots != [want.root]:
        raise ImageBuildError(f"{spec.name}: inspection found roots {roots}, want [{want.root!r}]")
    r = want.root
    got = Inspection(
        root=r,
        os_type=g.inspect_get_type(r),
        distro=g.inspect_get_distro(r),
        major=g.inspect_get_major_version(r),
        minor=g.inspect_get_minor_version(r),
        product_name=g.inspect_get_product_name(r),
        hostname=g.inspect_get_hostname(r),
        package_format=g.inspect_get_package_format(r),
        mountpoints=dict(g.inspect_get_mountpoints(r)),
    )
    if got != want:
        raise ImageBuildError(f"{spec.name}: inspection gave {got}, want {want}")


# ---------------------------------------------------------------- domains

DOMAIN_METADATA_NS = "https://virtmount.invalid/test-fixture"


@dataclass(frozen=True)
class Guest:
    """A defined, shut-off test domain and what it must contain.

    Returned by the test_guest / nos_guest fixtures (tests/conftest.py).
    """

    name: str         # libvirt domain name
    uri: str          # libvirt URI it is defined on ("qemu:///system")
    image: Path       # its only disk (qcow2), target vda
    spec: ImageSpec   # recipe: expected files, filesystems, inspection

    @property
    def files(self) -> Mapping[str, bytes]:
        return self.spec.files

    @property
    def inspection(self) -> Inspection | None:
        return self.spec.inspection

    @property
    def mountpoints(self) -> dict[str, str]:
        return self.spec.mountpoints


def domain_xml(name: str, image: Path, memory_mib: int = 256) -> str:
    """A minimal TCG domain with the image as its only disk (vda)."""
    from xml.sax.saxutils import escape, quoteattr

    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file={quoteattr(str(image))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""


def ensure_domain(uri: str, name: str, image: Path) -> None:
    """Make `name` a persistent, shut-off domain defined by domain_xml()."""
    ensure_domain_xml(uri, name, domain_xml(name, image))


def ensure_domain_xml(uri: str, name: str, xml: str) -> None:
    """Make `name` a persistent, shut-off domain defined by ``xml``.

    The hash of the XML we define is kept in the domain's <metadata>; the
    domain is redefined when it differs (e.g. a rebuilt image).  A running
    domain of that name is destroyed (it must be shut off for tests).
    """
    import libvirt

    digest = hashlib.sha256(xml.encode()).hexdigest()
    conn = libvirt.open(uri)
    try:
        # (lookupByName would print "Domain not found" to stderr when absent)
        dom = next((d for d in conn.listAllDomains() if d.name() == name), None)
        if dom is not None:
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                try:
                    current = dom.metadata(
                        libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                        DOMAIN_METADATA_NS,
                        libvirt.VIR_DOMAIN_AFFECT_CONFIG,
                    )
                except libvirt.libvirtError:
                    current = ""
                if digest in current:
                    return
                dom.undefineFlags(
                    libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                    | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                    | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                    | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
                )
        dom = conn.defineXML(xml)
        dom.setMetadata(
            libvirt.VIR_DOMAIN_METADATA_ELEMENT,
            f"<recipe>{digest}</recipe>",
            "vmt",
            DOMAIN_METADATA_NS,
            libvirt.VIR_DOMAIN_AFFECT_CONFIG,
        )
    finally:
        conn.close()


def main(argv: list[str]) -> int:
    names = argv or list(RECIPES)
    for name in names:
        if name not in RECIPES:
            print(f"images: unknown recipe {name!r} (have {', '.join(RECIPES)})", file=sys.stderr)
            return 2
        print(build(RECIPES[name], log=print))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
