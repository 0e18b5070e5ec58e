#!/bin/bash
# Prepare this machine (Debian 12, as root) for virtmount development/tests:
#   1. Debian packages (only the missing ones; apt-get update only then),
#   2. .venv (system site packages, for the `guestfs` module) with
#      `pip install -e '.[test]'` when pyproject.toml changed,
#   3. virtmount on PATH (/usr/local/bin, where mount.fuse3 finds it for
#      `mount -t fuse.virtmount` and fstab) and its man page,
#   4. virtlogd + libvirtd running,
#   5. the libguestfs appliance built once into /var/tmp/.guestfs-0.
# Idempotent: a second run only checks, in a few seconds.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD

die() { echo "setup: $*" >&2; exit 1; }
step() { echo "setup: $*"; }

[[ $(id -u) -eq 0 ]] || die "must run as root"

# ---------------------------------------------------------------- packages
PACKAGES=(
    libvirt-daemon-system libvirt-clients libvirt-dev
    qemu-system-x86 qemu-utils
    libguestfs-tools python3-guestfs libguestfs-xfs supermin
    # supermin builds the appliance from the host kernel in /boot.
    linux-image-amd64
    fuse3 libfuse3-dev pkg-config
    python3-venv python3-dev gcc
    lvm2 xfsprogs e2fsprogs rsync acl attr procps
    # tests: fio verifies what it wrote through a -o rw mount (crc32c in every block)
    fio
    # `man virtmount`
    man-db
    # tests: qemu+ssh:// to this host through an sshd of their own on loopback; `gio` probes
    openssh-server libglib2.0-bin
    # What the appliance needs for btrfs, vfat, ntfs and LUKS (libguestfs0 depends on them; named
    # here because the volume tests build and read such filesystems).
    btrfs-progs dosfstools ntfs-3g cryptsetup-bin
    # tests: a guest that really runs (tests/running_guest.py): a busybox initramfs made with cpio,
    # with the guest agent (qemu-ga and its libraries copied in) so that views freeze it for real
    busybox-static cpio qemu-guest-agent
)

missing=()
for p in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    step "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Another apt run (e.g. a provisioning script) may hold the lock.
    while pgrep -x apt-get >/dev/null || pgrep -x dpkg >/dev/null; do sleep 5; done
    apt-get update -q </dev/null >/dev/null || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null \
        || die "apt-get install failed"
fi

# ---------------------------------------------------------------- venv
# The guestfs module exists only for Debian's /usr/bin/python3.
VENV=$REPO/.venv
STAMP=$VENV/.virtmount-installed
check_imports() {
    "$VENV/bin/python" -c 'import guestfs, libvirt, pyfuse3, trio' 2>/dev/null
}
make_venv() {
    step "creating .venv"
    /usr/bin/python3 -m venv --system-site-packages "$VENV" || die "venv creation failed"
}
pip_install() {
    step "pip install -e '.[test]'"
    # pip is noisy on these machines (warnings about the local indexes):
    # keep its output in a log and point at it only on failure.
    log=$(mktemp /tmp/virtmount-pip.XXXXXX.log)
    "$VENV/bin/python" -m pip install -e '.[test]' </dev/null >"$log" 2>&1 \
        || die "pip install failed; see $log"
    rm -f "$log"
}
[[ -x $VENV/bin/python ]] || make_venv
# Reinstall when pyproject.toml changed since the last install, or when the
# venv is broken (e.g. after a Python upgrade). A venv that an interrupted
# set-up left half made may stay broken after that: it is made again.
if [[ ! -e $STAMP || pyproject.toml -nt $STAMP ]] || ! check_imports; then
    pip_install
    if ! check_imports; then
        step ".venv still cannot import guestfs, libvirt, pyfuse3 and trio: making it again"
        rm -rf "$VENV"
        make_venv
        pip_install
        check_imports || die ".venv cannot import guestfs, libvirt, pyfuse3 and trio"
    fi
    touch "$STAMP"
fi

# ---------------------------------------------------------------- command and man page
# A link to the venv's entry point: mount(8) runs helpers with a PATH of its own that includes
# /usr/local/bin, and mount.fuse3 runs `virtmount SOURCE DIR -o OPTS` found there.
if [[ $(readlink /usr/local/bin/virtmount 2>/dev/null) != "$VENV/bin/virtmount" ]]; then
    step "linking /usr/local/bin/virtmount"
    ln -sfn "$VENV/bin/virtmount" /usr/local/bin/virtmount
fi
MAN_PAGE=/usr/local/share/man/man1/virtmount.1
if ! cmp -s docs/virtmount.1 "$MAN_PAGE"; then
    step "installing $MAN_PAGE"
    install -D -m 0644 docs/virtmount.1 "$MAN_PAGE"
fi

# ---------------------------------------------------------------- services
contrib/start-libvirtd.sh

# ---------------------------------------------------------------- appliance
# The first launch of a guestfs handle builds the appliance (supermin) into
# /var/tmp/.guestfs-0/appliance.d; do it now so tests start fast.  KVM is
# broken on these machines, hence force_tcg.
# supermin makes the appliance from the host's packages: packages installed just now (filesystem
# tools, say) are in it only once it is made again.
APPLIANCE=/var/tmp/.guestfs-$(id -u)/appliance.d
if ((${#missing[@]})) && [[ -d $APPLIANCE ]]; then
    step "packages changed: the libguestfs appliance will be made again"
    rm -rf "$APPLIANCE"
fi
if [[ ! -s $APPLIANCE/kernel || ! -s $APPLIANCE/initrd || ! -s $APPLIANCE/root ]]; then
    step "building the libguestfs appliance (a few minutes)"
    log=$(mktemp /tmp/virtmount-test-tool.XXXXXX.log)
    if ! LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg \
            libguestfs-test-tool </dev/null >"$log" 2>&1; then
        die "libguestfs-test-tool failed; see $log"
    fi
    rm -f "$log"
fi

step "ok"
