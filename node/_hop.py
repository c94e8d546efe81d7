"""The client side of one hop: a session on one peer for a contiguous range of stages.

Theory of operation: `RemoteHop.run` is a task in the client's nursery that opens the session
stream, performs the handshake (`OpenSession` -> `SessionOpened`), reports itself started, and
then just holds the session open until `aclose()`. Steps are sent from the caller's task
(`step()`), one at a time per hop, under a timeout set at the call site. Every failure of the
peer — a broken or dead stream, a timeout, a refusal — surfaces from `step()` as a
`HopFailedError` or `RefusedError` naming the peer, never as an exception inside the client's
nursery, so one bad hop can be replaced without disturbing the others.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import trio

from node._errors import HopFailedError, RefusedError
from node._protocol import PROTOCOL, OpenSession, Refusal, SessionOpened, Step, StepOutput
from node._tensors import hidden_from_wire, hidden_to_wire, ids_to_wire
from p2p import Host, P2PError, PeerId, SessionConfig, SessionStream, parse_peer_addr
from sharding import ShardingError

if TYPE_CHECKING:  # trio-typing's stubs (pulled in by libp2p) shadow trio's own annotations
    from trio_typing import TaskStatus


class RemoteHop:
    """One session on `peer` for stages `[start, end)`."""

    def __init__(self, host: Host, *, peer: PeerId, addrs: tuple[str, ...], start: int, end: int,
                 model_id: str, max_length: int, codec: str, session_id: bytes,
                 hidden_size: int, vocab_size: int, num_stages: int,
                 session_config: SessionConfig) -> None:
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
        self.session: SessionStream | None = None
        self.steps = 0
        # Every input this hop was sent, as (position, tensor): a replacement replays them.
        self.history: list[tuple[int, torch.Tensor]] = []
        self.compute_s = 0.0
        self._closed = trio.Event()
        self._lock = trio.Lock()

    @property
    def peer_id(self) -> str:
        return str(self.peer)

    def _failed(self, detail: str) -> HopFailedError:
        return HopFailedError(self.peer_id, detail)

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the session, report started, hold it until `aclose()`.

        Errors before `started` propagate to the `nursery.start` caller; after it, a failing
        peer is seen by the next `step()` and this task simply ends.
        """
        try:
            if self.addrs and not self.host.is_connected(self.peer):
                await self.host.connect_peer(self.peer, _transports(self.peer, self.addrs))
            async with self.host.open_session(self.peer, PROTOCOL,
                                              config=self.session_config) as session:
                await session.send(OpenSession(
                    session_id=self.session_id, model_id=self.model_id, start=self.start,
                    end=self.end, max_length=self.max_length, codec=self.codec))
                reply = await session.receive()
                if isinstance(reply, Refusal):
                    raise RefusedError(reply.code, reply.detail, retryable=reply.retryable)
                if not isinstance(reply, SessionOpened) or reply.session_id != self.session_id:
                    raise self._failed(f"unexpected reply {reply.wire_name} to OpenSession")
                self.session = session
                task_status.started()
                await self._closed.wait()
        except P2PError as exc:
            if self.session is None:
                raise self._failed(str(exc)) from exc
        finally:
            self.session = None

    async def step(self, position: int, x: torch.Tensor, *, rollback: bool = False,
                   last_only: bool = False) -> torch.Tensor:
        """Send one step and wait for its output (the caller sets the timeout)."""
        session = self.session
        if session is None:
            raise self._failed("session is closed")
        payload = ids_to_wire(x) if self.start == 0 else hidden_to_wire(x, self.codec)
        msg = Step(step=self.steps, position=position, input=payload, rollback=rollback,
                   last_only=last_only)
        async with self._lock:
            try:
                await session.send(msg)
                reply = await session.receive()
            except P2PError as exc:
                raise self._failed(str(exc)) from exc
        if isinstance(reply, Refusal):
            raise RefusedError(reply.code, reply.detail, retryable=reply.retryable)
        if not isinstance(reply, StepOutput) or reply.step != msg.step:
            raise self._failed(f"unexpected reply {reply.wire_name} to step {msg.step}")
        self.steps += 1
        if math.isfinite(reply.compute_s):
            self.compute_s += reply.compute_s
        width = self.vocab_size if self.returns_logits else self.hidden_size
        try:
            out = hidden_from_wire(reply.output, max_elements=max(1, x.shape[1]) * width)
        except ShardingError as exc:
            raise self._failed(f"bad output: {exc}") from exc
        expected_t = 1 if last_only and self.returns_logits else x.shape[1]
        if out.dim() != 3 or out.shape[0] != 1 or out.shape[1] != expected_t \
                or out.shape[2] != width:
            raise self._failed(f"output of shape {list(out.shape)}, expected "
                               f"[1, {expected_t}, {width}]")
        return out

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
