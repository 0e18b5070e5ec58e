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


def test_concurrent_preparations_compress_once_and_never_mix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two virtmounts starting at once: the second waits for the first's compressed root."""
    import threading
    import time

    appliance = tmp_path / "appliance.d"
    make_appliance(appliance, b"one version")
    monkeypatch.setattr(provision, "find_appliance_dir", lambda: appliance)
    monkeypatch.setattr(provision, "cache_dir", lambda: tmp_path / "cache")
    monkeypatch.setattr(provision, "ext2_uuid", lambda root: "uuid")
    running = []

    def compress(command: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        running.append(command[-1])
        assert len(running) == 1, "two compressions at once"
        source, target = Path(command[-2]), Path(command[-1])
        with open(target, "wb") as out:  # slowly, as qemu-img does, so that a second one would overlap
            for byte in source.read_bytes():
                out.write(bytes([byte]))
                time.sleep(0.001)
        running.remove(command[-1])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(provision.subprocess, "run", compress)
    results: list[provision.LocalAppliance] = []
    threads = [threading.Thread(target=lambda: results.append(provision.prepare_local_appliance())) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(results) == 2 and results[0].root_qcow2 == results[1].root_qcow2
    assert results[0].root_qcow2.read_bytes() == (appliance / "root").read_bytes()
    assert [p.name for p in results[0].root_qcow2.parent.iterdir()] == ["root.qcow2"]  # no partial left
