"""The pyfuse3 adapter's answers that do not depend on the guest (the virtual tree is read-only)."""

from __future__ import annotations

import errno
import os
from typing import cast

import libvirt
import pyfuse3
import pytest

from virtmount.fs.tree import ConnectionTree
from virtmount.fs.operations import Operations
from virtmount.lifecycle import SourceAppliance
from virtmount.sources import SourceRef


async def test_flush_is_enosys_so_the_kernel_stops_sending_it() -> None:
    operations = Operations(cast(ConnectionTree, object()))
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await operations.flush(1)
    assert caught.value.errno == errno.ENOSYS


def _unused_appliance(_source: SourceRef) -> SourceAppliance:
    raise AssertionError("no source is looked up here")


async def test_the_virtual_tree_is_never_written() -> None:
    tree = ConnectionTree(cast(libvirt.virConnect, None), _unused_appliance)
    operations = Operations(tree)
    ctx = pyfuse3.RequestContext()
    attempts = [
        lambda: operations.mkdir(tree.root.inode, b"x", 0o755, ctx),
        lambda: operations.create(tree.root.inode, b"x", 0o644, os.O_WRONLY, ctx),
        lambda: operations.unlink(tree.root.inode, b"domains", ctx),
        lambda: operations.rename(tree.root.inode, b"domains", tree.root.inode, b"d", 0, ctx),
        lambda: operations.setxattr(tree.root.inode, b"user.x", b"1", ctx),
    ]
    for attempt in attempts:
        with pytest.raises(pyfuse3.FUSEError) as caught:
            await attempt()
        assert caught.value.errno == errno.EROFS
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await operations.write(7, 0, b"x")  # no such handle
    assert caught.value.errno == errno.EBADF
