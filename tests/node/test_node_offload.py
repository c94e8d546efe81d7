"""`run_in_thread`: `trio.to_thread.run_sync`'s rules (not cancellable) on a cheaper trip."""

from __future__ import annotations

import contextvars
import threading

import pytest
import trio
import trio.testing

from node._offload import run_in_thread

WHO = contextvars.ContextVar("WHO", default="nobody")


async def test_the_call_runs_in_another_thread_with_the_callers_context() -> None:
    WHO.set("caller")
    limiter = trio.CapacityLimiter(1)
    ident, who = await run_in_thread(lambda: (threading.get_ident(), WHO.get()),
                                     limiter=limiter)
    assert ident != threading.get_ident() and who == "caller"
    assert await run_in_thread(pow, 2, 10, limiter=limiter) == 1024
    with pytest.raises(ZeroDivisionError):
        await run_in_thread(lambda: 1 / 0, limiter=limiter)
    assert limiter.borrowed_tokens == 0


async def test_the_limiter_is_held_while_the_call_runs() -> None:
    limiter = trio.CapacityLimiter(1)
    token = trio.lowlevel.current_trio_token()
    running, release = trio.Event(), threading.Event()
    order: list[str] = []

    def first() -> None:
        trio.from_thread.run_sync(running.set, trio_token=token)
        release.wait(10)
        order.append("first")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: run_in_thread(first, limiter=limiter))
        with trio.fail_after(10):
            await running.wait()
        assert limiter.borrowed_tokens == 1
        nursery.start_soon(lambda: run_in_thread(order.append, "second", limiter=limiter))
        await trio.testing.wait_all_tasks_blocked()
        assert order == [] and limiter.statistics().tasks_waiting == 1  # waits for the token
        release.set()
    assert order == ["first", "second"]


async def test_cancelled_before_the_hand_over_nothing_runs() -> None:
    limiter = trio.CapacityLimiter(1)
    ran: list[str] = []
    await limiter.acquire()  # busy: the call waits for the limiter, and is cancelled there
    with trio.move_on_after(0.05) as scope:
        await run_in_thread(ran.append, "never", limiter=limiter)
    assert scope.cancelled_caught and ran == []
    limiter.release()


async def test_cancelled_after_the_hand_over_the_call_finishes_first() -> None:
    limiter = trio.CapacityLimiter(1)
    token = trio.lowlevel.current_trio_token()
    started, release = trio.Event(), threading.Event()
    ran: list[str] = []
    result: list[str] = []
    scopes: list[trio.CancelScope] = []

    def slow() -> str:
        trio.from_thread.run_sync(started.set, trio_token=token)
        release.wait(10)
        ran.append("finished")
        return "done"

    async def caller() -> None:
        with trio.CancelScope() as scope:
            scopes.append(scope)
            result.append(await run_in_thread(slow, limiter=limiter))
            await trio.lowlevel.checkpoint()  # the deferred cancellation lands here
            result.append("not reached")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(caller)
        with trio.fail_after(10):
            await started.wait()
        scopes[0].cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert ran == [] and result == []  # the caller still waits for its thread
        release.set()
    assert ran == ["finished"] and result == ["done"] and scopes[0].cancelled_caught
    assert limiter.borrowed_tokens == 0
