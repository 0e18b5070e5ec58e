#!/bin/bash
# Make sure the system libvirt daemons (virtlogd, libvirtd) are running.
#
# PID 1 is not systemd on the CI/dev machines, so installing
# libvirt-daemon-system starts nothing: we start the daemons by hand.
#
# Usage:
#   contrib/start-libvirtd.sh               # unix socket only (qemu:///system)
#   contrib/start-libvirtd.sh --tcp CONF    # also listen on 127.0.0.1:16509
#
# With --tcp, if nothing listens on 127.0.0.1:16509, libvirtd is restarted
# as `libvirtd -l -d -f CONF`.  Restarting libvirtd leaves running domains
# alone (QEMU processes are not its children; it reconnects to them).
#
# Idempotent; exits non-zero with a one-line message on failure.
set -euo pipefail

TCP_CONF=""
if [[ $# -gt 0 ]]; then
    if [[ $1 == --tcp && $# -eq 2 ]]; then
        TCP_CONF=$(realpath "$2")
    else
        echo "usage: $0 [--tcp CONF]" >&2
        exit 2
    fi
fi

WAIT_SECONDS=${VIRTMOUNT_LIBVIRTD_WAIT:-60}

die() { echo "start-libvirtd: $*" >&2; exit 1; }

# True when something accepts TCP connections on 127.0.0.1:16509.
tcp_listening() {
    (exec 3<>/dev/tcp/127.0.0.1/16509) 2>/dev/null
}

# Wait (bounded) until `virsh -c URI version` answers.
wait_for() {
    local uri=$1 deadline=$((SECONDS + WAIT_SECONDS))
    until timeout 10 virsh -c "$uri" version >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            die "libvirtd did not answer on $uri within ${WAIT_SECONDS}s"
        fi
        sleep 0.5
    done
}

# Start libvirtd (daemonized) with the given extra arguments.
start_libvirtd() {
    libvirtd -d "$@" || die "could not start libvirtd $*"
}

command -v libvirtd >/dev/null || die "libvirtd not installed (run make setup)"

if ! pgrep -x virtlogd >/dev/null; then
    virtlogd -d || die "could not start virtlogd"
fi

if [[ -n $TCP_CONF ]]; then
    [[ -r $TCP_CONF ]] || die "cannot read $TCP_CONF"
    if ! tcp_listening; then
        # Stop a running libvirtd (started without -l) by its pid, wait for
        # it to exit (it holds /run/libvirtd.pid locked), start it again.
        for pid in $(pgrep -x libvirtd || true); do
            kill "$pid" 2>/dev/null || true
        done
        deadline=$((SECONDS + WAIT_SECONDS))
        while pgrep -x libvirtd >/dev/null; do
            ((SECONDS < deadline)) || die "libvirtd did not exit within ${WAIT_SECONDS}s"
            sleep 0.2
        done
        start_libvirtd -l -f "$TCP_CONF"
    fi
    wait_for qemu:///system
    wait_for qemu+tcp://127.0.0.1/system
else
    if ! pgrep -x libvirtd >/dev/null; then
        start_libvirtd
    fi
    wait_for qemu:///system
fi
