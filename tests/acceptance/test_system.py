"""Issue 11: virtmount fits the system: mount(8) and fstab through mount.fuse3, the standard mount
options, umount, systemd's readiness protocol, the command on PATH and its man page.

Real mount(8), mount.fuse3, libvirtd and FUSE; none of these tests needs an appliance.
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import signal
import socket
import subprocess
import tempfile
import termios
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests import images, silent_kvm
from tests.acceptance.helpers import VIRTMOUNT, appliances_of, assert_one_line_error, run_virtmount, wait_until
from virtmount.config import option_names
from virtmount.status import CONTROL_NAME, MountStatus

pytestmark = pytest.mark.acceptance

INSTALLED = Path("/usr/local/bin/virtmount")


def mount_info(mountpoint: Path) -> tuple[str, str, set[str]] | None:
    """(source, type, options) of the mount at ``mountpoint`` in this namespace, or None."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        separator = fields.index("-")
        if fields[4] == str(mountpoint):
            unescape = lambda s: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)  # noqa: E731
            options = set(fields[5].split(",")) | set(fields[separator + 3].split(","))
            return unescape(fields[separator + 2]), fields[separator + 1], options
    return None


def virtmount_processes(mountpoint: Path) -> list[str]:
    found = subprocess.run(["pgrep", "-f", f"virtmount .*{mountpoint}"], capture_output=True, text=True)
    return found.stdout.split()


def wait_until_gone(mountpoint: Path, timeout: float = 60) -> bool:
    """Whether the virtmount serving ``mountpoint`` exited within ``timeout``."""
    return wait_until(lambda: not virtmount_processes(mountpoint), timeout, interval=0.2) is not None


@pytest.fixture
def mountpoint(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "mnt"
    path.mkdir()
    yield path
    if mount_info(path) is not None:
        subprocess.run(["umount", str(path)], check=False)
        wait_until_gone(path)


def test_make_setup_put_virtmount_on_path_for_mount_fuse3() -> None:
    assert INSTALLED.resolve() == Path(VIRTMOUNT).resolve(), "run make setup"


def run_mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_mount_t_fuse_virtmount_with_fstab_options_then_umount(libvirtd: str, mountpoint: Path) -> None:
    result = run_mount("-t", "fuse.virtmount", "-o",
                       "ro,noatime,_netdev,nofail,x-systemd.automount,x-gvfs-hide,comment=backup,idle=30",
                       libvirtd, str(mountpoint))
    assert result.returncode == 0, result.stderr
    info = mount_info(mountpoint)  # there as soon as mount(8) returned: systemd checks exactly that
    assert info is not None
    source, fstype, options = info
    assert (source, fstype) == (libvirtd, "fuse.virtmount")
    # ro and noatime reached the kernel; mount.fuse3 added dev,suid, which virtmount never honours
    assert {"ro", "noatime", "nodev", "nosuid"} <= options, options
    assert "domains" in os.listdir(mountpoint)
    [pid] = virtmount_processes(mountpoint)
    assert subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode == 0
    assert wait_until_gone(mountpoint), f"virtmount {pid} still running after umount"
    assert mount_info(mountpoint) is None


def test_an_fstab_line_whose_uri_holds_separators(tcp_uri: str, mountpoint: Path, tmp_path: Path) -> None:
    uri = f"{tcp_uri}?no_tty=1&keyfile=/nonexistent,key"
    fstab = tmp_path / "fstab"
    fstab.write_text(f"{uri}  {mountpoint}  fuse.virtmount  ro,_netdev,nofail,noauto,x-systemd.automount,idle=30  0 0\n")
    result = run_mount("-T", str(fstab), str(mountpoint))
    assert result.returncode == 0, result.stderr
    info = mount_info(mountpoint)
    assert info is not None and info[0] == uri, info
    assert "domains" in os.listdir(mountpoint)
    subprocess.run(["umount", str(mountpoint)], check=True)
    assert wait_until_gone(mountpoint)


@pytest.mark.parametrize(("options", "fragment"), [
    ("ro,idle=30,bogus", "unknown option 'bogus'"),
    ("ro,idle=soon", "option idle needs a number"),
])
def test_mount_errors_are_one_line_and_leave_nothing(
    libvirtd: str, mountpoint: Path, options: str | None, fragment: str
) -> None:
    result = run_mount("-t", "fuse.virtmount", *(["-o", options] if options else []), libvirtd, str(mountpoint))
    assert_one_line_error(result, fragment)
    assert mount_info(mountpoint) is None
    assert virtmount_processes(mountpoint) == []


def test_mount_by_a_user_who_may_not_is_a_one_line_error(libvirtd: str) -> None:
    """mount(8) lets the user try (mount.fuse3 runs virtmount as that user); libvirt refuses them."""
    mountpoint = Path(tempfile.mkdtemp(prefix="virtmount-user-"))  # /tmp/pytest-of-root is root's only
    try:
        os.chmod(mountpoint, 0o777)
        result = subprocess.run(["runuser", "-u", "nobody", "--", "mount", "-t", "fuse.virtmount", "-o", "ro",
                                 libvirtd, str(mountpoint)], capture_output=True, text=True, timeout=120,
                                stdin=subprocess.DEVNULL)
        assert_one_line_error(result, f"cannot connect to {libvirtd}")
        assert mount_info(mountpoint) is None
        assert virtmount_processes(mountpoint) == []
    finally:
        mountpoint.rmdir()


def test_a_foreground_service_tells_systemd_when_it_is_mounted(
    libvirtd: str, mountpoint: Path, tmp_path: Path
) -> None:
    notify_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_socket:
        notify_socket.bind(str(notify_path))
        notify_socket.settimeout(60)
        process = subprocess.Popen([VIRTMOUNT, "-f", "-o", "ro", libvirtd, str(mountpoint)],
                                   env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
                                   stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            message = notify_socket.recv(4096).decode()
            assert mount_info(mountpoint) is not None, "READY=1 came before the mount was up"
            assert message.splitlines()[0] == "READY=1"
            assert f"mounted {libvirtd} on {mountpoint}" in message
        finally:
            process.send_signal(signal.SIGTERM)  # how systemd stops a service
            _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert mount_info(mountpoint) is None
    assert "Traceback" not in stderr


@pytest.mark.parametrize("stop", ["SIGTERM", "lazy unmount"])
def test_virtmount_stops_while_a_boot_never_ends(nos_guest: images.Guest, mountpoint: Path, stop: str) -> None:
    """A request waiting for a boot that never ends keeps neither a signalled nor an unmounted virtmount alive."""
    spinning = silent_kvm.install(images.IMAGE_DIR / "spinning-qemu", spin_under=("kvm", "tcg"))
    process = subprocess.Popen(
        [VIRTMOUNT, "-f", "-o", f"accel=tcg,fast_start=off,emulator={spinning.emulator}", nos_guest.uri,
         str(mountpoint)], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    reader = None
    try:
        deadline = time.monotonic() + 60
        while mount_info(mountpoint) is None:
            assert time.monotonic() < deadline and process.poll() is None, "not mounted"
            time.sleep(0.2)
        reader = subprocess.Popen(["ls", str(mountpoint / "domains" / nos_guest.name / "devices")],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not spinning.kvm_boots():  # the appliance runs, and will never answer
            assert time.monotonic() < deadline, "no appliance was started"
            time.sleep(0.2)
        if stop == "SIGTERM":
            process.send_signal(signal.SIGTERM)
        else:
            subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], check=True)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
        assert mount_info(mountpoint) is None
        assert "Traceback" not in stderr
        assert reader.wait(timeout=30) != 0
        assert appliances_of(process.pid, nos_guest.uri) == []
    finally:
        if process.poll() is None:
            process.kill()
        if reader is not None and reader.poll() is None:
            reader.kill()
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)


def test_the_man_page_is_installed_and_agrees_with_help() -> None:
    assert subprocess.run(["man", "-w", "virtmount"], capture_output=True).returncode == 0, "run make setup"
    page = subprocess.run(["man", "virtmount"], capture_output=True, text=True, env={**os.environ, "MANWIDTH": "200"})
    assert page.returncode == 0, page.stderr
    text = page.stdout
    help_text = subprocess.run([VIRTMOUNT, "--help"], capture_output=True, text=True).stdout
    for name in option_names():
        assert f"{name}" in help_text
        assert re.search(rf"^\s+{re.escape(name)}\b", text, re.M), f"-o {name} is not described in virtmount(1)"
    for subcommand in ("virtmount inspect", "virtmount release", "virtmount status", "virtmount gc",
                       "mount -t fuse.virtmount", "umount"):
        assert subcommand in text and subcommand.split()[-1] in help_text, subcommand
    for standard in ("ro", "rw", "_netdev", "nofail", "x-gvfs-hide", "x-gvfs-notrash", "nodev,nosuid"):
        assert standard in text, standard


# --- credentials: ssh never prompts, and a refusal says what to configure ------------------------

@dataclass(frozen=True)
class SshHost:
    port: int
    key: Path  # a client key that the sshd accepts for root

    def uri(self, **params: str) -> str:
        query = "&".join(f"{name}={value}" for name, value in params.items())
        return f"qemu+ssh://root@127.0.0.1:{self.port}/system" + (f"?{query}" if query else "")


@pytest.fixture(scope="module")
def ssh_host(libvirtd: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshHost]:
    """An sshd of the test's own on loopback, key login for root only; its host key is in root's
    known_hosts while the tests run."""
    directory = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(directory / key)], check=True)
    (directory / "authorized_keys").write_text((directory / "client_key.pub").read_text())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (directory / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {directory / 'host_key'}\n"
        f"AuthorizedKeysFile {directory / 'authorized_keys'}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\n")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-f", str(directory / "sshd_config"),
                             "-E", str(directory / "sshd.log")])
    known_hosts = Path.home() / ".ssh" / "known_hosts"
    known_hosts.parent.mkdir(mode=0o700, exist_ok=True)
    host_key = (directory / "host_key.pub").read_text().split()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        with known_hosts.open("a") as hosts:
            hosts.write(f"[127.0.0.1]:{port} {host_key[0]} {host_key[1]}\n")
        yield SshHost(port=port, key=directory / "client_key")
    finally:
        sshd.terminate()
        sshd.wait(timeout=30)
        subprocess.run(["ssh-keygen", "-R", f"[127.0.0.1]:{port}"], capture_output=True)


def test_a_mount_over_ssh_with_a_key_file(ssh_host: SshHost, mountpoint: Path) -> None:
    result = run_virtmount("-o", "ro", ssh_host.uri(keyfile=str(ssh_host.key)), str(mountpoint))
    assert result.returncode == 0, result.stderr
    assert "domains" in os.listdir(mountpoint)
    subprocess.run(["umount", str(mountpoint)], check=True)
    assert wait_until_gone(mountpoint)


def run_on_a_terminal(args: list[str], timeout: float) -> tuple[int | None, str]:
    """Run ``args`` with a terminal of its own as its controlling terminal and standard streams, as
    from an interactive shell: ssh would prompt there. (exit status or None if still running at
    ``timeout``, everything it printed)."""
    controller, terminal = os.openpty()

    def take_the_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    process = subprocess.Popen(args, stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True,
                               preexec_fn=take_the_terminal)
    os.close(terminal)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([controller], [], [], 0.2)[0]:
                try:
                    output += os.read(controller, 4096)
                except OSError:  # the terminal closed: the process is exiting
                    break
            elif process.poll() is not None:
                break
        try:
            return process.wait(timeout=max(0.0, deadline - time.monotonic())), output.decode(errors="replace")
        except subprocess.TimeoutExpired:
            return None, output.decode(errors="replace")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(controller)


@pytest.mark.parametrize(("with_key", "host", "fragments"), [
    (False, "127.0.0.1", ("Permission denied", "keyfile=PATH")),  # no key: ssh would ask for a password
    (True, "localhost", ("Host key verification failed", "known_hosts")),  # ssh would ask to accept the key
])
def test_ssh_refusals_never_prompt_and_say_what_to_configure(
    ssh_host: SshHost, mountpoint: Path, with_key: bool, host: str, fragments: tuple[str, ...]
) -> None:
    uri = ssh_host.uri(**({"keyfile": str(ssh_host.key)} if with_key else {})).replace("127.0.0.1", host)
    status, output = run_on_a_terminal([VIRTMOUNT, "-f", uri, str(mountpoint)], timeout=60)
    assert status == 1, f"virtmount did not fail by itself (a prompt?): {output!r}"
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"virtmount: cannot connect to {uri}: "), output
    for fragment in fragments:
        assert fragment in lines[0]
    assert mount_info(mountpoint) is None


# --- a status you can read ---------------------------------------------------------------------

def status_of(mountpoint: Path) -> MountStatus:
    result = run_virtmount("status", "--json", str(mountpoint))
    assert result.returncode == 0, result.stderr
    return MountStatus.from_json(result.stdout)


def test_status_during_and_after_a_boot_and_after_a_release(
    nos_guest: images.Guest, test_guest: images.Guest, mountpoint: Path
) -> None:
    result = run_virtmount("-o", "ro,idle=600", nos_guest.uri, str(mountpoint))
    assert result.returncode == 0, result.stderr
    path = f"domains/{nos_guest.name}"
    status = status_of(mountpoint)
    assert (status.uri, status.mountpoint, status.options) == (nos_guest.uri, str(mountpoint), ["ro", "idle=600"])
    assert status.pid == int(virtmount_processes(mountpoint)[0]) and status.uptime_seconds >= 0
    assert CONTROL_NAME not in os.listdir(mountpoint)  # looked up, never listed
    untouched = [s for s in status.sources if s.path == f"domains/{test_guest.name}"]
    assert [(s.state, s.appliance) for s in untouched] == [("off", "")]  # every domain, looked up or not

    hello = mountpoint / "domains" / nos_guest.name / "devices" / "sda" / "hello.txt"
    reader = subprocess.Popen(["cat", str(hello)], stdout=subprocess.PIPE)
    states = set()
    deadline = time.monotonic() + 300
    while reader.poll() is None and time.monotonic() < deadline:
        for source in status_of(mountpoint).sources:
            if source.path == path:
                states.add(source.state)
                if source.state == "booting":
                    assert source.detail.startswith("for ")
        time.sleep(0.2)
    assert reader.communicate()[0] == nos_guest.files["/hello.txt"]
    assert "booting" in states, states

    [source] = [s for s in status_of(mountpoint).sources if s.path == path]
    assert source.state in ("ready", "idle"), source
    assert source.accelerator in ("KVM", "TCG") and source.boot_seconds and source.boot_seconds > 0
    assert source.appliance in appliances_of(status.pid)
    assert source.calls_done > 0 and source.bytes_read >= len(nos_guest.files["/hello.txt"])
    assert source.calls_in_flight == 0 and source.open_files == 0
    assert [(d.source, d.attach) for d in source.disks] == [(str(nos_guest.image), "read-only overlay")]
    table = run_virtmount("status", str(mountpoint))
    assert table.returncode == 0, table.stderr
    assert path in table.stdout and "shut down in" in table.stdout and str(nos_guest.image) in table.stdout

    assert run_virtmount("release", str(mountpoint), nos_guest.name).returncode == 0
    [source] = [s for s in status_of(mountpoint).sources if s.path == path]
    assert source.state == "off" and source.last_shutdown.startswith("released at"), source
    assert appliances_of(status.pid) == []


def test_status_of_something_else_is_a_one_line_error(tmp_path: Path) -> None:
    assert_one_line_error(run_virtmount("status", str(tmp_path)), "is not a virtmount mount point")


# --- file browsers ---------------------------------------------------------------------------

def test_file_browser_probes_boot_no_appliance(nos_guest: images.Guest, test_guest: images.Guest,
                                               mountpoint: Path) -> None:
    """gio (GNOME's file access) on domains/ and on a domain's directory: the listing with every
    attribute (stat of fs/ and devices/ included), .hidden, trash and autorun probes."""
    result = run_virtmount("-o", "ro,idle=600", nos_guest.uri, str(mountpoint))
    assert result.returncode == 0, result.stderr
    [pid] = virtmount_processes(mountpoint)
    domains = mountpoint / "domains"
    for args in (["list", "-a", "*", str(mountpoint)], ["list", "-a", "*", str(domains)],
                 ["info", str(domains / test_guest.name)],
                 ["list", "-h", "-a", "*", str(domains / test_guest.name)],
                 ["list", "-a", "*", str(domains / nos_guest.name)],
                 ["info", str(domains / test_guest.name / "fs")],
                 ["info", "-f", str(mountpoint)]):
        probe = subprocess.run(["gio", *args], capture_output=True, text=True, timeout=60)
        assert probe.returncode == 0, (args, probe.stderr)
    listing = subprocess.run(["gio", "list", str(domains / test_guest.name)], capture_output=True, text=True)
    assert sorted(listing.stdout.split()) == ["devices", "domain.xml", "fs"]
    for probe_name in (".hidden", ".Trash", ".Trash-0", "autorun.inf", ".xdg-volume-info", ".directory"):
        for directory in (mountpoint, domains, domains / test_guest.name):
            assert not (directory / probe_name).exists(), directory / probe_name
    assert appliances_of(int(pid)) == [], "a file browser's look booted an appliance"
