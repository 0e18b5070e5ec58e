"""Prefetcher (virtmount.fs.prefetch) and ListingCache (virtmount.fs.listings) with fake jobs."""

from __future__ import annotations

from typing import Awaitable, Callable

import trio
import trio.testing

from virtmount.fs.listings import ListingCache
from virtmount.fs.prefetch import Prefetcher


class Jobs:
    """Jobs that record when they start and finish only when released (or at once)."""

    def __init__(self, *, hold: bool = False) -> None:
        self.started: list[str] = []
        self.running = 0
        self.most_running = 0
        self._hold = hold
        self.gate = trio.Event()

    def job(self, key: str, fail: bool = False) -> Callable[[], Awaitable[str]]:
        async def run() -> str:
            self.started.append(key)
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            try:
                if self._hold:
                    await self.gate.wait()
                await trio.sleep(0)
                if fail:
                    raise OSError("no such thing")
                return f"value of {key}"
            finally:
                self.running -= 1
        return run


async def test_claim_gives_the_fetched_value_once() -> None:
    jobs = Jobs()
    async with trio.open_nursery() as nursery:
        ahead: Prefetcher[str] = Prefetcher(nursery, concurrency=2, budget=10)
        ahead.want([("a", jobs.job("a"), 1)])
        await trio.testing.wait_all_tasks_blocked()
        assert await ahead.claim("a") == "value of a"
        assert await ahead.claim("a") is None
        assert (ahead.fetched, ahead.hits) == (1, 1)


async def test_claim_waits_for_a_fetch_in_flight() -> None:
    jobs = Jobs(hold=True)
    async with trio.open_nursery() as nursery:
        ahead: Prefetcher[str] = Prefetcher(nursery, concurrency=1, budget=10)
        ahead.want([("a", jobs.job("a"), 1)])
        await trio.testing.wait_all_tasks_blocked()
        assert jobs.started == ["a"]
        nursery.start_soon(lambda: _release_later(jobs))
        assert await ahead.claim("a") == "value of a"


async def _release_later(jobs: Jobs) -> None:
    await trio.sleep(0.01)
    jobs.gate.set()


async def test_claim_of_a_wish_not_started_takes_it_back() -> None:
    jobs = Jobs(hold=True)
    async with trio.open_nursery() as nursery:
        ahead: Prefetcher[str] = Prefetcher(nursery, concurrency=1, budget=10)
        ahead.want([("a", jobs.job("a"), 1), ("b", jobs.job("b"), 1)])
        await trio.testing.wait_all_tasks_blocked()
        assert await ahead.claim("b") is None  # the caller fetches b itself
        jobs.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert jobs.started == ["a"]


async def test_newest_wishes_go_first_in_their_own_order() -> None:
    jobs = Jobs(hold=True)
    async with trio.open_nursery() as nursery:
        ahead: Prefetcher[str] = Prefetcher(nursery, concurrency=1, budget=100)
        ahead.want([("a", jobs.job("a"), 1), ("b", jobs.job("b"), 1)])
        await trio.testing.wait_all_tasks_blocked()  # "a" runs, "b" waits
        ahead.want([("c", jobs.job("c"), 1), ("d", jobs.job("d"), 1)])
        ahead.want([("b", jobs.job("b"), 1)])  # wished again: moves to the front
        await trio.testing.wait_all_tasks_blocked()
        jobs.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert jobs.started == ["a", "b", "c", "d"]


async def test_concurrency_and_budget_bound_the_work_ahead() -> None:
    jobs = Jobs()
    async with trio.open_nursery() as nursery:
        ahead: Prefetcher[str] = Prefetcher(nursery, concurrency=2, budget=5)
        ahead.want([(str(i), jobs.job(str(i)), 2) for i in range(10)])
        await trio.testing.wait_all_tasks_blocked()
        assert jobs.most_running <= 2
        assert jobs.started == ["0", "1"]  # 2 + 2 held; a third (2) would exceed 5
        assert await ahead.claim("0") == "value of 0"
        await trio.testing.wait_all_tasks_blocked()
        assert jobs.started == ["0", "1", "2"]


async def test_an_item_larger_than_the_budget_goes_alone() -> None:
    jobs = Jobs()
    async with trio.open_nursery() as nursery:
        ahead: Prefetcher[str] = Prefetcher(nursery, concurrency=2, budget=5)
        ahead.want([("huge", jobs.job("huge"), 50), ("small", jobs.job("small"), 1)])
        await trio.testing.wait_all_tasks_blocked()
        assert jobs.started == ["huge"]
        assert await ahead.claim("huge") == "value of huge"
        await trio.testing.wait_all_tasks_blocked()
        assert jobs.started == ["huge", "small"]


async def test_a_failed_fetch_is_forgotten() -> None:
    jobs = Jobs()
    async with trio.open_nursery() as nursery:
        ahead: Prefetcher[str] = Prefetcher(nursery, concurrency=1, budget=1)
        ahead.want([("bad", jobs.job("bad", fail=True), 1), ("good", jobs.job("good"), 1)])
        await trio.testing.wait_all_tasks_blocked()
        assert await ahead.claim("bad") is None
        assert await ahead.claim("good") == "value of good"  # the failure freed its budget


async def test_unclaimed_results_expire_and_free_the_budget() -> None:
    jobs = Jobs()
    async with trio.open_nursery() as nursery:
        ahead: Prefetcher[str] = Prefetcher(nursery, concurrency=1, budget=1, keep_seconds=0.0)
        ahead.want([("a", jobs.job("a"), 1)])
        await trio.testing.wait_all_tasks_blocked()
        ahead.want([("b", jobs.job("b"), 1)])  # "a" is dropped, so "b" fits
        await trio.testing.wait_all_tasks_blocked()
        assert jobs.started == ["a", "b"]
        assert await ahead.claim("a") is None


async def test_the_queue_forgets_its_oldest_wishes() -> None:
    jobs = Jobs(hold=True)
    async with trio.open_nursery() as nursery:
        ahead: Prefetcher[str] = Prefetcher(nursery, concurrency=1, budget=100, max_queued=2)
        ahead.want([("old", jobs.job("old"), 1)])
        await trio.testing.wait_all_tasks_blocked()  # "old" started
        ahead.want([("x", jobs.job("x"), 1)])
        ahead.want([("y", jobs.job("y"), 1)])
        ahead.want([("z", jobs.job("z"), 1)])
        jobs.gate.set()
        await trio.testing.wait_all_tasks_blocked()
        assert jobs.started == ["old", "z", "y"]


def test_listing_cache_drops_least_recently_used_beyond_its_entries() -> None:
    cache: ListingCache[list[int]] = ListingCache(max_entries=5)
    cache.put("a", [1, 2])
    cache.put("b", [1, 2])
    assert cache.get("a") == [1, 2]  # a is now the most recent
    cache.put("c", [1, 2])  # 6 entries: b goes
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.entries == 4
    cache.put("a", [1])  # replaced, not added
    assert cache.entries == 3
    cache.put("huge", list(range(50)))  # alone beyond the bound: kept, the others go
    assert len(cache) == 1 and cache.entries == 50
