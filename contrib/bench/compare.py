#!/usr/bin/env python3
"""Compare virtmount with guestmount on the same guest, in the same run.

Usage (as root, from the repository):

    .venv/bin/python contrib/bench/compare.py [--quick] [--skip-tcp] [--tcp-delay-ms 5]

Builds (or reuses) the benchmark guest image (contrib/bench/benchimage.py:
Debian look-alike, ~24,000 entries, a 64 MiB file), defines it as the shut-off
domain ``virtmount-bench`` on qemu:///system, then, one tool after the other
(each mounted, measured, unmounted before the next):

1. guestmount  (LIBGUESTFS_BACKEND=direct, force_tcg, ``-a IMAGE -i --ro``)
2. virtmount   (qemu:///system, root MNT/domains/virtmount-bench/fs)
3. virtmount   over qemu+tcp://127.0.0.1:PORT/system through a loopback proxy
               adding --tcp-delay-ms in each direction (unless --skip-tcp/--quick)
4. a no-op pyfuse3 mirror of the tree virtmount showed (contrib/bench/noop_mirror.py),
   for find, ls -lR, the warm lstat and rsync onto virtmount's complete copy (a dry run: the
   mirror holds no contents and no xattrs) only: what pyfuse3 + trio alone cost for them
   (run inside virtmount's column, after its other phases, while virtmount is still mounted)

and for each runs the same phases in the same order:

  mount -> first listing of the guest root (includes the appliance boot)
  the same once more after the other phases (virtmount: with the guest layout its
                                          first mount remembered; it starts with an empty
                                          -o inspection_cache in each run)
  find ROOT | wc -l                       (kernel caches dropped first)
  ls -lR ROOT > /dev/null                 (kernel caches dropped first)
  os.lstat of every path find printed     (warm: nothing dropped)
  sequential read of the 64 MiB file      (dropped first; 1 MiB reads; hash checked)
  random 4 KiB preads in that file        (dropped first; POSIX_FADV_RANDOM, so no read-ahead)
  rsync -aHAXS ROOT/ DEST/ to local disk  (dropped first; fresh DEST; exit status and copy checked)
  peak RSS (VmHWM) and CPU time of the FUSE process and of the appliance's QEMU
  unmount until the FUSE process has exited
  rsync -aHAXS ROOT/ DEST/ once more, right after the second mount's first listing: a freshly
                                          mounted guest onto the complete copy (nothing to transfer)

then, for guestmount and virtmount on qemu:///system, writes, each tool on a qcow2 overlay of its
own over the bench image (virtmount: the shut-off domain ``virtmount-bench-rw`` on that overlay;
guestmount ``--rw``; virtmount ``-o rw``):

  mount -> first listing (not in the table)
  tar -x of 5,000 small files (50 directories)  (until tar exits; the files are counted afterwards)
  sequential write of a 64 MiB file in 1 MiB writes, then fsync (read back after a drop, hash checked)

For virtmount, the daemon calls of each phase are counted (``virtmount status --json``: the
appliance's calls_done before and after) and shown in a column of their own.

"Dropped" = ``sync; echo 3 > /proc/sys/vm/drop_caches`` (page cache, dentries,
inodes of the host kernel).  Caches inside the tools and inside the appliance
(its own page cache) stay warm from one phase to the next, for both tools.

Prints a table and writes it as Markdown to contrib/bench/results.md.
Everything it mounts or starts is unmounted/stopped on exit, errors included.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO / "contrib" / "bench"
sys.path.insert(0, str(BENCH_DIR))

import noop_mirror  # noqa: E402

VIRTMOUNT = REPO / ".venv" / "bin" / "virtmount"
START_LIBVIRTD = REPO / "contrib" / "start-libvirtd.sh"
TCP_CONF = REPO / "tests" / "libvirtd-tcp.conf"
RESULTS_MD = BENCH_DIR / "results.md"
SYSTEM_URI = "qemu:///system"
LIBVIRTD_TCP_PORT = 16509
GUESTFS_ENV = {"LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}
RW_DOMAIN_NAME = "virtmount-bench-rw"  # the bench guest on a writable overlay: the write phases
UNTAR_FILES = 5000
DEFAULT_VIRTMOUNT_OPTS = "idle=600,accel=tcg"  # guestmount is forced to TCG too; auto would probe KVM first (~2 s here)

PHASE_TIMEOUT_S = 1800
MOUNT_TIMEOUT_S = 600
UNMOUNT_WAIT_S = 180

MIRROR_TITLE = "no-op pyfuse3 mirror"
# the walks the mirror can answer (no contents, no appliance); its rsync onto the copy is a dry run (see run_mirror)
MIRROR_ROWS = ("find", "ls_lR", "lstat_warm", "rsync_again")

_start = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - _start:7.1f}s] {message}", file=sys.stderr, flush=True)


# ================================================================ processes, mounts, caches


def _mountpoints() -> set[str]:
    points = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            raw = line.split()[4]
            points.add(raw.encode().decode("unicode_escape") if "\\" in raw else raw)
    return points


def is_mounted(path: Path) -> bool:
    return str(path) in _mountpoints()


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    """True while pid exists and is not a zombie (our daemons are not our children)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def fuse_pid(mnt: Path) -> int | None:
    """The process serving mnt: the one whose command line has mnt as an argument."""
    found = []
    for pid in _pids():
        args = _cmdline(pid)
        if (pid != os.getpid() and str(mnt) in args and _alive(pid)
                and any(os.path.basename(a) in ("guestmount", "virtmount") for a in args[:2])):
            found.append(pid)
    return min(found) if found else None


_DRIVE_FILE = re.compile(r"(?:^|,)(?:file\.file\.filename|file)=([^,]+)")


def _uses_image(args: list[str], image: Path) -> bool:
    """Whether a QEMU command line opens image, directly or as the backing file of an overlay
    (libguestfs read-only drives are /tmp/libguestfsXXXXXX/overlayN.qcow2 over the image)."""
    if any(str(image) in a for a in args):
        return True
    for arg in args:
        for name in _DRIVE_FILE.findall(arg):
            if "/libguestfs" in name and name.endswith(".qcow2"):
                try:
                    with open(name, "rb") as f:
                        if os.fsencode(image) in f.read(65536):
                            return True
                except OSError:
                    pass
    return False


def qemu_pid(image: Path, name_part: str | None) -> int | None:
    """The QEMU process whose command line has name_part, or, if None, that opens image.

    (libvirt hot-plugs virtmount's transient disks after start: the image is
    not on the appliance's command line, its domain name is.)
    """
    for pid in _pids():
        args = _cmdline(pid)
        if not args or "qemu-system" not in os.path.basename(args[0]):
            continue
        if name_part is not None:
            found = any(name_part in a for a in args)
        else:
            found = _uses_image(args, image)
        if found and _alive(pid):
            return pid
    return None


def proc_status(pid: int | None) -> dict[str, float]:
    """VmHWM/VmRSS in MiB and CPU seconds (user+system, all threads) of pid."""
    if pid is None:
        return {}
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(value.split()[0]) / 1024
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        out["cpu"] = (int(fields[11]) + int(fields[12])) / ticks
    except (OSError, ValueError, IndexError):
        pass
    return out


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _describe(pid: int | None) -> str:
    """State and kernel wait channel of each thread of pid, for the log when it does not exit."""
    parts = []
    with _ignore_errors():
        for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                wchan = f.read().strip() or "-"
            parts.append(f"{tid}:{state}:{wchan}")
    return "threads " + " ".join(parts) if parts else "no /proc entry"


def _wait_gone(pid: int | None, timeout: float) -> bool:
    if pid is None:
        return True
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def unmount(mnt: Path, pid: int | None,
            also_gone: Callable[[], int | None] | None = None) -> tuple[float, list[str]]:
    """Unmount mnt and wait until its FUSE process (and what also_gone returns) has exited.

    Returns the seconds taken and what went wrong.  Escalates (lazy unmount,
    SIGTERM, SIGKILL of pid only) when the polite way does not work within
    UNMOUNT_WAIT_S.
    """
    problems: list[str] = []
    started = time.monotonic()
    deadline = started + UNMOUNT_WAIT_S
    while is_mounted(mnt):
        proc = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
        if proc.returncode == 0 or not is_mounted(mnt):
            break
        if time.monotonic() > deadline:
            say(f"unmount {mnt}: {proc.stderr.strip()}; lazy unmount")
            problems.append(f"fusermount3 -u kept failing ({proc.stderr.strip()}): lazy unmount")
            subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True, stdin=subprocess.DEVNULL)
            break
        time.sleep(0.5)
    if not _wait_gone(pid, max(5.0, deadline - time.monotonic())):
        problem = (f"FUSE process {pid} still running {time.monotonic() - started:.0f} s after "
                   f"fusermount3 -u ({_describe(pid)}): sent SIGTERM")
        say(problem)
        problems.append(problem)
        assert pid is not None
        with _ignore_errors():
            os.kill(pid, signal.SIGTERM)
        if not _wait_gone(pid, 60):
            say(f"process {pid}: SIGKILL")
            with _ignore_errors():
                os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 10)
    if also_gone is not None:
        end = time.monotonic() + 60
        while also_gone() is not None and time.monotonic() < end:
            time.sleep(0.1)
        if also_gone() is not None:
            problems.append(f"appliance QEMU {also_gone()} still running 60 s after its FUSE process exited")
    return time.monotonic() - started, problems


class _ignore_errors:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return isinstance(exc[1], Exception)


def tcp_listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def run_cmd(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    kwargs.setdefault("timeout", PHASE_TIMEOUT_S)
    return subprocess.run(argv, **kwargs)


# ================================================================ the delaying proxy


def _proxy_main(delay: float, upstream_port: int, max_connections: int = 64, queue_chunks: int = 256) -> None:
    """Serve on 127.0.0.1:<free port>, forward to 127.0.0.1:upstream_port, each chunk delayed.

    Every chunk read from one side is written to the other side `delay` seconds
    after it arrived (order kept, pipelined: delays do not add up).  One reader
    and one writer thread per direction: time.sleep is precise to ~0.1 ms,
    whereas asyncio's epoll timeouts (rounded up to whole milliseconds) added
    about 1 ms per hop.  At most max_connections at a time and queue_chunks *
    64 KiB queued per direction.  Exits when its standard input reaches EOF
    (the benchmark ended or died).
    """
    import queue
    import threading

    slots = threading.BoundedSemaphore(max_connections)

    def pump(src: socket.socket, dst: socket.socket) -> None:
        chunks: queue.Queue[tuple[float, bytes]] = queue.Queue(maxsize=queue_chunks)
        sender_gone = threading.Event()

        def put(item: tuple[float, bytes]) -> bool:
            while not sender_gone.is_set():
                try:
                    chunks.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    pass
            return False

        def receive() -> None:
            try:
                while True:
                    data = src.recv(65536)
                    if not put((time.monotonic() + delay, data)) or not data:
                        return
            except OSError:
                put((0.0, b""))

        def send() -> None:
            try:
                while True:
                    due, data = chunks.get()
                    wait = due - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    if not data:
                        dst.shutdown(socket.SHUT_WR)
                        return
                    dst.sendall(data)
            except OSError:
                sender_gone.set()
                with _ignore_errors():
                    src.shutdown(socket.SHUT_RDWR)

        receiver = threading.Thread(target=receive, daemon=True)
        receiver.start()
        send()
        receiver.join()

    def handle(client: socket.socket) -> None:
        try:
            with client, socket.create_connection(("127.0.0.1", upstream_port), timeout=10) as upstream:
                upstream.settimeout(None)
                for sock in (client, upstream):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
                back.start()
                pump(client, upstream)
                back.join()
        except OSError:
            pass
        finally:
            slots.release()

    server = socket.create_server(("127.0.0.1", 0))
    print(f"PORT {server.getsockname()[1]}", flush=True)

    def accept() -> None:
        while True:
            client, _ = server.accept()
            if not slots.acquire(blocking=False):
                client.close()
                continue
            threading.Thread(target=handle, args=(client,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    while os.read(sys.stdin.fileno(), 4096):
        pass
    os._exit(0)


class DelayProxy:
    """The proxy as a child process (so that the benchmark's own work does not delay it)."""

    def __init__(self, delay_ms: float, upstream_port: int = LIBVIRTD_TCP_PORT) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve-proxy", str(delay_ms), "--upstream-port", str(upstream_port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 30)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("PORT "):
            self.close()
            raise RuntimeError(f"delay proxy did not start (got {line!r})")
        self.port = int(line.split()[1])

    def close(self) -> None:
        if self.proc.poll() is None:
            with _ignore_errors():
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def saved_appliances(uri: str, pool: str = "virtmount") -> list[str]:
    """The saved appliances (virtmount's fast start) in the pool: made once per host and settings."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        found = conn.storagePoolLookupByName(pool)
        found.refresh(0)
        return sorted(name for name in found.listVolumes() if name.endswith(".state"))
    except libvirt.libvirtError:
        return []
    finally:
        conn.close()


def _undefine(uri: str, name: str) -> None:
    """Undefine the shut-off domain ``name`` (the rw overlay's), if it exists."""
    import libvirt
    conn = libvirt.open(uri)
    try:
        for domain in conn.listAllDomains():
            if domain.name() == name:
                domain.undefine()
    finally:
        conn.close()


def daemon_calls(mnt: Path) -> int | None:
    """The daemon calls virtmount's appliances on this mount have made so far (``virtmount status``)."""
    proc = run_cmd([str(VIRTMOUNT), "status", "--json", str(mnt)], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        return None
    return sum(int(source.get("calls_done", 0)) for source in json.loads(proc.stdout)["sources"])


def _record_calls(result: Result, row: str, before: int | None, after: int | None) -> None:
    if before is not None and after is not None:
        result.calls[row] = after - before


def make_untar_archive(path: Path, files: int = UNTAR_FILES, per_directory: int = 100) -> None:
    """A tar of ``files`` small files (200 B-8 KiB, fixed seed) in directories of ``per_directory``."""
    rng = random.Random("virtmount-bench/untar")
    with tarfile.open(path, "w") as archive:
        for n in range(files):
            data = rng.randbytes(rng.randrange(200, 8192))
            info = tarfile.TarInfo(f"untar/d{n // per_directory:03d}/f{n:05d}")
            info.size, info.mode, info.mtime = len(data), 0o644, 1_700_000_000 + n
            archive.addfile(info, io.BytesIO(data))


def libvirt_round_trip_ms(uri: str, calls: int = 20) -> float:
    """Mean time of a trivial libvirt RPC (getLibVersion) on uri."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        conn.getLibVersion()
        started = time.monotonic()
        for _ in range(calls):
            conn.getLibVersion()
        return (time.monotonic() - started) / calls * 1e3
    finally:
        conn.close()


# ================================================================ the tools


@dataclass
class Tool:
    key: str            # column key
    title: str          # column title
    image: Path
    uri: str | None = None          # virtmount only
    options: str = DEFAULT_VIRTMOUNT_OPTS
    layouts: Path | None = None     # virtmount only: its inspection_cache directory, empty at the start
    domain: str = ""                # virtmount only: the domain below domains/ (default: the bench domain)
    writable: bool = False          # virtmount -o rw, guestmount --rw

    @property
    def is_virtmount(self) -> bool:
        return self.uri is not None

    def mount_argv(self, mnt: Path) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        if self.is_virtmount:
            assert self.uri is not None
            options = (self.options + (f",inspection_cache={self.layouts}" if self.layouts else "")
                       + (",rw" if self.writable else ""))
            return [str(VIRTMOUNT), "-o", options, self.uri, str(mnt)], env
        env.update(GUESTFS_ENV)
        return ["guestmount", "--format=qcow2", "-a", str(self.image), "-i", "--rw" if self.writable else "--ro",
                str(mnt)], env

    @property
    def domain_name(self) -> str:
        from benchimage import DOMAIN_NAME
        return self.domain or DOMAIN_NAME

    def root(self, mnt: Path) -> Path:
        if self.is_virtmount:
            return mnt / "domains" / self.domain_name / "fs"
        return mnt

    def appliance_pid(self) -> int | None:
        # virtmount's appliance is named after the guest when booted cold, after its saved state
        # when restored (the bench runs one appliance at a time, so either name is ours)
        if not self.is_virtmount:
            return qemu_pid(self.image, None)
        return (qemu_pid(self.image, f"virtmount-appliance-{self.domain_name}-")
                or qemu_pid(self.image, "virtmount-appliance-saved-"))


@dataclass
class Result:
    values: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)  # virtmount: daemon calls made by each row's phase
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    count: int | None = None
    load: str = ""


# Rows of the table: key, label, unit, better ("low"/"high")
ROWS: list[tuple[str, str, str, str]] = [
    ("mount_return", "mount command returns", "s", "low"),
    ("first_listing", "mount → first listing of the guest root, guest never seen (boot included)", "s", "low"),
    ("first_listing_again", "same, mounted again (virtmount: guest layout remembered)", "s", "low"),
    ("find", "`find ROOT \\| wc -l`, cold", "s", "low"),
    ("ls_lR", "`ls -lR ROOT > /dev/null`, cold", "s", "low"),
    ("lstat_warm", "lstat of every path again, warm", "s", "low"),
    ("seq_read", "sequential read of the 64 MiB file, cold", "MB/s", "high"),
    ("rand_read", "random 4 KiB preads, cold, no read-ahead", "reads/s", "high"),
    ("rand_read_ms", "  same, mean latency", "ms/read", "low"),
    ("rsync", "`rsync -aHAXS ROOT/ DEST/`, cold", "s", "low"),
    ("rsync_again", "same onto the complete copy, freshly mounted (nothing to transfer)", "s", "low"),
    ("untar", f"untar {UNTAR_FILES:,} small files (rw mount, until tar exits)", "s", "low"),
    ("seq_write", "sequential write of 64 MiB + fsync (rw mount)", "MB/s", "high"),
    ("unmount", "unmount until the FUSE process exited", "s", "low"),
    ("fuse_hwm", "FUSE process peak RSS (VmHWM)", "MiB", "low"),
    ("fuse_cpu", "FUSE process CPU time (guestmount: after its fork, launch excluded)", "s", "low"),
    ("qemu_hwm", "appliance QEMU peak RSS (VmHWM)", "MiB", "low"),
    ("qemu_cpu", "appliance QEMU CPU time until unmount", "s", "low"),
]


class LoadSampler:
    """Samples the 1-minute load average and the number of QEMU processes every 2 s (noise indicator)."""

    def __init__(self) -> None:
        import threading

        self.samples: list[tuple[float, float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            with _ignore_errors():
                with open("/proc/loadavg") as f:
                    load = float(f.read().split()[0])
                qemus = sum(1 for pid in _pids() if "qemu-system" in os.path.basename((_cmdline(pid) or [""])[0]))
                self.samples.append((time.monotonic(), load, qemus))
            self._stop.wait(2)

    def summary(self, start: float, end: float, own_qemus: int) -> str:
        window = [(load, q) for t, load, q in self.samples if start <= t <= end]
        if not window:
            return "no load samples"
        mean_load = sum(load for load, _ in window) / len(window)
        others = [max(0, q - own_qemus) for _, q in window]
        busy = sum(1 for o in others if o) / len(others)
        return (f"mean load {mean_load:.1f}, other QEMU processes running {busy:.0%} of the time "
                f"(up to {max(others)})")

    def stop(self) -> None:
        self._stop.set()


class Bench:
    def __init__(self, args: argparse.Namespace, image: Path, workdir: Path) -> None:
        self.args = args
        self.image = image
        self.workdir = workdir
        self.can_drop = drop_caches()
        from benchimage import BIG_FILE, big_file_content
        self.big_file_rel = BIG_FILE.lstrip("/")
        self.big = big_file_content()
        self.big_sha = hashlib.sha256(self.big).hexdigest()
        self.mounted: list[tuple[Path, Tool]] = []
        self.mirror_snapshot = workdir / "tree.json"
        self.with_mirror = not args.only or "mirror" in args.only
        self.mirror_result: Result | None = None
        self.load = LoadSampler()
        self.copies: dict[str, Path] = {}  # tool key -> its complete rsync copy, for the rsync onto it
        self.untar_archive = workdir / "untar.tar"
        make_untar_archive(self.untar_archive)

    def drop(self) -> None:
        if self.can_drop:
            drop_caches()

    def cleanup(self) -> None:
        for mnt, tool in reversed(self.mounted):
            if is_mounted(mnt) or fuse_pid(mnt) is not None:
                say(f"cleanup: unmounting {mnt}")
                unmount(mnt, fuse_pid(mnt), tool.appliance_pid)
            # guestmount killed while it launched leaves its QEMU behind (virtmount's appliances end
            # with their connection or through the watchdog)
            orphan = None if tool.is_virtmount else tool.appliance_pid()
            if orphan is not None:
                say(f"cleanup: stopping guestmount's appliance QEMU {orphan}")
                with _ignore_errors():
                    os.kill(orphan, signal.SIGTERM)
                    _wait_gone(orphan, 30)
        self.mounted.clear()

    def run(self, tool: Tool) -> Result:
        result = Result()
        mnt = self.workdir / f"mnt-{tool.key}"
        mnt.mkdir()
        self.mounted.append((mnt, tool))
        pid = None
        started = time.monotonic()
        try:
            pid = self._phases(tool, mnt, result)
        except Exception as exc:  # noqa: BLE001 - recorded, the next tool still runs
            result.error = f"{type(exc).__name__}: {exc}"
            say(f"{tool.title}: FAILED: {result.error}")
        # A stop (SIGTERM, ^C) passes by here, leaving the mount to cleanup().
        if is_mounted(mnt) or fuse_pid(mnt) is not None:
            pid = pid or fuse_pid(mnt)
            seconds, problems = unmount(mnt, pid, tool.appliance_pid)
            result.notes += [f"unmount: {p}" for p in problems]
            if result.error is None:
                result.values["unmount"] = seconds
                say(f"{tool.title}: unmounted in {seconds:.2f} s")
        if result.error is None:
            self._mount_again(tool, mnt, result)
        shutil.rmtree(self.copies.pop(tool.key, mnt / "no copy"), ignore_errors=True)
        self.mounted.remove((mnt, tool))
        with _ignore_errors():
            mnt.rmdir()
        if result.error is None and tool.key in ("guestmount", "virtmount"):
            self._write_phases(tool, result)
        # while mounted, one QEMU process (the appliance) is ours
        result.load = self.load.summary(started, time.monotonic(), own_qemus=1)
        return result

    def _write_phases(self, tool: Tool, result: Result) -> None:
        """untar and a sequential write, on a mount of a writable overlay of the bench image of this tool's own."""
        from benchimage import images
        v = result.values
        overlay = images.IMAGE_DIR / f"bench-rw-{tool.key}.qcow2"  # where libvirt's QEMU may open it
        overlay.unlink(missing_ok=True)
        run_cmd(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(self.image), str(overlay)],
                check=True)
        writer = replace(tool, key=f"{tool.key}-rw", image=overlay, writable=True, domain=RW_DOMAIN_NAME)
        if writer.is_virtmount:
            images.ensure_domain(SYSTEM_URI, RW_DOMAIN_NAME, overlay)
        mnt = self.workdir / f"mnt-{writer.key}"
        mnt.mkdir()
        self.mounted.append((mnt, writer))
        try:
            argv, env = writer.mount_argv(mnt)
            say(f"{tool.title} (writes): {' '.join(argv)}")
            proc = run_cmd(argv, env=env, capture_output=True, text=True, timeout=MOUNT_TIMEOUT_S)
            if proc.returncode != 0:
                raise RuntimeError(f"rw mount failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
            target = writer.root(mnt) / "bench-writes"
            target.mkdir()
            calls = daemon_calls(mnt) if writer.is_virtmount else None

            started = time.monotonic()
            untar = run_cmd(["tar", "-xf", str(self.untar_archive), "-C", str(target)], capture_output=True, text=True)
            v["untar"] = time.monotonic() - started
            _record_calls(result, "untar", calls, calls := daemon_calls(mnt) if writer.is_virtmount else None)
            files = sum(len(names) for _, _, names in os.walk(target / "untar"))
            if untar.returncode != 0 or files != UNTAR_FILES:
                result.notes.append(f"untar exited with {untar.returncode} ({untar.stderr.strip()[-300:]}), "
                                    f"{files} of {UNTAR_FILES} files there")
            say(f"{tool.title}: untar of {files} files in {v['untar']:.2f} s")

            calls = daemon_calls(mnt) if writer.is_virtmount else None
            written = target / "seq.bin"
            started = time.monotonic()
            with open(written, "wb", buffering=0) as out:
                for offset in range(0, len(self.big), 1 << 20):
                    out.write(self.big[offset:offset + (1 << 20)])
                os.fsync(out.fileno())
            seconds = time.monotonic() - started
            v["seq_write"] = len(self.big) / seconds / 1e6
            _record_calls(result, "seq_write", calls, daemon_calls(mnt) if writer.is_virtmount else None)
            self.drop()
            if hashlib.sha256(written.read_bytes()).hexdigest() != self.big_sha:
                result.notes.append("the 64 MiB file written reads back WRONG")
            say(f"{tool.title}: wrote 64 MiB and fsynced in {seconds:.2f} s ({v['seq_write']:.1f} MB/s)")
        except Exception as exc:  # noqa: BLE001 - recorded; the read rows of this tool stand
            result.notes.append(f"writes FAILED: {type(exc).__name__}: {exc}")
            say(f"{tool.title} (writes): FAILED: {exc}")
        finally:
            _, problems = unmount(mnt, fuse_pid(mnt), writer.appliance_pid)
            result.notes += [f"rw unmount: {p}" for p in problems]
            self.mounted.remove((mnt, writer))
            with _ignore_errors():
                mnt.rmdir()
            if writer.is_virtmount:
                _undefine(SYSTEM_URI, RW_DOMAIN_NAME)
            overlay.unlink(missing_ok=True)

    def _mount_again(self, tool: Tool, mnt: Path, result: Result) -> None:
        """Mount -> first listing once more: guestmount inspects the guest again, virtmount mounts the
        layout its first mount remembered (its inspection_cache started empty in this run)."""
        argv, env = tool.mount_argv(mnt)
        self.drop()
        started = time.monotonic()
        proc = run_cmd(argv, env=env, capture_output=True, text=True, timeout=MOUNT_TIMEOUT_S)
        if proc.returncode != 0:
            result.notes.append(f"second mount failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
            return
        try:
            names = os.listdir(tool.root(mnt))
            result.values["first_listing_again"] = time.monotonic() - started
            calls = daemon_calls(mnt) if tool.is_virtmount else None
            _record_calls(result, "first_listing_again", 0, calls)
            say(f"{tool.title}: mounted again, first listing after {result.values['first_listing_again']:.2f} s "
                f"({len(names)} names)")
            if tool.key in self.copies:
                self._rsync_onto_copy(tool, mnt, result, calls)
        except OSError as exc:
            result.notes.append(f"second mount: listing failed: {exc}")
        finally:
            _, problems = unmount(mnt, fuse_pid(mnt), tool.appliance_pid)
            result.notes += [f"second unmount: {p}" for p in problems]

    def prepare_fast_start(self, tool: Tool) -> str:
        """Mount virtmount once, untimed, with the column's settings but a layout cache of its own, so
        that the saved appliance for the current libguestfs appliance build exists before the timed
        mounts: it is made once per host, build and settings, and guestmount's run before may have had
        supermin rebuild the appliance (a new build). The timed never-seen guest stays never seen."""
        mnt = self.workdir / "mnt-prepare"
        mnt.mkdir()
        prepared = replace(tool, layouts=self.workdir / "layouts-prepare")
        argv, env = prepared.mount_argv(mnt)
        before = set(saved_appliances(SYSTEM_URI))
        self.mounted.append((mnt, prepared))
        started = time.monotonic()
        proc = run_cmd(argv, env=env, capture_output=True, text=True, timeout=MOUNT_TIMEOUT_S)
        if proc.returncode != 0:
            self.mounted.remove((mnt, prepared))
            mnt.rmdir()
            return f"preparing the fast start failed ({proc.returncode}): {proc.stderr.strip()[-300:]}"
        try:
            os.listdir(prepared.root(mnt))
        except OSError as exc:
            return f"preparing the fast start: listing failed: {exc}"
        finally:
            seconds = time.monotonic() - started
            unmount(mnt, fuse_pid(mnt), prepared.appliance_pid)
            self.mounted.remove((mnt, prepared))
            with _ignore_errors():
                mnt.rmdir()
        made = sorted(set(saved_appliances(SYSTEM_URI)) - before)
        what = f"made {', '.join(made)}" if made else "the saved appliance was there already"
        return f"fast start prepared before the timed virtmount column (untimed mount, {seconds:.1f} s): {what}"

    def _rsync_onto_copy(self, tool: Tool, mnt: Path, result: Result, calls: int | None) -> None:
        """rsync -aHAXS of the freshly mounted guest onto its complete copy: only metadata to compare."""
        self.drop()
        started = time.monotonic()
        proc = run_cmd(["rsync", "-aHAXS", "--itemize-changes", f"{tool.root(mnt)}/", f"{self.copies[tool.key]}/"],
                       capture_output=True, text=True, errors="replace")
        result.values["rsync_again"] = time.monotonic() - started
        _record_calls(result, "rsync_again", calls, daemon_calls(mnt) if tool.is_virtmount else None)
        changed = [line for line in proc.stdout.splitlines() if line.strip()]
        if proc.returncode != 0 or changed:
            result.notes.append(f"rsync onto the complete copy exited with {proc.returncode} and changed "
                                f"{len(changed)} entries: " + " | ".join(changed[:5])[:500])
        say(f"{tool.title}: rsync onto the complete copy in {result.values['rsync_again']:.2f} s, "
            f"{len(changed)} entries changed")

    def _mirror_rsync_onto_copy(self, mnt: Path, copy: Path, result: Result) -> None:
        """The mirror's floor for the rsync onto the complete copy: the same ``rsync -aHAXS`` walk of
        every entry, its xattrs and ACLs, as a dry run (``-n``), since the mirror shows no xattrs and
        no contents and a real run would strip the copy of its xattrs."""
        self.drop()
        started = time.monotonic()
        proc = run_cmd(["rsync", "-aHAXS", "-n", f"{mnt}/", f"{copy}/"], capture_output=True, text=True,
                       errors="replace")
        result.values["rsync_again"] = time.monotonic() - started
        if proc.returncode != 0:
            result.notes.append(f"dry-run rsync onto the complete copy exited with {proc.returncode}: "
                                f"{proc.stderr.strip()[-300:]}")
        say(f"{MIRROR_TITLE}: dry-run rsync onto virtmount's complete copy in {result.values['rsync_again']:.2f} s")

    def _walks(self, title: str, root: Path, result: Result,
               calls: Callable[[], int | None] = lambda: None) -> list[bytes]:
        """find, ls -lR and a warm lstat of every path: the phases that only read metadata."""
        v = result.values
        # find
        self.drop()
        before = calls()
        started = time.monotonic()
        proc = run_cmd(["find", str(root), "-print0"], capture_output=True)
        v["find"] = time.monotonic() - started
        _record_calls(result, "find", before, before := calls())
        paths = [p for p in proc.stdout.split(b"\0") if p]
        result.count = len(paths)
        if proc.returncode != 0:
            result.notes.append(f"find exited with {proc.returncode}: "
                                f"{proc.stderr.decode(errors='replace').strip()[-300:]}")
        say(f"{title}: find: {len(paths)} paths in {v['find']:.2f} s")

        # ls -lR
        self.drop()
        started = time.monotonic()
        proc = run_cmd(["ls", "-lR", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        v["ls_lR"] = time.monotonic() - started
        _record_calls(result, "ls_lR", before, before := calls())
        if proc.returncode != 0:
            result.notes.append(f"ls -lR exited with {proc.returncode}: "
                                f"{proc.stderr.decode(errors='replace').strip()[-300:]}")
        say(f"{title}: ls -lR in {v['ls_lR']:.2f} s")

        # lstat, warm
        errors = 0
        started = time.monotonic()
        for p in paths:
            try:
                os.lstat(p)
            except OSError:
                errors += 1
        v["lstat_warm"] = time.monotonic() - started
        _record_calls(result, "lstat_warm", before, calls())
        if errors:
            result.notes.append(f"lstat failed on {errors} of {len(paths)} paths")
        say(f"{title}: warm lstat of {len(paths)} paths in {v['lstat_warm']:.2f} s")

        return paths

    def _phases(self, tool: Tool, mnt: Path, result: Result) -> int | None:
        v = result.values
        argv, env = tool.mount_argv(mnt)
        root = tool.root(mnt)

        # mount -> first listing
        self.drop()
        say(f"{tool.title}: {' '.join(argv)}")
        started = time.monotonic()
        proc = run_cmd(argv, env=env, capture_output=True, text=True, timeout=MOUNT_TIMEOUT_S)
        v["mount_return"] = time.monotonic() - started
        if proc.returncode != 0:
            raise RuntimeError(f"mount failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
        names = os.listdir(root)
        v["first_listing"] = time.monotonic() - started

        def calls() -> int | None:
            return daemon_calls(mnt) if tool.is_virtmount else None

        _record_calls(result, "first_listing", 0, calls())
        pid = fuse_pid(mnt)
        say(f"{tool.title}: command returned after {v['mount_return']:.2f} s, first listing after "
            f"{v['first_listing']:.2f} s ({len(names)} names), FUSE pid {pid}")

        paths = self._walks(tool.title, root, result, calls)

        # sequential read
        big = root / self.big_file_rel
        self.drop()
        chunks = []
        buf_size = 1 << 20
        before = calls()
        started = time.monotonic()
        with open(big, "rb", buffering=0) as f:
            while chunk := f.read(buf_size):
                chunks.append(chunk)
        seconds = time.monotonic() - started
        data = b"".join(chunks)
        v["seq_read"] = len(data) / seconds / 1e6
        _record_calls(result, "seq_read", before, calls())
        ok = hashlib.sha256(data).hexdigest() == self.big_sha
        if not ok:
            result.notes.append(f"64 MiB file content WRONG ({len(data)} bytes read)")
        say(f"{tool.title}: sequential read {len(data)} bytes in {seconds:.2f} s "
            f"({v['seq_read']:.1f} MB/s), content {'ok' if ok else 'WRONG'}")
        del chunks, data

        # random 4 KiB reads
        self.drop()
        rng = random.Random(4096)
        offsets = [rng.randrange(len(self.big) // 4096) * 4096 for _ in range(self.args.random_reads)]
        fd = os.open(big, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            before = calls()
            started = time.monotonic()
            got = [os.pread(fd, 4096, off) for off in offsets]
            seconds = time.monotonic() - started
            _record_calls(result, "rand_read", before, calls())
        finally:
            os.close(fd)
        bad = sum(1 for off, block in zip(offsets, got) if block != self.big[off:off + 4096])
        v["rand_read"] = len(offsets) / seconds
        v["rand_read_ms"] = seconds / len(offsets) * 1e3
        if bad:
            result.notes.append(f"{bad} of {len(offsets)} random reads returned wrong data")
        say(f"{tool.title}: {len(offsets)} random 4 KiB reads in {seconds:.2f} s "
            f"({v['rand_read']:.0f}/s), {bad} wrong")

        # rsync
        dest = self.workdir / f"rsync-{tool.key}"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir()
        self.drop()
        before = calls()
        started = time.monotonic()
        proc = run_cmd(["rsync", "-aHAXS", f"{root}/", f"{dest}/"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)
        v["rsync"] = time.monotonic() - started
        _record_calls(result, "rsync", before, calls())
        err = proc.stderr.decode(errors="replace").strip()
        if proc.returncode != 0 or err:
            lines = err.splitlines()
            result.notes.append(f"rsync exited with {proc.returncode}, {len(lines)} stderr lines: "
                                + " | ".join(lines[:5])[:800])
        copied = 1 + sum(len(subdirs) + len(names) for _, subdirs, names in os.walk(dest))
        if copied != len(paths):
            result.notes.append(f"rsync copy has {copied} entries, find saw {len(paths)}")
        with open(dest / self.big_file_rel, "rb") as copy:
            if hashlib.sha256(copy.read()).hexdigest() != self.big_sha:
                result.notes.append("rsync copy of the 64 MiB file differs")
        say(f"{tool.title}: rsync exit {proc.returncode} in {v['rsync']:.2f} s, {copied} entries copied")
        self.copies[tool.key] = dest  # for the rsync onto it after the next mount

        # memory, CPU
        pid = fuse_pid(mnt) or pid
        fuse = proc_status(pid)
        qemu = proc_status(tool.appliance_pid())
        if "VmHWM" in fuse:
            v["fuse_hwm"], v["fuse_cpu"] = fuse["VmHWM"], fuse["cpu"]
        else:
            result.notes.append("FUSE process not found for memory/CPU")
        if "VmHWM" in qemu:
            v["qemu_hwm"], v["qemu_cpu"] = qemu["VmHWM"], qemu["cpu"]
        else:
            result.notes.append("appliance QEMU process not found for memory/CPU")
        say(f"{tool.title}: FUSE pid {pid} {fuse}, appliance QEMU {qemu}")
        if tool.key == "virtmount" and self.with_mirror:  # after the CPU and memory rows
            count = noop_mirror.record(root, self.mirror_snapshot)
            say(f"{tool.title}: recorded the shape of {count} paths for the no-op mirror")
            # While virtmount and its (idle) appliance are still up: with nothing else running, the
            # host's idle CPUs wake slower and the mirror's ls -lR took twice as long (13.8 s vs 7.5 s).
            self.mirror_result = self.run_mirror()
        return pid

    def run_mirror(self) -> Result:
        """The metadata walks over the no-op pyfuse3 mirror of the tree virtmount showed."""
        result = Result()
        mnt = self.workdir / "mnt-mirror"
        mnt.mkdir()
        server = subprocess.Popen([sys.executable, str(BENCH_DIR / "noop_mirror.py"), "serve",
                                   str(self.mirror_snapshot), str(mnt)])
        started = time.monotonic()
        try:
            while not is_mounted(mnt):
                if server.poll() is not None or time.monotonic() - started > 60:
                    raise RuntimeError(f"the mirror did not mount (exit status {server.poll()})")
                time.sleep(0.1)
            self._walks(MIRROR_TITLE, mnt, result)
            if "virtmount" in self.copies:
                self._mirror_rsync_onto_copy(mnt, self.copies["virtmount"], result)
        except Exception as exc:  # noqa: BLE001 - recorded in the table's checks
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            _, problems = unmount(mnt, server.pid)
            result.notes += [f"unmount: {p}" for p in problems]
            server.wait()
            with _ignore_errors():
                mnt.rmdir()
        return result


# ================================================================ report


def machine_info() -> list[tuple[str, str]]:
    def first(path: str, key: str) -> str:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        return "?"

    def out(argv: list[str]) -> str:
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    mem_kib = int(first("/proc/meminfo", "MemTotal").split()[0])
    rev = out(["git", "-C", str(REPO), "describe", "--always", "--dirty"])
    return [
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("CPU", f"{out(['nproc'])} × {first('/proc/cpuinfo', 'model name')}"),
        ("memory", f"{mem_kib / 1024 / 1024:.1f} GiB"),
        ("kernel", os.uname().release),
        ("accelerator", "TCG for both tools (KVM unusable on this machine)"),
        ("versions", f"{out(['guestmount', '--version'])}, libvirt {out(['libvirtd', '--version']).split()[-1]}, "
                     f"{out(['qemu-system-x86_64', '--version'])}, rsync {out(['rsync', '--version']).split()[2]}"),
        ("virtmount", f"git {rev}"),
    ]


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit in ("MiB", "reads/s") or value >= 1000:
        return f"{value:.0f}"
    if value >= 100:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}"


def build_table(results: dict[str, Result], tools: list[Tool], delay_ms: float) -> list[list[str]]:
    keys = [t.key for t in tools]
    has_proxy = "proxy" in keys
    has_mirror = "mirror" in results
    header = ["workload", "unit", "guestmount", "virtmount", "virtmount ÷ guestmount", "virtmount daemon calls"]
    if has_proxy:
        header += [f"virtmount, {delay_ms:g} ms proxy", "proxy ÷ local"]
    if has_mirror:
        header += [MIRROR_TITLE, "mirror ÷ guestmount"]
    rows = [header]

    def val(key: str, row: str) -> float | None:
        r = results.get(key)
        return None if r is None or r.error else r.values.get(row)

    for row, label, unit, better in ROWS:
        g, vm = val("guestmount", row), val("virtmount", row)
        unit_text = unit + (" (higher = better)" if better == "high" else "")
        calls = results["virtmount"].calls.get(row) if "virtmount" in results else None
        line = [label, unit_text, _fmt(g, unit), _fmt(vm, unit), _ratio(vm, g), "–" if calls is None else str(calls)]
        if has_proxy:
            p = val("proxy", row)
            line += [_fmt(p, unit), _ratio(p, vm)]
        if has_mirror:
            m = val("mirror", row) if row in MIRROR_ROWS else None
            line += [_fmt(m, unit), _ratio(m, g)]
        rows.append(line)
    return rows


def render_text(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_markdown(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(rows[0]) + " |",
           "|" + "|".join(["---", "---"] + ["---:"] * (len(rows[0]) - 2)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(out)


RATIO_NOTE = ("Ratios divide the values in the row's unit: for seconds, ms and MiB a ratio below 1 "
              "means virtmount is faster/smaller; for MB/s and reads/s a ratio above 1 means "
              "virtmount is faster.  \"proxy ÷ local\" compares virtmount over the delaying "
              "proxy with virtmount on qemu:///system the same way.  The no-op pyfuse3 mirror "
              "(contrib/bench/noop_mirror.py) serves the tree virtmount showed from memory, with "
              "nothing behind it: its time is the floor for any pyfuse3 + trio filesystem doing that walk (for "
              "the rsync onto the complete copy, a dry run: it shows no xattrs and no contents).  "
              "\"virtmount daemon calls\" counts the guestfs daemon calls virtmount's appliance answered during "
              "the row's phase (the first-listing rows: everything since the mount, the guest's layout included).")


def report(results: dict[str, Result], tools: list[Tool], args: argparse.Namespace, info: list[tuple[str, str]],
           extra: list[str], total_seconds: float, command: str) -> tuple[str, str]:
    rows = build_table(results, tools, args.tcp_delay_ms)
    checks = []
    for tool in tools:
        r = results.get(tool.key)
        if r is None:
            continue
        status = f"FAILED: {r.error}" if r.error else "ok"
        checks.append(f"{tool.title}: {status}; find counted {r.count} paths"
                      + ("".join(f"; {n}" for n in r.notes)) + f"; during its run: {r.load}")
    mirror = results.get("mirror")
    if mirror is not None:
        checks.append(f"{MIRROR_TITLE}: " + (f"FAILED: {mirror.error}" if mirror.error else "ok")
                      + f"; find counted {mirror.count} paths" + "".join(f"; {n}" for n in mirror.notes))
    counts: set[int] = set()
    for key in [t.key for t in tools] + ["mirror"]:
        count = results[key].count if key in results else None
        if count is not None:
            counts.add(count)
    if len(counts) > 1:
        checks.append(f"PATH COUNTS DIFFER between tools: {sorted(counts)}")
    elif counts and min(counts) < 20000:
        checks.append(f"path count {min(counts)} is below 20,000")

    titles = []
    for t in tools:
        titles.append(t.title)
        if t.key == "virtmount" and "mirror" in results:
            titles[-1] += f" (with the {MIRROR_TITLE} walked at its end, virtmount still mounted)"
    order = " → ".join(titles)
    text = "\n".join([
        *(f"{k}: {v}" for k, v in info),
        f"order: {order} (each: mount, the read phases in table order, unmount, then mount again → first listing → rsync onto the complete copy, unmount; then guestmount and virtmount each mount a writable overlay of their own for the untar and the write)",
        *extra,
        "",
        render_text(rows),
        "",
        RATIO_NOTE,
        "",
        "checks:",
        *(f"  {c}" for c in checks),
        f"whole run: {total_seconds / 60:.1f} min",
    ])
    md = "\n".join([
        "# virtmount vs guestmount",
        "",
        f"Made by `{command}`; overwritten by each run.",
        "",
        *(f"- {k}: {v}" for k, v in info),
        f"- order: {order} (each: mount, the read phases in table order, unmount, then mount again → first listing → rsync onto the complete copy, unmount; then guestmount and virtmount each mount a writable overlay of their own for the untar and the write)",
        *(f"- {e}" for e in extra),
        f"- whole run: {total_seconds / 60:.1f} min",
        "",
        render_markdown(rows),
        "",
        RATIO_NOTE,
        "",
        "Checks:",
        "",
        *(f"- {c}" for c in checks),
        "",
    ])
    return text, md


# ================================================================ main


class _Terminated(BaseException):
    pass


def _on_signal(signum: int, _frame: object) -> None:
    raise _Terminated(signal.Signals(signum).name)


def ensure_libvirtd(tcp: bool) -> None:
    argv = [str(START_LIBVIRTD)] + (["--tcp", str(TCP_CONF)] if tcp else [])
    if tcp and not tcp_listening(LIBVIRTD_TCP_PORT):
        say(f"nothing listens on 127.0.0.1:{LIBVIRTD_TCP_PORT}: {' '.join(argv)} (restarts libvirtd)")
    proc = run_cmd(argv, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"compare: {proc.stderr.strip() or 'start-libvirtd failed'}")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="fewer random reads (200) and no TCP proxy run (same image)")
    parser.add_argument("--skip-tcp", action="store_true", help="no virtmount run over the delaying proxy")
    parser.add_argument("--tcp-delay-ms", type=float, default=5.0,
                        help="delay the proxy adds in each direction (default 5)")
    parser.add_argument("--random-reads", type=int, default=None, help="number of random 4 KiB reads (default 2000)")
    parser.add_argument("--virtmount-opts", default=DEFAULT_VIRTMOUNT_OPTS,
                        help=f"virtmount -o options (default {DEFAULT_VIRTMOUNT_OPTS})")
    parser.add_argument("--only", choices=("guestmount", "virtmount", "proxy", "mirror"), action="append",
                        help="run only these (repeatable; for debugging, the table has gaps; "
                             "mirror runs inside virtmount's column)")
    parser.add_argument("--no-results-md", action="store_true", help="do not write contrib/bench/results.md")
    parser.add_argument("--serve-proxy", type=float, metavar="DELAY_MS", help=argparse.SUPPRESS)
    parser.add_argument("--upstream-port", type=int, default=LIBVIRTD_TCP_PORT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve_proxy is not None:
        _proxy_main(args.serve_proxy / 1e3, args.upstream_port)
        return 0
    if args.random_reads is None:
        args.random_reads = 200 if args.quick else 2000
    use_tcp = not (args.quick or args.skip_tcp)
    if os.geteuid() != 0:
        raise SystemExit("compare: must run as root (FUSE mounts, drop_caches, qemu:///system)")
    for prog in ("guestmount", "fusermount3", "rsync", "find"):
        if shutil.which(prog) is None:
            raise SystemExit(f"compare: {prog} not found")
    if not VIRTMOUNT.exists():
        raise SystemExit(f"compare: {VIRTMOUNT} missing (run make setup)")

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    command = " ".join([".venv/bin/python contrib/bench/compare.py", *argv])
    run_started = time.monotonic()
    info = machine_info()
    load_before = open("/proc/loadavg").read().split()[:3]

    ensure_libvirtd(use_tcp)
    import benchimage

    image = benchimage.ensure(SYSTEM_URI, log=say)
    say(f"image {image}, domain {benchimage.DOMAIN_NAME}")

    tools = [Tool("guestmount", "guestmount", image),
             Tool("virtmount", "virtmount", image, uri=SYSTEM_URI, options=args.virtmount_opts)]
    if use_tcp:
        tools.append(Tool("proxy", f"virtmount over {args.tcp_delay_ms:g} ms proxy", image,
                          uri="(set when the proxy runs)", options=args.virtmount_opts))
    if args.only:
        tools = [t for t in tools if t.key in args.only]

    workdir = Path(tempfile.mkdtemp(prefix="virtmount-bench-", dir="/var/tmp"))
    for tool in tools:
        if tool.is_virtmount:
            tool.layouts = workdir / f"layouts-{tool.key}"
    bench = Bench(args, image, workdir)
    extra = []
    if not bench.can_drop:
        extra.append("drop_caches NOT available: kernel caches stayed warm between phases")
    else:
        extra.append("caches: `sync; echo 3 > /proc/sys/vm/drop_caches` before each cold phase "
                     "(tool-internal and in-appliance caches stay warm for both tools)")
    saved = saved_appliances(SYSTEM_URI)
    extra.append("saved appliances (virtmount fast start, made once per host and settings) on the host "
                 f"before the run: {', '.join(saved) if saved else 'none (the first virtmount boot makes one)'}")
    extra.append(f"random reads: {args.random_reads}; virtmount -o {args.virtmount_opts},"
                 "inspection_cache=(a new directory per run and per virtmount column)")
    results: dict[str, Result] = {}
    proxy: DelayProxy | None = None
    try:
        for tool in tools:
            if tool.key == "proxy":
                proxy = DelayProxy(args.tcp_delay_ms)
                tool.uri = f"qemu+tcp://127.0.0.1:{proxy.port}/system"
                direct = libvirt_round_trip_ms(f"qemu+tcp://127.0.0.1:{LIBVIRTD_TCP_PORT}/system")
                delayed = libvirt_round_trip_ms(tool.uri)
                extra.append(f"proxy: 127.0.0.1:{proxy.port} → 127.0.0.1:{LIBVIRTD_TCP_PORT}, "
                             f"{args.tcp_delay_ms:g} ms each way; libvirt RPC round trip "
                             f"{direct:.2f} ms direct over TCP, {delayed:.2f} ms through the proxy")
                say(extra[-1])
            if tool.key == "virtmount":
                extra.append(bench.prepare_fast_start(tool))
                say(extra[-1])
            results[tool.key] = bench.run(tool)
            if tool.key == "proxy" and proxy is not None:
                proxy.close()
                proxy = None
            if tool.key == "virtmount" and bench.mirror_result is not None:
                results["mirror"] = bench.mirror_result
    finally:
        bench.cleanup()
        bench.load.stop()
        if proxy is not None:
            proxy.close()
        shutil.rmtree(workdir, ignore_errors=True)

    load_after = open("/proc/loadavg").read().split()[:3]
    extra.append(f"load average (1/5/15 min) before: {' '.join(load_before)}, after: {' '.join(load_after)}")
    text, md = report(results, tools, args, info, extra, time.monotonic() - run_started, command)
    print(text)
    if not args.no_results_md:
        RESULTS_MD.write_text(md)
        say(f"wrote {RESULTS_MD}")
    return 1 if any(r.error for r in results.values()) else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except (_Terminated, KeyboardInterrupt) as exc:
        print(f"compare: interrupted ({exc or 'SIGINT'}); cleaned up", file=sys.stderr)
        sys.exit(130)
