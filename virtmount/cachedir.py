"""Where virtmount keeps, on the client, what it remembers between runs: ``$XDG_CACHE_HOME/virtmount``
(or ``~/.cache/virtmount``): compressed appliances, guest layouts, accelerator verdicts."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "virtmount"
