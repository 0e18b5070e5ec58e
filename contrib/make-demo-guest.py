#!/usr/bin/env python3
"""Build (once, cached) the demo guest image and define it as the shut-off
libvirt domain `virtmount-demo` on qemu:///system.

Run with the project venv (it needs Debian's `guestfs` module and
libvirt-python), after `make setup`:  .venv/bin/python contrib/make-demo-guest.py

The image is the Debian 12 look-alike recipe of tests/images.py (DEMO):
/boot (ext4), / (LVM, ext4), /srv/data (LVM, XFS).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import images  # noqa: E402

URI = "qemu:///system"
NAME = "virtmount-demo"


def main() -> int:
    try:
        path = images.build(images.DEMO, log=lambda m: print(f"make-demo-guest: {m}"))
        images.ensure_domain(URI, NAME, path)
    except Exception as e:  # one-line error for make
        print(f"make-demo-guest: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"make-demo-guest: domain {NAME} on {URI} uses {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
