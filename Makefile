# virtmount developer targets.  Everything runs as root on Debian 12.
PYTHON := .venv/bin/python

.PHONY: setup test check demo soak

# Install packages, .venv, start libvirtd, build the libguestfs appliance.
setup:
	contrib/setup.sh

# Type checks (the package, and the tests whose fakes must match the classes they stand for),
# then the slow cached test images, two at a time (minutes on a fresh machine, seconds when they exist;
# a failure is left to the fixtures that need the image, which try again), then unit and acceptance tests.
test: setup check
	-$(PYTHON) -m tests.prebuild
	$(PYTHON) -m pytest -v --durations=30 tests

# On demand, not part of make test: 30 minutes of random reads over four guests with appliances killed
# and libvirtd restarted (tests/acceptance/test_soak.py). It restarts the system libvirtd: run it alone.
SOAK_MINUTES ?= 30
soak: setup
	VIRTMOUNT_SOAK_MINUTES=$(SOAK_MINUTES) $(PYTHON) -m pytest -v -s tests/acceptance/test_soak.py

check: setup
	$(PYTHON) -m mypy virtmount tests contrib

# Build and define the demo guest, inspect it, mount qemu:///system and show the guest's files.
DEMO_MNT := /mnt/virtmount-demo
demo: setup
	$(PYTHON) contrib/make-demo-guest.py
	.venv/bin/virtmount inspect qemu:///system virtmount-demo
	mkdir -p $(DEMO_MNT)
	if mountpoint -q $(DEMO_MNT); then fusermount3 -u $(DEMO_MNT); fi
	.venv/bin/virtmount qemu:///system $(DEMO_MNT)
	ls -l $(DEMO_MNT)/domains/virtmount-demo/fs/ $(DEMO_MNT)/domains/virtmount-demo/devices/
	cat $(DEMO_MNT)/domains/virtmount-demo/fs/etc/os-release
	@echo "demo: qemu:///system is mounted on $(DEMO_MNT); unmount with: fusermount3 -u $(DEMO_MNT)"
