"""The local appliance is prepared from one version even while supermin replaces it."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from virtmount.virt import provision


def make_appliance(directory: Path, content: bytes) -> None:
    directory.mkdir(parents=True)
    for name in provision.APPLIANCE_FILES:
        (directory / name).write_bytes(content + name.encode())


def test_an_appliance_rebuilt_during_compression_is_prepared_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    appliance = tmp_path / "appliance.d"
    make_appliance(appliance, b"old")
    monkeypatch.setattr(provision, "find_appliance_dir", lambda: appliance)
    monkeypatch.setattr(provision, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(provision, "ext2_uuid", lambda root: root.read_bytes().decode())
    compressions: list[bytes] = []

    def compress(command: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        source, target = Path(command[-2]), Path(command[-1])
        compressions.append(source.read_bytes())
        target.write_bytes(source.read_bytes())
        if len(compressions) == 1:  # supermin puts a new version in place meanwhile
            (tmp_path / "old").mkdir()
            appliance.rename(tmp_path / "old" / "appliance.d")
            make_appliance(appliance, b"new")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(provision.subprocess, "run", compress)
    local = provision.prepare_local_appliance()
    assert compressions == [b"oldroot", b"newroot"]
    assert local.root_uuid == "newroot" and local.root_qcow2.read_bytes() == b"newroot"
    assert [path.name for path in (tmp_path / "cache" / "appliances").glob("*/*")] == ["root.qcow2"]
