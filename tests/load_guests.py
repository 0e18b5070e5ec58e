"""Small guests for the load tests: each one ext4 disk of its own files, made in user space and cached.

Guest ``i`` (domain ``virtmount-test-load-<i>``) holds ``FILES`` files ``/data/fNN`` of sizes from
1 KiB to 1 MiB whose contents differ per guest, so a reply delivered to the wrong reader, file or
guest shows as a checksum error. ``guest_files(i)`` gives their expected SHA-256.
"""

from __future__ import annotations

import hashlib
import inspect
import tempfile
from pathlib import Path

from tests import hostile_images, images

FILES = 48
IMAGE_SIZE = 64 * images.MiB


def _size(number: int) -> int:
    return 1024 + (number * 21_871) % (1024 * 1024)  # 1 KiB .. 1 MiB, odd sizes


def _content(guest: int, number: int) -> bytes:
    return images.pseudo_random(f"load guest {guest} file {number}", _size(number))


def guest_files(guest: int) -> dict[str, str]:
    """/data/fNN -> SHA-256 hex of its content."""
    return {f"data/f{n:02d}": hashlib.sha256(_content(guest, n)).hexdigest() for n in range(FILES)}


def file_content(guest: int, path: str) -> bytes:
    """The content of ``path`` (as ``guest_files`` names it: data/fNN) in guest ``guest``."""
    return _content(guest, int(path.rsplit("/f", 1)[1]))


def domain_name(guest: int) -> str:
    return f"virtmount-test-load-{guest}"


def image(guest: int) -> Path:
    recipe = inspect.getsource(_size) + inspect.getsource(_content)
    digest = hashlib.sha256(f"{recipe}{FILES}{IMAGE_SIZE}".encode()).hexdigest()[:12]
    target = images.IMAGE_DIR / f"load{guest}-{digest}.img"
    if not target.exists():
        with images.locked(f"load{guest}"):
            if not target.exists():
                for old in images.IMAGE_DIR.glob(f"load{guest}-*.img"):
                    old.unlink()
                images.write_atomically(target.stem, target, lambda tmp: _fill(guest, tmp))
    return target


def _fill(guest: int, tmp: Path) -> None:
    with tempfile.TemporaryDirectory(dir=images.IMAGE_DIR) as tree:
        data = Path(tree, "data")
        data.mkdir()
        for n in range(FILES):
            (data / f"f{n:02d}").write_bytes(_content(guest, n))
        hostile_images.make_ext_image("ext4", tmp, IMAGE_SIZE, Path(tree))


def ensure_domain(uri: str, guest: int) -> str:
    """The shut-off domain of guest ``guest`` (defined or redefined as needed); its name."""
    hostile_images.ensure_multi_disk_domain(uri, domain_name(guest), [image(guest)])
    return domain_name(guest)
