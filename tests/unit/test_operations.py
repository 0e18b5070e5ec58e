"""The pyfuse3 adapter's answers that do not depend on the guest."""

from __future__ import annotations

import errno
from typing import cast

import pyfuse3
import pytest

from virtmount.fs.tree import ConnectionTree
from virtmount.fs.operations import Operations


async def test_flush_is_enosys_so_the_kernel_stops_sending_it() -> None:
    operations = Operations(cast(ConnectionTree, object()))
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await operations.flush(1)
    assert caught.value.errno == errno.ENOSYS


async def test_writes_are_erofs() -> None:
    operations = Operations(cast(ConnectionTree, object()))
    with pytest.raises(pyfuse3.FUSEError) as caught:
        await operations.write(1, 0, b"x")
    assert caught.value.errno == errno.EROFS
