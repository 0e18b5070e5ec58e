"""Directory listings kept after the kernel forgot them, within a bound.

While an appliance runs, the guest's disks cannot change under it, so a
listing (names, attributes, link targets, xattrs once fetched) stays true
until that appliance goes, or until the mount itself writes to that
directory (``drop``). Keeping listings lets a second walk (ls -lR after
find, rsync after ls, a backup run after a browse) and every path lookup in
a listed directory go without daemon calls. Least recently used listings are
dropped first once the entries held exceed ``max_entries``.
"""

from __future__ import annotations

import collections
from typing import Generic, Hashable, Sized, TypeVar

L = TypeVar("L", bound=Sized)


class ListingCache(Generic[L]):
    """An LRU map of key -> listing, bounded by the sum of the listings' lengths."""

    def __init__(self, max_entries: int) -> None:
        self._max_entries = max_entries
        self._listings: collections.OrderedDict[Hashable, L] = collections.OrderedDict()
        self.entries = 0

    def __len__(self) -> int:
        return len(self._listings)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._listings

    def listings(self) -> list[L]:
        """Every listing kept, least recently used first."""
        return list(self._listings.values())

    def get(self, key: Hashable) -> L | None:
        """The listing under ``key`` (now the most recently used), or None."""
        listing = self._listings.get(key)
        if listing is not None:
            self._listings.move_to_end(key)
        return listing

    def drop(self, key: Hashable) -> None:
        """Forget the listing under ``key`` (its directory was written to)."""
        old = self._listings.pop(key, None)
        if old is not None:
            self.entries -= len(old)

    def put(self, key: Hashable, listing: L) -> None:
        """Keep ``listing``, dropping the least recently used ones beyond the bound."""
        old = self._listings.pop(key, None)
        if old is not None:
            self.entries -= len(old)
        self._listings[key] = listing
        self.entries += len(listing)
        while self.entries > self._max_entries and len(self._listings) > 1:
            _, dropped = self._listings.popitem(last=False)
            self.entries -= len(dropped)
