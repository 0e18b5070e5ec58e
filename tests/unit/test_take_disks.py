"""The one shell command a restored appliance runs once its guest disks are plugged in
(virtmount.faststart.take_disks_command) and how its report is read (parse_taken_disks)."""

from __future__ import annotations

import subprocess

from virtmount.faststart import parse_taken_disks, take_disks_command


def test_the_command_is_valid_shell_with_the_clock_and_the_count_in_it() -> None:
    command = take_disks_command(3, 1796308295.25, 60)
    assert subprocess.run(["sh", "-n", "-c", command.decode()]).returncode == 0
    assert b"date -u -s @1796308295.250000" in command
    assert b"want=4;" in command  # three guest disks behind the appliance's root
    assert b"+ 60))" in command


def test_a_full_report_is_all_done() -> None:
    taken = parse_taken_disks(b"virtmount-clock-set\nvirtmount-disks-seen 2\nvirtmount-lvm-ok\n")
    assert (taken.clock_set, taken.disks_seen, taken.lvm_error) == (True, 2, None)


def test_a_failed_activation_carries_lvms_words() -> None:
    taken = parse_taken_disks(b"virtmount-clock-set\nvirtmount-disks-seen 1\nvirtmount-lvm-failed\n"
                              b"  Volume group \"vg1\" has insufficient free space\n")
    assert taken.lvm_error == 'Volume group "vg1" has insufficient free space'


def test_disks_not_seen_in_time_mean_no_activation_was_tried() -> None:
    taken = parse_taken_disks(b"virtmount-disks-seen 0\n")
    assert (taken.clock_set, taken.disks_seen, taken.lvm_error) == (False, 0, "not tried")


def test_a_report_cut_short_sees_no_disk() -> None:
    assert parse_taken_disks(b"").disks_seen == -1
