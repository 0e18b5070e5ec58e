"""The status report (virtmount.status): its JSON form round-trips and its table says what matters."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtmount.errors import VirtmountError
from virtmount.status import DiskStatus, MountStatus, SourceStatus, format_table, read_status

STATUS = MountStatus(
    uri="qemu+ssh://host/system", host="host", mountpoint="/mnt/virt", options=["ro", "idle=60"], pid=42,
    started_at=1_700_000_000.0, uptime_seconds=3725.0, cached_entries=120,
    sources=[
        SourceStatus("domains/web1", "idle", "shut down in 48 s", appliance="virtmount-appliance-web1-42-abc",
                     accelerator="TCG", boot_seconds=12.3, restored=True,
                     disks=[DiskStatus("/var/lib/libvirt/images/web1.qcow2", "qcow2", "read-only overlay")],
                     calls_done=1500, bytes_read=3 * 1024 * 1024, cached_entries=120),
        SourceStatus("domains/db", "booting", "for 7 s"),
        SourceStatus("volumes/default/broken.img", "failed", "at 12:00:00, retried in 20 s: disk missing"),
        SourceStatus("domains/old", "off", last_shutdown="released at 11:59:00"),
    ],
)


def test_json_round_trips() -> None:
    assert MountStatus.from_json(STATUS.to_json()) == STATUS


def test_the_table_shows_each_source_state_and_detail() -> None:
    table = format_table(STATUS)
    assert table.splitlines()[0].startswith("qemu+ssh://host/system on /mnt/virt (host host, pid 42, up 1 h 2 min")
    assert "options: ro,idle=60" in table
    rows = {line.split()[0]: line for line in table.splitlines() if line.startswith(("domains/", "volumes/"))}
    assert "idle, shut down in 48 s" in rows["domains/web1"] and "12.3 s (restored)" in rows["domains/web1"]
    assert "0/1500" in rows["domains/web1"] and "3.0 MiB" in rows["domains/web1"]
    assert "booting, for 7 s" in rows["domains/db"]
    assert "failed, at 12:00:00, retried in 20 s: disk missing" in rows["volumes/default/broken.img"]
    assert "/var/lib/libvirt/images/web1.qcow2 (qcow2, read-only overlay)" in table
    assert "last shut down released at 11:59:00" in table


def test_reading_the_status_of_a_plain_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(VirtmountError, match="is not a virtmount mount point"):
        read_status(str(tmp_path))
    (tmp_path / ".virtmount").write_text("{not json")
    with pytest.raises(VirtmountError, match="unreadable status"):
        read_status(str(tmp_path))
