"""The client side of one hop: a session on one peer for a contiguous range of stages.

Theory of operation: `RemoteHop.run` is a task in the client's nursery that opens the session
stream, sends `OpenSession`, reports itself started, and then reads the hop's replies until
`aclose()`, when it sends `CloseSession` and waits (bounded) for `SessionClosed`: `done` is set
once the server has freed the session, or once the stream is gone. It does not wait for
`SessionOpened`: the first step goes right behind the open, so opening a route costs no round
trip of its own, and the server's answer (`SessionOpened`, or a refusal, which becomes a
`SessionRefusedError`) is simply the first reply read.

Every reply — a `StepOutput`, a `Refusal`, or the error that ended the stream — goes, tagged
with the hop, into one channel shared by all hops of a pipeline. The pipeline is the single
consumer: with push, the first hop forwards each step down the chain by itself and the replies
of every hop arrive on their own streams, in whatever order; one channel lets the pipeline wait
for "all of them, or the first failure" without a task per hop per token. Nothing a peer does
raises inside the client's nursery: a dead peer is an `HopEvent` carrying the error, so one bad
hop can be replaced without disturbing the others.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import trio

from node._errors import HopFailedError, RefusedError, SessionRefusedError
from node._protocol import (
    PROTOCOL,
    CloseSession,
    OpenSession,
    Refusal,
    SessionClosed,
    SessionOpened,
    Step,
    StepOutput,
)
from node._tensors import check_hidden_wire, hidden_from_wire
from p2p import (
    Host,
    Lease,
    Message,
    P2PError,
    PeerId,
    SessionConfig,
    SessionPool,
    SessionStream,
    Tensor,
    parse_peer_addr,
)
from sharding import ShardingError

if TYPE_CHECKING:  # trio-typing's stubs (pulled in by libp2p) shadow trio's own annotations
    from trio_typing import TaskStatus


CLOSE_TIMEOUT_S = 2.0  # for the server's `SessionClosed` (a dead one is simply left behind)


@dataclass(frozen=True, slots=True)
class HopEvent:
    """A reply of `hop` (`StepOutput` or `Refusal`), or the error that ended its session."""

    hop: RemoteHop
    reply: StepOutput | Refusal | None = None
    error: HopFailedError | None = None


@dataclass(frozen=True, slots=True)
class Kept:
    """One input a hop was sent, kept so a replacement can replay it exactly."""

    step: int
    position: int
    input: Tensor


class RemoteHop:
    """One session on `peer` for stages `[start, end)`.

    `successor` (the next hop's address and session id) and `predecessor` (the previous hop's
    peer id) are set when the route uses push.
    """

    def __init__(self, host: Host, *, peer: PeerId, addrs: tuple[str, ...], start: int, end: int,
                 model_id: str, max_length: int, codec: str, session_id: bytes,
                 hidden_size: int, vocab_size: int, num_stages: int,
                 session_config: SessionConfig,
                 events: trio.MemorySendChannel[HopEvent],
                 pool: SessionPool | None = None,
                 successor: tuple[tuple[str, ...], bytes] | None = None,
                 predecessor: str = "") -> None:
        self.host = host
        self.peer = peer
        self.addrs = addrs
        self.start, self.end = start, end
        self.model_id = model_id
        self.max_length = max_length
        self.codec = codec
        self.session_id = session_id
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.returns_logits = end == num_stages
        self.session_config = session_config
        self.pool = pool
        self.successor = successor
        self.predecessor = predecessor
        # The server pushes to the successor: assumed from the open on, until `SessionOpened`
        # says otherwise; each step's `pushed` says whether that step went through.
        self.pushing = False
        self.session: SessionStream | None = None
        self.history: list[Kept] = []
        self.failed: HopFailedError | None = None
        self._events = events
        self._closed = trio.Event()
        self.done = trio.Event()  # `run` is over: the session stream is closed
        self._acked = trio.Event()  # the server answered `CloseSession`

    @property
    def peer_id(self) -> str:
        return str(self.peer)

    def failure(self, detail: str) -> HopFailedError:
        return HopFailedError(self.peer_id, detail)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the session, report started, then deliver replies until `aclose()`.

        Errors before `started` (dialling, opening the stream) propagate to the
        `nursery.start` caller; after it, a failing or refusing peer becomes a `HopEvent` with
        the error and this task simply ends.
        """
        succ_addrs, succ_session = self.successor or ((), b"")
        try:
            if self.addrs and not self.host.is_connected(self.peer):
                await self.host.connect_peer(self.peer, _transports(self.peer, self.addrs))
            async with self._stream() as lease:
                session = lease.session
                await session.send(OpenSession(
                    session_id=self.session_id, model_id=self.model_id, start=self.start,
                    end=self.end, max_length=self.max_length, codec=self.codec,
                    successor=succ_addrs, successor_session=succ_session,
                    predecessor=self.predecessor))
                self.pushing = self.successor is not None
                self.session = session
                task_status.started()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._read, session, nursery.cancel_scope)
                    await self._closed.wait()
                    if self.failed is None:
                        await self._close_session(session)
                    nursery.cancel_scope.cancel()
                lease.reusable = self._acked.is_set()  # nothing of this session in flight
        except P2PError as exc:
            if self.session is None:
                raise self.failure(str(exc)) from exc
            self._report(self.failure(str(exc)))
        finally:
            self.session = None
            self.done.set()

    @asynccontextmanager
    async def _stream(self) -> AsyncIterator[Lease]:
        """A session stream to the peer: a kept one from the pool when there is one."""
        if self.pool is not None:
            async with self.pool.lease(self.peer) as lease:
                yield lease
            return
        async with self.host.open_session(self.peer, PROTOCOL,
                                          config=self.session_config) as session:
            yield Lease(session, reused=False)

    async def _close_session(self, session: SessionStream) -> None:
        """Ask the server to free the session and wait (bounded) until it says it has: the
        generation then ends with its sessions gone, not tearing down into the next one."""
        with trio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                await session.send(CloseSession(session_id=self.session_id))
            except P2PError:
                return
            await self._acked.wait()

    async def _read(self, session: SessionStream, scope: trio.CancelScope) -> None:
        try:
            self._opened(await session.receive())
            while True:
                reply = await session.receive()
                if isinstance(reply, SessionClosed) and reply.session_id == self.session_id:
                    self._acked.set()
                    return
                if self._closed.is_set():
                    continue  # the generation is over: late replies have no reader
                if isinstance(reply, StepOutput | Refusal):
                    self._events.send_nowait(HopEvent(self, reply=reply))
                else:
                    raise self.failure(f"unexpected {reply.wire_name} in a session")
        except P2PError as exc:
            self._report(self.failure(str(exc)))
        except HopFailedError as exc:
            self._report(exc)
        scope.cancel()

    def _opened(self, reply: Message) -> None:
        """Check the server's answer to `OpenSession` (its first reply)."""
        if isinstance(reply, Refusal):
            raise SessionRefusedError(self.peer_id, RefusedError(
                reply.code, reply.detail, retryable=reply.retryable))
        if not isinstance(reply, SessionOpened) or reply.session_id != self.session_id:
            raise self.failure(f"unexpected reply {reply.wire_name} to OpenSession")
        self.pushing = reply.pushing

    def _report(self, error: HopFailedError) -> None:
        if self.failed is None and not self._closed.is_set():
            self.failed = error
            with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                self._events.send_nowait(HopEvent(self, error=error))

    async def send(self, step: int, position: int, payload: Tensor, *, rollback: bool = False,
                   last_only: bool = False, push: bool = False) -> None:
        """Send one step (its reply arrives as a `HopEvent`)."""
        session = self.session
        if session is None or self.failed is not None:
            raise self.failed or self.failure("session is closed")
        msg = Step(step=step, position=position, input=payload, rollback=rollback,
                   last_only=last_only, push=push)
        try:
            await session.send(msg)
        except P2PError as exc:
            raise self.failure(str(exc)) from exc

    def check_output(self, output: Tensor, tokens: int, last_only: bool) -> torch.Tensor:
        """Decode and check an output of this hop (which may have come with another hop's
        answer); `HopFailedError` blames this hop if it is bad. `last_only`: one row is
        expected, for a step sent with `last_only` to a head or to a hop with no successor."""
        width = self._check_shape(output, tokens, last_only)
        try:
            return hidden_from_wire(output, max_elements=max(1, tokens) * width)
        except ShardingError as exc:
            raise self.failure(f"bad output: {exc}") from exc

    def check_kept(self, output: Tensor, tokens: int, last_only: bool) -> None:
        """`check_output` for an output the client only keeps (the next hop's input): every
        check, without decoding it where the codec allows."""
        width = self._check_shape(output, tokens, last_only)
        try:
            check_hidden_wire(output, max_elements=max(1, tokens) * width)
        except ShardingError as exc:
            raise self.failure(f"bad output: {exc}") from exc

    def _check_shape(self, output: Tensor, tokens: int, last_only: bool) -> int:
        width = self.vocab_size if self.returns_logits else self.hidden_size
        expected = [1, 1 if last_only else tokens, width]
        if list(output.shape) != expected:
            raise self.failure(f"output of shape {list(output.shape)}, expected {expected}")
        return width

    def aclose(self) -> None:
        """Let `run` leave its session (a clean goodbye to the server)."""
        self._closed.set()


def _transports(peer: PeerId, addrs: tuple[str, ...]) -> list[str]:
    """Transport parts of announced `/.../p2p/<id>` addresses that name `peer`."""
    out = []
    for addr in addrs:
        try:
            named, transport = parse_peer_addr(addr)
        except P2PError:
            continue
        if named == peer:
            out.append(transport)
    return out
