"""Trying again while the server is away for a while (a NATS restart, a leaf
node's link cut, a stream electing its leader)."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Tuple, Type, TypeVar

log = logging.getLogger("flame_sdk")
T = TypeVar("T")


async def retrying(
    what: str,
    attempt: Callable[[], Awaitable[T]],
    limit: float,
    permanent: Tuple[Type[BaseException], ...] = (),
) -> T:
    """Runs ``attempt`` until it succeeds, raises one of ``permanent``, or
    ``limit`` seconds have passed, backing off from 0.2 s to 5 s."""
    loop = asyncio.get_running_loop()
    deadline, pause = loop.time() + limit, 0.2
    while True:
        try:
            return await attempt()
        except permanent:
            raise
        except Exception as e:
            if loop.time() + pause >= deadline:
                raise
            log.warning("%s: %s; trying again in %.1f s", what, e, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 5.0)
