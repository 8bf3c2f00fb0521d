"""Bounded concurrency for the entry points that answer many requests (``ETA.abatch``, eval).

Why bounded: every request in flight holds its images, its KV cache and (locally) a place in the
model's batch, so "all at once" on a list of thousands is a memory bug. One validator and one
gather keep the bound and its error message the same everywhere.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from eta_guard.errors import InvalidInputError

T = TypeVar("T")

#: Requests in flight at once when the caller does not say: enough for a local step batcher or an
#: engine to batch, small enough that a long list cannot hold every request's memory at once.
DEFAULT_MAX_CONCURRENCY = 8
#: The largest bound accepted (a typo such as 10**6 is refused rather than obeyed).
MAX_CONCURRENCY_LIMIT = 1024


def check_concurrency(value: object, name: str = "max_concurrency") -> int:
    """``value`` as a concurrency bound (an int in [1, 1024]), or an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(
            f"{name} must be an integer from 1 to {MAX_CONCURRENCY_LIMIT}, got {value!r}"
        )
    if not 1 <= value <= MAX_CONCURRENCY_LIMIT:
        raise InvalidInputError(
            f"{name}={value} is out of range: use 1 (one at a time) to {MAX_CONCURRENCY_LIMIT}"
        )
    return value


async def gather_bounded(
    calls: Sequence[Callable[[], Awaitable[T]]], max_concurrency: int
) -> list[T]:
    """Run ``calls`` with at most ``max_concurrency`` awaiting at once; results in input order.

    A call starts only when a slot is free (a call not yet started holds nothing). The first
    failure cancels every other call (started or not), waits for them to stop, and is raised:
    no work keeps running behind a caller that already has its error.
    """
    limit = check_concurrency(max_concurrency)
    slots = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with slots:
            return await call()

    tasks = [asyncio.ensure_future(one(call)) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()  # a no-op on finished tasks; stops the rest after a failure
        await asyncio.gather(*tasks, return_exceptions=True)
