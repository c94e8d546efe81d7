"""The client's shared head: concurrent generations' head steps run as one forward."""

from __future__ import annotations

import torch
import trio
import trio.testing

from node._local import SharedHead
from sharding import EMBEDDED_MODEL, Checkpoint, Span


def _head() -> tuple[Span, int]:
    ckpt = Checkpoint.open(EMBEDDED_MODEL)
    n = ckpt.config.num_stages
    return Span.load(ckpt, n - 1, n), ckpt.config.hidden_size


async def test_concurrent_head_steps_share_a_forward_and_get_their_own_rows() -> None:
    span, hidden = _head()
    head = SharedHead(span)
    head.users = 4
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(1, 1, hidden, generator=g) for _ in range(4)]
    with torch.inference_mode():
        alone = [span(x) for x in xs]
    got: dict[int, torch.Tensor] = {}

    async def one(i: int) -> None:
        got[i] = await head.step(0, xs[i], last_only=True)

    async with trio.open_nursery() as nursery:
        for i in range(4):
            nursery.start_soon(one, i)
    assert head.forwards == 1
    for i in range(4):
        assert got[i].shape == (1, 1, span.config.vocab_size)
        assert torch.allclose(got[i], alone[i], rtol=0, atol=1e-5)
        assert int(got[i].argmax()) == int(alone[i].argmax())


async def test_a_late_generation_joins_after_a_bounded_wait(
        autojump_clock: trio.testing.MockClock) -> None:
    span, hidden = _head()
    head = SharedHead(span)
    head.users = 2
    x = torch.zeros(1, 1, hidden)
    await head.step(0, x, last_only=True)  # measures a forward
    assert head.forwards == 1

    async def late() -> None:
        await trio.sleep(1e-4)
        await head.step(0, x, last_only=True)

    async def first() -> None:
        await head.step(0, x, last_only=True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(first)
        nursery.start_soon(late)
    assert head.forwards == 2  # one forward for both
    t0 = trio.current_time()
    await head.step(0, x, last_only=True)  # the other generation never comes: bounded
    assert head.forwards == 3
    assert trio.current_time() - t0 <= head.policy.max_gather_s


async def test_a_cancelled_head_step_leaves_the_queue_clean() -> None:
    span, hidden = _head()
    head = SharedHead(span)
    with trio.CancelScope() as scope:
        scope.cancel()
        await head.step(0, torch.zeros(1, 1, hidden), last_only=True)
    assert head.forwards == 0 and not head._queue  # noqa: SLF001 - the invariant under test
    out = await head.step(0, torch.zeros(1, 1, hidden), last_only=True)
    assert out.shape == (1, 1, span.config.vocab_size)
