"""The command line (virtmount.cli.run): usage errors are one line on stderr and exit code 2.

Nothing here connects to libvirt or mounts: the entry points that would are
replaced by stand-ins that fail the test if reached (or record their call).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import pytest

from virtmount import __version__, cli
from virtmount.config import Config
from virtmount.virt import connection


def _unexpected(what: str) -> Callable[..., Any]:
    def fail(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError(f"{what} must not be reached")
    return fail


@pytest.fixture(autouse=True)
def no_side_effects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "serve", _unexpected("serve"))
    monkeypatch.setattr(cli, "run_in_background", _unexpected("run_in_background"))
    monkeypatch.setattr(cli, "inspect_domain", _unexpected("inspect_domain"))
    monkeypatch.setattr(cli, "_configure_logging", lambda *args, **kwargs: None)
    monkeypatch.setattr(connection, "_open", _unexpected("libvirt open"))
    monkeypatch.setattr(os, "setxattr", _unexpected("setxattr"))


def usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run ``argv``, check it is a usage error reported on one line; return the message."""
    assert cli.run(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.endswith("\n")
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("virtmount: ")
    return captured.err.removeprefix("virtmount: ").rstrip("\n")


def test_unknown_command_line_option(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    message = usage_error(capsys, ["--bogus", "qemu:///system", str(tmp_path)])
    assert message == "unrecognized arguments: --bogus"


def test_unknown_mount_option(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    message = usage_error(capsys, ["-o", "memory=512,bogus", "qemu:///system", str(tmp_path)])
    assert message == "unknown option 'bogus' (see virtmount --help)"


def test_bad_mount_option_value(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    message = usage_error(capsys, ["-o", "cpus=0", "qemu:///system", str(tmp_path)])
    assert message == "option cpus must be greater than 0"


@pytest.mark.parametrize("uri", ["not a uri", "/mnt/point", "qemu:/system", "QEMU:///system", "qemu:///sys tem", ""])
def test_bad_uri(capsys: pytest.CaptureFixture[str], tmp_path: Path, uri: str) -> None:
    message = usage_error(capsys, [uri, str(tmp_path)])
    assert message.startswith(f"{uri!r} is not a libvirt URI")


def test_arguments_swapped_is_a_bad_uri(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    message = usage_error(capsys, [str(tmp_path), "qemu:///system"])
    assert message.startswith(f"{str(tmp_path)!r} is not a libvirt URI")


def test_missing_mount_point(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    message = usage_error(capsys, ["qemu:///system", str(missing)])
    assert message == f"mount point {missing} does not exist"


def test_mount_point_is_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    regular = tmp_path / "file"
    regular.write_text("x")
    message = usage_error(capsys, ["-f", "qemu+ssh://host/system", str(regular)])
    assert message == f"mount point {regular} is not a directory"


def test_mount_point_already_mounted(capsys: pytest.CaptureFixture[str]) -> None:
    message = usage_error(capsys, ["qemu:///system", "/proc"])
    assert message == "mount point /proc is busy: something is already mounted there"


@pytest.mark.parametrize(("argv", "message"), [
    ([], "the following arguments are required: uri, mountpoint"),
    (["qemu:///system"], "the following arguments are required: mountpoint"),
    (["-o"], "argument -o: expected one argument"),
])
def test_missing_arguments(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert usage_error(capsys, argv) == message


def test_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.run(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: virtmount ")
    assert "virtmount inspect [-o OPTS] URI DOMAIN" in out
    for option in ("accel=VALUE", "memory=VALUE", "idle=VALUE", "allow_other", "debug"):
        assert f"  {option}: " in out


@pytest.mark.parametrize("command", ["inspect", "release"])
def test_subcommand_help_exits_zero(capsys: pytest.CaptureFixture[str], command: str) -> None:
    with pytest.raises(SystemExit) as info:
        cli.run([command, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: virtmount {command} ")


def test_version_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.run(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"virtmount {__version__}\n"


@pytest.mark.parametrize(("argv", "message"), [
    (["inspect"], "the following arguments are required: uri, domain"),
    (["inspect", "qemu:///system"], "the following arguments are required: domain"),
    (["inspect", "-x", "qemu:///system", "guest"], "unrecognized arguments: -x"),
    (["inspect", "-o", "nope", "qemu:///system", "guest"], "unknown option 'nope' (see virtmount --help)"),
    (["release"], "the following arguments are required: mountpoint, domain"),
    (["release", "/mnt"], "the following arguments are required: domain"),
])
def test_subcommand_usage_errors(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert usage_error(capsys, argv) == message


def test_inspect_bad_uri_fails_before_connecting(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from virtmount.inspection import inspect_domain
    monkeypatch.setattr(cli, "inspect_domain", inspect_domain)  # the real one: it checks the URI first
    message = usage_error(capsys, ["inspect", "not a uri", "guest"])
    assert message.startswith("'not a uri' is not a libvirt URI")


def test_valid_foreground_mount_reaches_serve_with_the_parsed_config(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[tuple[str, str, Config]] = []

    async def fake_serve(uri: str, mountpoint: str, config: Config, on_ready: Callable[[], None]) -> None:
        calls.append((uri, mountpoint, config))

    monkeypatch.setattr(cli, "serve", fake_serve)
    monkeypatch.chdir(tmp_path.parent)
    assert cli.run(["-f", "-o", "memory=512", "-o", "idle=5,allow_other", "qemu+tcp://127.0.0.1/system",
                    tmp_path.name]) == 0
    assert capsys.readouterr().err == ""
    [(uri, mountpoint, config)] = calls
    assert uri == "qemu+tcp://127.0.0.1/system"
    assert mountpoint == str(tmp_path)  # made absolute before the fork
    assert (config.appliance.memory_mib, config.idle_seconds, config.allow_other) == (512, 5.0, True)


def test_valid_background_mount_returns_the_background_status(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    started: list[Callable[[Callable[[], None]], None]] = []

    def fake_background(serve: Callable[[Callable[[], None]], None]) -> int:
        started.append(serve)
        return 1

    monkeypatch.setattr(cli, "run_in_background", fake_background)
    assert cli.run(["qemu:///system", str(tmp_path)]) == 1
    assert len(started) == 1


def test_release_failure_is_one_line_exit_1(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    def refuse(path: str, name: bytes, value: bytes, follow_symlinks: bool = True) -> None:
        assert (name, value, follow_symlinks) == (b"user.virtmount.release", b"1", False)
        raise FileNotFoundError(2, "No such file or directory")

    monkeypatch.setattr(os, "setxattr", refuse)
    assert cli.run(["release", str(tmp_path), "guest"]) == 1
    err = capsys.readouterr().err
    assert err == f"virtmount: cannot release guest: {tmp_path}/domains/guest: No such file or directory\n"


def test_release_reads_the_control_xattr(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read, not a write: a read-only (ro) mount refuses setxattr in the kernel."""
    calls: list[tuple[str, bytes]] = []

    def record(path: str, name: bytes, follow_symlinks: bool = True) -> bytes:
        calls.append((path, name))
        return b"released"

    monkeypatch.setattr(os, "getxattr", record)
    assert cli.run(["release", "/mnt/vm", "web 1"]) == 0
    assert cli.run(["release", "/mnt/vm", "volumes/default/disk.qcow2"]) == 0
    assert calls == [("/mnt/vm/domains/web 1", b"user.virtmount.release"),
                     ("/mnt/vm/volumes/default/disk.qcow2", b"user.virtmount.release")]
