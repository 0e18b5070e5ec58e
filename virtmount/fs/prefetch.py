"""Speculative fetching: do daemon work before the kernel asks, within a bound.

The appliance's daemon answers one call at a time and each call costs a
round trip plus milliseconds of emulated CPU. A tree walker (find, ls -R,
rsync, a backup tool) asks for one directory or one file at a time and waits
for each answer, so the daemon idles between its calls. A ``Prefetcher``
keeps a few calls in flight ahead of the walker instead: the model tells it
what the walker is likely to want next (the subdirectories of the directory
just listed, the sibling files of files being read), it fetches those in the
background, newest wishes first (a walker goes depth first), and hands the
results over when the walker gets there.

Bounds: at most ``concurrency`` fetches in flight; fetched-but-unclaimed
results plus fetches in flight cost at most ``budget`` (entries, or bytes);
unclaimed results are dropped after ``keep_seconds``; at most ``max_queued``
wishes are remembered (the oldest are forgotten). A failed fetch is simply
forgotten: the walker's own request then runs normally and reports the error.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Generic, Hashable, Iterable, TypeVar

import trio

log = logging.getLogger(__name__)

V = TypeVar("V")

Job = Callable[[], Awaitable[V]]


@dataclass(eq=False)
class _Wish(Generic[V]):
    key: Hashable
    job: Job[V]
    cost: int


@dataclass
class _Result(Generic[V]):
    value: V
    cost: int
    fetched_at: float


class Prefetcher(Generic[V]):
    """Background fetches of keyed values, claimed at most once each."""

    def __init__(
        self,
        nursery: trio.Nursery,
        *,
        concurrency: int,
        budget: int,
        keep_seconds: float = 30.0,
        max_queued: int = 10_000,
        name: str = "prefetch",
    ) -> None:
        self._nursery = nursery
        self._concurrency = concurrency
        self._budget = budget
        self._keep_seconds = keep_seconds
        self._max_queued = max_queued
        self._name = name
        self._queue: collections.deque[_Wish[V]] = collections.deque()
        self._queued: dict[Hashable, _Wish[V]] = {}
        self._in_flight: dict[Hashable, trio.Event] = {}  # key -> set once its fetch ended
        self._results: collections.OrderedDict[Hashable, _Result[V]] = collections.OrderedDict()
        self._workers = 0
        self._spent = 0  # cost of fetches in flight plus unclaimed results
        self.hits = 0
        self.fetched = 0

    def want(self, wishes: Iterable[tuple[Hashable, Job[V], int]]) -> None:
        """Fetch these (key, job, cost) soon, before anything wished earlier, in the order given."""
        fresh = [_Wish(key, job, cost) for key, job, cost in wishes if self._is_new(key)]
        for wish in reversed(fresh):
            old = self._queued.pop(wish.key, None)
            if old is not None:
                self._queue.remove(old)
            self._queue.appendleft(wish)
            self._queued[wish.key] = wish
        while len(self._queue) > self._max_queued:
            del self._queued[self._queue.pop().key]
        self._pump()

    def _is_new(self, key: Hashable) -> bool:
        return key not in self._in_flight and key not in self._results

    def wished(self, key: Hashable) -> bool:
        """Whether ``key`` is wished for, being fetched or fetched and not claimed yet."""
        return key in self._queued or key in self._in_flight or key in self._results

    async def claim(self, key: Hashable) -> V | None:
        """The value fetched for ``key`` (waiting for a fetch in flight), or None: fetch it yourself."""
        wish = self._queued.pop(key, None)
        if wish is not None:  # not started: the caller will fetch it now anyway
            self._queue.remove(wish)
            return None
        done = self._in_flight.get(key)
        if done is not None:
            await done.wait()
        result = self._results.pop(key, None)
        if result is None:
            return None
        self._spent -= result.cost
        self.hits += 1
        self._pump()
        return result.value

    def _drop_stale_results(self) -> None:
        limit = time.monotonic() - self._keep_seconds
        while self._results:
            key, oldest = next(iter(self._results.items()))
            if oldest.fetched_at > limit:
                break
            del self._results[key]
            self._spent -= oldest.cost

    def _pump(self) -> None:
        self._drop_stale_results()
        while self._workers < self._concurrency and self._next_fits():
            self._workers += 1
            self._nursery.start_soon(self._work)

    def _next_fits(self) -> bool:
        if not self._queue:
            return False
        cost = self._queue[0].cost
        # something too big for the budget still goes when nothing else is held
        return self._spent + cost <= self._budget or self._spent == 0

    async def _work(self) -> None:
        try:
            while self._next_fits():
                wish = self._queue.popleft()
                del self._queued[wish.key]
                await self._fetch(wish)
        finally:
            self._workers -= 1

    async def _fetch(self, wish: _Wish[V]) -> None:
        done = trio.Event()
        self._in_flight[wish.key] = done
        self._spent += wish.cost
        try:
            value = await wish.job()
        except Exception as exc:  # forgotten: the walker's own request reports it
            log.debug("%s of %r failed: %r", self._name, wish.key, exc)
            self._spent -= wish.cost
        else:
            self.fetched += 1
            self._results[wish.key] = _Result(value, wish.cost, time.monotonic())
        finally:
            del self._in_flight[wish.key]
            done.set()
