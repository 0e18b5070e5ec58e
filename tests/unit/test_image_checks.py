"""The read-back check of a freshly built test image (tests/images.py ``_tree_differences``), on archives
made in memory: it passes the archive the builder puts in, and names each kind of difference."""

from __future__ import annotations

import dataclasses
import io
import tarfile

from tests import images

SPEC = images.STANDARD


def _differences(archive_of: images.ImageSpec, checked_against: images.ImageSpec) -> list[str]:
    return images._tree_differences(checked_against, tarfile.open(fileobj=io.BytesIO(images.make_tar(archive_of))))


def test_the_tree_the_builder_puts_in_passes() -> None:
    assert _differences(SPEC, SPEC) == []


def test_each_kind_of_difference_is_named() -> None:
    file_path = images.ROOT_TEST_FILE
    [(link, target)] = list(SPEC.symlinks.items())[:1]
    [(twin, existing)] = SPEC.hardlinks.items()
    [(xattr_path, attributes)] = SPEC.xattrs.items()
    other_content = dataclasses.replace(SPEC, files={**SPEC.files, file_path: b"other"})
    other_mode = dataclasses.replace(SPEC, modes={**SPEC.modes, file_path: 0o600})
    other_owner = dataclasses.replace(SPEC, owners={**SPEC.owners, file_path: (1000, 1000)})
    other_target = dataclasses.replace(SPEC, symlinks={**SPEC.symlinks, link: target + "-elsewhere"})
    other_xattr = dataclasses.replace(SPEC, xattrs={xattr_path: {name: b"other" for name in attributes}})
    missing_file = dataclasses.replace(SPEC, files={**SPEC.files, "/nowhere": b""})
    no_twin = dataclasses.replace(SPEC, hardlinks={})
    assert any(file_path in p and "content" in p for p in _differences(SPEC, other_content))
    assert any(file_path in p and "mode" in p for p in _differences(SPEC, other_mode))
    assert any(file_path in p and "owner" in p for p in _differences(SPEC, other_owner))
    assert any(link in p and "symlink" in p for p in _differences(SPEC, other_target))
    assert any(xattr_path in p and "xattrs" in p for p in _differences(SPEC, other_xattr))
    assert any("/nowhere" in p for p in _differences(SPEC, missing_file))
    assert any(twin in p and "hard link" in p for p in _differences(no_twin, SPEC))


def test_a_hard_link_stored_before_its_twin_is_read_through_it() -> None:
    """tar_out stores whichever name of a hard-linked file it meets first as the file (directory order)."""
    [(twin, existing)] = SPEC.hardlinks.items()
    swapped = dataclasses.replace(SPEC, files={twin if path == existing else path: content
                                               for path, content in SPEC.files.items()},
                                  hardlinks={existing: twin})
    assert _differences(swapped, SPEC) == []
    assert _differences(swapped, dataclasses.replace(SPEC, hardlinks={})) != []  # a link where a file was promised
