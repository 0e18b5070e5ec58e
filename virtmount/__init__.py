"""virtmount: browse the filesystems of every guest on a libvirt connection."""

__version__ = "0.1.0"
