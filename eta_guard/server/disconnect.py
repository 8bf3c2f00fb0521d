"""Notice a client that went away while its non-streaming answer is being generated.

A task waits on the ASGI ``receive`` channel (the body has been read by then, so the next message
is ``http.disconnect``) and cancels the job the moment it arrives: the engine stops at its next
token, however fast tokens come (polling between tokens only noticed after a silent pause).
"""

from __future__ import annotations

import asyncio

from fastapi import Request

from eta_guard.server.scheduler import Job


def watch_disconnect(request: Request, job: Job) -> asyncio.Task[None]:
    """Start a task that cancels ``job`` ("client_gone") when the client disconnects.

    The caller cancels the task once it has its answer; ``task.done()`` tells whether the client
    left.
    """

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel("client_gone")
                return

    return asyncio.create_task(watch())
