"""eta_guard.lazy: adapters load weights once, on first use, from any number of threads."""

from __future__ import annotations

import asyncio
import threading
import time

from eta_guard.lazy import Lazy


def test_factory_runs_once_across_threads():
    calls: list[int] = []

    def factory():
        calls.append(1)
        time.sleep(0.05)  # widen the race window
        return object()

    lazy = Lazy(factory)
    assert not lazy.loaded
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(lazy.get())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and lazy.loaded
    assert all(r is results[0] for r in results)


def test_aget_loads_off_the_event_loop_and_ready_never_calls_a_factory():
    loop_thread: list[int] = []
    lazy = Lazy(lambda: loop_thread.append(threading.get_ident()) or "value")

    async def main():
        return threading.get_ident(), await lazy.aget()

    ident, value = asyncio.run(main())
    assert value == "value" and loop_thread and loop_thread[0] != ident
    ready = Lazy.ready(42)
    assert ready.loaded and ready.get() == 42
