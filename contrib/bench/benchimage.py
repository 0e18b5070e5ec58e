"""The benchmark guest: a Debian look-alike with ~25,000 entries and a 64 MiB file.

Layout (same as the standard test image, built by tests/images.py's builder):
GPT, sda1 ext4 /boot, LVM VG ``vg0`` with LV ``root`` (ext4, /) and LV ``data``
(XFS, /srv/data).  Content, all deterministic:

* ``/usr/share/bench/pkgNNN/`` (350 dirs, ext4) and ``/srv/data/pkgNNN/``
  (50 dirs, XFS): 10 to 90 files each (50 on average), 0-16 KiB of
  pseudo-random bytes per file (one in ten empty);
* ``/usr/share/bench/wide-0``, ``wide-1`` (ext4) and ``/srv/data/wide-2``
  (XFS): 1000 files each;
* ``/opt/bench-deep/``: a binary tree of directories 6 levels deep, 3 files in
  every directory;
* ``/usr/share/bench/links/``: 200 symlinks (relative, absolute, dangling);
  ``/usr/share/bench/hardlinks/``: 20 hard links to pkg files;
  20 files with user xattrs;
* ``/var/lib/bench/big.bin``: 64 MiB of pseudo-random bytes (BIG_FILE).

The image is cached as ``images.IMAGE_DIR/bench-<hash>.qcow2`` where <hash>
covers this file and tests/images.py (built into a temporary file, renamed
into place after inspection succeeded, under the images lock; stale bench
images are removed).

Run ``.venv/bin/python contrib/bench/benchimage.py`` to build it and define
the shut-off domain ``virtmount-bench`` on qemu:///system.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests import images  # noqa: E402

MiB = images.MiB
GiB = images.GiB

RECIPE = "bench"
DOMAIN_NAME = "virtmount-bench"
HOSTNAME = "virtmount-bench"
BIG_FILE = "/var/lib/bench/big.bin"
BIG_FILE_SIZE = 64 * MiB
BIG_FILE_SEED = "virtmount-bench/big.bin"

MAX_SMALL_FILE = 16 * 1024


def big_file_content() -> bytes:
    return images.pseudo_random(BIG_FILE_SEED, BIG_FILE_SIZE)


def _small_size(rng: random.Random) -> int:
    if rng.random() < 0.1:
        return 0
    # Skewed towards small files, as in a real OS tree (mean about 5 KiB).
    return int(MAX_SMALL_FILE * rng.random() ** 2)


def _make_spec() -> images.ImageSpec:
    base = images._debian_like(RECIPE, HOSTNAME, b"virtmount benchmark guest", 0, 0)
    rng = random.Random("virtmount-bench")
    files = dict(base.files)
    dirs = list(base.dirs)

    def add_file(path: str) -> None:
        files[path] = images.pseudo_random("bench:" + path, _small_size(rng))

    pkg_files: list[str] = []
    for i in range(400):
        parent = f"/usr/share/bench/pkg{i:03d}" if i < 350 else f"/srv/data/pkg{i:03d}"
        count = 10 + (i * 37) % 81  # 10..90, mean 50
        for j in range(count):
            path = f"{parent}/file{j:02d}.{('txt', 'py', 'so', 'conf', 'gz')[j % 5]}"
            add_file(path)
            pkg_files.append(path)
    for k, parent in enumerate(("/usr/share/bench/wide-0", "/usr/share/bench/wide-1", "/srv/data/wide-2")):
        for j in range(1000):
            add_file(f"{parent}/entry-{j:04d}")

    def deep(path: str, level: int) -> None:
        dirs.append(path)
        for j in range(3):
            add_file(f"{path}/f{j}")
        if level < 6:
            deep(f"{path}/a", level + 1)
            deep(f"{path}/b", level + 1)

    deep("/opt/bench-deep", 0)

    symlinks = dict(base.symlinks)
    for j in range(200):
        target = pkg_files[rng.randrange(len(pkg_files))]
        link = f"/usr/share/bench/links/link{j:03d}"
        if j % 20 == 0:
            symlinks[link] = f"missing/target-{j}"           # dangling
        elif j % 4 == 0:
            symlinks[link] = target                           # absolute
        else:
            symlinks[link] = os.path.relpath(target, "/usr/share/bench/links")  # relative
    hardlinks = dict(base.hardlinks)
    ext4_pkg_files = [p for p in pkg_files if p.startswith("/usr/share/")]
    for j in range(20):
        hardlinks[f"/usr/share/bench/hardlinks/hl{j:02d}"] = ext4_pkg_files[j * 97]
    xattrs = {path: dict(v) for path, v in base.xattrs.items()}
    for j in range(20):
        path = pkg_files[j * 311]
        xattrs[path] = {"user.bench.index": str(j).encode(), "user.bench.note": b"virtmount benchmark"}

    files[BIG_FILE] = big_file_content()
    assert images.pseudo_random(BIG_FILE_SEED, 16) == files[BIG_FILE][:16]

    return dataclasses.replace(
        base,
        files=files,
        dirs=tuple(dirs),
        symlinks=symlinks,
        hardlinks=hardlinks,
        xattrs=xattrs,
    )


def recipe_hash() -> str:
    """Hash of this file and tests/images.py (whose builder makes the image)."""
    return images.recipe_hash(Path(__file__))


def image_path() -> Path:
    return images.IMAGE_DIR / f"{RECIPE}-{recipe_hash()}.qcow2"


def build(*, log: Callable[[str], None] | None = None) -> Path:
    """The cached benchmark image, built if missing (a few minutes under TCG)."""
    say = log or (lambda _msg: None)
    path = image_path()
    if path.exists():
        return path
    with images.locked(RECIPE):
        if path.exists():
            return path
        start = time.monotonic()
        spec = _make_spec()
        say(f"building {path}: {len(spec.files)} files, {len(spec.symlinks)} symlinks, "
            f"{len(spec.hardlinks)} hard links (a few minutes)")
        images.write_atomically(RECIPE, path, lambda tmp: images.build_into(spec, tmp))
        for old in [*images.IMAGE_DIR.glob(f"{RECIPE}-*.qcow2"), *images.IMAGE_DIR.glob(f".{RECIPE}-*.qcow2.tmp")]:
            if old != path and ".TRANSIENT-" not in old.name:
                old.unlink(missing_ok=True)
        say(f"built {path} in {time.monotonic() - start:.1f}s")
    return path


def ensure(uri: str = "qemu:///system", *, log: Callable[[str], None] | None = None) -> Path:
    """Build (or reuse) the image and define it as the shut-off domain DOMAIN_NAME on uri."""
    path = build(log=log)
    images.ensure_domain(uri, DOMAIN_NAME, path)
    return path


if __name__ == "__main__":
    print(ensure(log=print))
