"""A nursery for service lifetimes that does not wrap the body's own exception.

With trio's strict exception groups, an exception raised in the body of
``async with trio.open_nursery()`` comes out wrapped in an ExceptionGroup, so a caller
writing ``except StreamClosedError`` around ``async with host.open_session(...)`` would
never catch it. :func:`service_nursery` runs background tasks for the duration of a
block, cancels them when the block ends, and re-raises the block's exception as
itself. Failures of the background tasks still propagate (grouped), as they should.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

__all__ = ["service_nursery"]


@asynccontextmanager
async def service_nursery() -> AsyncIterator[trio.Nursery]:
    """Yield a nursery whose tasks are cancelled when the block exits."""
    body_error: Exception | None = None
    async with trio.open_nursery() as nursery:
        try:
            yield nursery
        except Exception as exc:  # noqa: BLE001 - not handled: re-raised below, unwrapped
            body_error = exc
        finally:
            nursery.cancel_scope.cancel()
    if body_error is not None:
        raise body_error
