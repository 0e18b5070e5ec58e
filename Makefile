# virtmount developer targets.  Everything runs as root on Debian 12.
PYTHON := .venv/bin/python

.PHONY: setup test check demo

# Install packages, .venv, start libvirtd, build the libguestfs appliance.
setup:
	contrib/setup.sh

# Unit and acceptance tests (acceptance tests build cached test images the
# first time, which takes a few minutes).
test: setup
	$(PYTHON) -m pytest -v tests

check: setup
	$(PYTHON) -m mypy virtmount

# Build and define the demo guest, then inspect it with virtmount.
demo: setup
	$(PYTHON) contrib/make-demo-guest.py
	.venv/bin/virtmount inspect qemu:///system virtmount-demo
