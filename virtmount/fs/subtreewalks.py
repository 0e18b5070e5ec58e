"""When to list a whole subtree at once (guestfs/subtree.py), and which walks cover which directories.

A recursive walker (find, ls -R, rsync, a backup tool's scan) goes into the
subdirectories of a directory it has just listed, one after the other; the
walk-ahead (prefetch.py) wishes for those before it asks. Once a walker has gone
into WALKER_CLAIMS such directories of one parent within WALKER_WINDOW_S, the
parent's whole subtree is listed in one walk instead of directory by
directory. A file browser that opens one folder does not start a walk.

A walk covers the directories below its start while it runs (their listings
are waited for, not fetched again) and, once done, those it listed. Walks
belong to one appliance (``Appliance``: the source's identity and the layout
generation of its boot): a new appliance of the source starts afresh. A walk
that fails (e.g. a guest's own daemon without ``debug sh``) turns walks off
for that appliance, and its directories are listed one by one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import trio

WALKER_CLAIMS = 3
WALKER_WINDOW_S = 2.0

Appliance = tuple[str, int]  # source identity, layout generation


@dataclass
class SubtreeWalk:
    appliance: Appliance
    start: bytes
    done: trio.Event = field(default_factory=trio.Event)
    listed: set[bytes] = field(default_factory=set)  # directories whose listings it gave
    xattrs_done: trio.Event = field(default_factory=trio.Event)  # its listings' xattrs are in, or will not come

    def covers(self, path: bytes) -> bool:
        """Whether ``path``'s listing comes (or came) from this walk."""
        if self.done.is_set():
            return path in self.listed
        return path == self.start or path.startswith(self.start.rstrip(b"/") + b"/")


class SubtreeWalks:
    """The walks of the appliances of one mount, and the walkers' claims that start them."""

    def __init__(self) -> None:
        self._walks: list[SubtreeWalk] = []
        self._claims: dict[tuple[Appliance, bytes], list[float]] = {}
        self._off: set[Appliance] = set()  # appliances whose daemon cannot walk
        self._blksizes: dict[Appliance, dict[int, int]] = {}

    def covering(self, appliance: Appliance, path: bytes) -> SubtreeWalk | None:
        for walk in self._walks:
            if walk.appliance == appliance and walk.covers(path):
                return walk
        return None

    def blksizes(self, appliance: Appliance) -> dict[int, int]:
        """st_blksize by device, as the walks of this appliance learned them (guestfs/subtree.py)."""
        return self._blksizes.setdefault(appliance, {})

    def claimed(self, appliance: Appliance, path: bytes) -> SubtreeWalk | None:
        """A walker went into ``path``, wished for ahead: the walk of its parent to start now, if this
        makes a walker of it."""
        parent = path.rpartition(b"/")[0] or b"/"
        if appliance in self._off or self.covering(appliance, parent) is not None:
            return None
        now = time.monotonic()
        recent = [t for t in self._claims.get((appliance, parent), []) if now - t < WALKER_WINDOW_S] + [now]
        self._claims[(appliance, parent)] = recent
        if len(recent) < WALKER_CLAIMS:
            return None
        del self._claims[(appliance, parent)]
        self._forget_other_boots(appliance)
        walk = SubtreeWalk(appliance, parent)
        self._walks.append(walk)
        return walk

    def turn_off(self, appliance: Appliance) -> None:
        self._off.add(appliance)

    def _forget_other_boots(self, appliance: Appliance) -> None:
        """What earlier appliances of the same source left: they are gone."""
        def stale(other: Appliance) -> bool:
            return other[0] == appliance[0] and other[1] != appliance[1]
        self._walks = [w for w in self._walks if not stale(w.appliance)]
        self._claims = {key: times for key, times in self._claims.items() if not stale(key[0])}
        self._blksizes = {key: sizes for key, sizes in self._blksizes.items() if not stale(key)}
        self._off = {key for key in self._off if not stale(key)}
