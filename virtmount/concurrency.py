"""Running a few awaitables at once and getting their results in order, or the first real failure.

trio groups the errors of a nursery's tasks; concurrent daemon calls usually
fail for one reason (an errno, a lost connection), so callers want that one.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import trio


def first_failure(group: BaseExceptionGroup) -> BaseException:
    """The first error in ``group`` that is not a cancellation; the group itself if there is none."""
    matched, _ = group.split(lambda exc: not isinstance(exc, (BaseExceptionGroup, trio.Cancelled)))
    if matched is None:
        return group
    first: BaseException = matched
    while isinstance(first, BaseExceptionGroup):
        first = first.exceptions[0]
    return first


async def gather(*calls: Callable[[], Awaitable[Any]]) -> list[Any]:
    """Run ``calls`` concurrently; their results in order, or the first failure raised as itself."""
    results: list[Any] = [None] * len(calls)

    async def run(index: int) -> None:
        results[index] = await calls[index]()

    if len(calls) == 1:
        await run(0)
        return results
    try:
        async with trio.open_nursery() as nursery:
            for index in range(len(calls)):
                nursery.start_soon(run, index)
    except BaseExceptionGroup as group:
        raise first_failure(group) from None
    return results
