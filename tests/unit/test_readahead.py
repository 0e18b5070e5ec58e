"""ReadAhead: sequential readers get few large fetches, random readers get what they ask for."""

from __future__ import annotations

import trio
import trio.testing

from virtmount.fs.readahead import FIRST_WINDOW, ReadAhead

KIB = 1024
MAX_WINDOW = 4 * 1024 * KIB


class FakeFile:
    """A file of ``size`` bytes whose fetches are recorded."""

    def __init__(self, size: int) -> None:
        self.content = bytes(i % 251 for i in range(size))
        self.fetches: list[tuple[int, int]] = []

    async def fetch(self, offset: int, size: int) -> bytes:
        self.fetches.append((offset, size))
        await trio.sleep(0)
        return self.content[offset:offset + size]


async def test_sequential_reads_are_served_from_a_growing_window() -> None:
    file = FakeFile(16 * 1024 * KIB)
    reader = ReadAhead(file.fetch, MAX_WINDOW)
    data = b"".join([await reader.read(offset, 128 * KIB) for offset in range(0, len(file.content), 128 * KIB)])
    assert data == file.content
    assert [size for _, size in file.fetches][:4] == [FIRST_WINDOW, 2 * FIRST_WINDOW, 4 * FIRST_WINDOW, 8 * FIRST_WINDOW]
    assert all(size <= MAX_WINDOW for _, size in file.fetches)
    assert len(file.fetches) <= 8  # instead of 128 kernel-sized reads


async def test_random_reads_fetch_only_what_is_asked() -> None:
    file = FakeFile(8 * 1024 * KIB)
    reader = ReadAhead(file.fetch, MAX_WINDOW)
    await reader.read(0, 4 * KIB)  # a first read at 0 looks sequential
    file.fetches.clear()
    for offset in (5 * 1024 * KIB, 123 * KIB, 7 * 1024 * KIB + 17):
        assert await reader.read(offset, 4 * KIB) == file.content[offset:offset + 4 * KIB]
    assert file.fetches == [(5 * 1024 * KIB, 4 * KIB), (123 * KIB, 4 * KIB), (7 * 1024 * KIB + 17, 4 * KIB)]


async def test_end_of_file_gives_short_and_empty_reads() -> None:
    file = FakeFile(1000)
    reader = ReadAhead(file.fetch, MAX_WINDOW)
    assert await reader.read(0, 4096) == file.content
    assert await reader.read(1000, 4096) == b""
    assert await reader.read(900, 4096) == file.content[900:]
    assert len(file.fetches) == 1  # the short fetch marked the end of file


async def test_concurrent_sequential_requests_share_one_fetch() -> None:
    file = FakeFile(2 * 1024 * KIB)
    reader = ReadAhead(file.fetch, MAX_WINDOW)
    results: dict[int, bytes] = {}

    async def read(offset: int) -> None:
        results[offset] = await reader.read(offset, 128 * KIB)

    async with trio.open_nursery() as nursery:
        for offset in range(0, FIRST_WINDOW, 128 * KIB):
            nursery.start_soon(read, offset)
            await trio.sleep(0)
    assert all(results[offset] == file.content[offset:offset + 128 * KIB] for offset in results)
    assert len(file.fetches) == 1


async def test_with_a_nursery_the_next_window_is_fetched_before_it_is_asked_for() -> None:
    file = FakeFile(16 * 1024 * KIB)
    async with trio.open_nursery() as nursery:
        reader = ReadAhead(file.fetch, MAX_WINDOW, nursery)
        assert await reader.read(0, 128 * KIB) == file.content[:128 * KIB]
        await trio.testing.wait_all_tasks_blocked()
        assert file.fetches == [(0, FIRST_WINDOW), (FIRST_WINDOW, FIRST_WINDOW)]
        data = [file.content[:128 * KIB]]
        for offset in range(128 * KIB, len(file.content), 128 * KIB):
            data.append(await reader.read(offset, 128 * KIB))
        assert b"".join(data) == file.content
        await trio.testing.wait_all_tasks_blocked()
    starts = [offset for offset, _ in file.fetches]
    assert starts == sorted(set(starts))  # every byte fetched once, in order
    assert all(size <= MAX_WINDOW for _, size in file.fetches)
    assert file.fetches[-1][0] + file.fetches[-1][1] >= len(file.content)  # ends at end of file, not beyond


async def test_small_and_random_reads_fetch_nothing_ahead() -> None:
    file = FakeFile(8 * 1024 * KIB)
    async with trio.open_nursery() as nursery:
        small = FakeFile(1000)
        assert await ReadAhead(small.fetch, MAX_WINDOW, nursery).read(0, 4096) == small.content
        reader = ReadAhead(file.fetch, MAX_WINDOW, nursery)
        for offset in (5 * 1024 * KIB, 123 * KIB):
            await reader.read(offset, 4 * KIB)
        await trio.testing.wait_all_tasks_blocked()
    assert small.fetches == [(0, FIRST_WINDOW)]
    assert file.fetches == [(5 * 1024 * KIB, 4 * KIB), (123 * KIB, 4 * KIB)]


async def test_a_failed_fetch_ahead_is_done_again_by_the_reader() -> None:
    file = FakeFile(4 * 1024 * KIB)
    failures = [FIRST_WINDOW]

    async def flaky(offset: int, size: int) -> bytes:
        if offset in failures:
            failures.remove(offset)
            raise OSError("the daemon hiccuped")
        return await file.fetch(offset, size)

    async with trio.open_nursery() as nursery:
        reader = ReadAhead(flaky, MAX_WINDOW, nursery)
        data = b"".join([await reader.read(offset, 128 * KIB) for offset in range(0, len(file.content), 128 * KIB)])
    assert data == file.content


async def test_kernel_reads_straddling_two_windows_use_the_one_fetched_ahead() -> None:
    file = FakeFile(16 * 1024 * KIB)
    odd_window = MAX_WINDOW - 4 * KIB  # as the daemon's largest pread: not a multiple of 128 KiB
    async with trio.open_nursery() as nursery:
        reader = ReadAhead(file.fetch, odd_window, nursery)
        data = b"".join([await reader.read(offset, 128 * KIB) for offset in range(0, len(file.content), 128 * KIB)])
        await trio.testing.wait_all_tasks_blocked()
    assert data == file.content
    starts = [offset for offset, _ in file.fetches]
    assert starts == sorted(set(starts))  # nothing fetched twice
    assert sum(size for _, size in file.fetches) < len(file.content) + 2 * odd_window
