"""The inference service (`/shardnet/inference/1`): client sessions and push streams.

The p2p layer gives each inbound stream a `SessionStream` (framing, heartbeats, flow control);
this handler speaks the inference protocol on it. A stream starts with either

* `OpenSession` from a client: the session's KV cache lives at most as long as this stream.
  Whatever ends it — the client's `CloseSession` (answered with `SessionClosed` once the cache
  is freed), the stream's close, a dead or frozen client declared dead by heartbeats, a
  protocol violation, the node shutting down — the `finally` frees it. The node answers
  `SessionOpened` at once; a client does not wait for it either, and sends its first step
  right behind `OpenSession` (opening a route costs no round trip of its own). When the
  client names a successor, a task opens the push stream to it meanwhile, writing `PushOpen`
  without waiting for the answer: a step's output waits only for that write. Should the
  successor refuse, the stream is dropped and later steps say `pushed=False`; the client
  sees the successor's own failure and replaces it; or
* `PushOpen` from the previous hop of a session opened here (or about to be: a client opens
  its hops at once, so this waits a moment for the session), accepted only from the peer the
  client named as predecessor: its steps are computed exactly like the client's own.

Each step's output goes to the client, and, when the step asks for push, first to the
successor: the forward is on the critical path, the client's copy is for failover. A small
output rides along the chain instead and reaches the client with the last hop's answer (one
message per token rather than one per hop: on two vCPUs, each message the client reads is
compute the next hop does not get); a large one goes back at once (`_process`). A
per-session lock keeps the two sources of steps (client stream, push stream) in order. A
refused request is answered with a typed `Refusal` naming the step, and the stream stays
usable, so one bad step costs the client one round trip, never the node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from node._errors import RefusedError
from node._protocol import (
    PROTOCOL,
    CloseSession,
    OpenSession,
    PushOpen,
    Refusal,
    SessionClosed,
    SessionOpened,
    Step,
)
from node._worker import SpanWorker, WorkerSession
from p2p import (
    Host,
    Message,
    P2PError,
    PeerId,
    SessionPool,
    SessionStream,
    StreamClosedError,
    Tensor,
    parse_peer_addr,
)

logger = logging.getLogger(__name__)

PUSH_OPEN_TIMEOUT_S = 5.0
# How long a stream may wait for its next session: longer than a client keeps it idle
# (`p2p.SessionPool`), so a live node never ends a stream a client is about to use again.
IDLE_S = 30.0
# How long the end of a push stream's use may take (the successor answers `CloseSession`).
PUSH_CLOSE_TIMEOUT_S = 2.0
# Outputs up to this size ride along the push chain to the client (a decode step's rows);
# larger ones (a prompt chunk's) go back as copies from each hop, beside the next compute.
CARRY_BYTES = 1 << 16


@dataclass(slots=True)
class _Served:
    """A client session open on this node, reachable by its predecessor's push stream."""

    ws: WorkerSession
    client: SessionStream
    predecessor: str
    lock: trio.Lock = field(default_factory=trio.Lock)
    push: SessionStream | None = None
    push_ready: trio.Event = field(default_factory=trio.Event)  # the push stream's open is over
    ending: trio.Event = field(default_factory=trio.Event)  # closed by the client: end the push
    attached: bool = False
    closed: bool = False


@dataclass(slots=True)
class _Table:
    """The open sessions of one worker by id, and an event set whenever one opens."""

    sessions: dict[bytes, _Served] = field(default_factory=dict)
    opened: trio.Event = field(default_factory=trio.Event)

    def add(self, session_id: bytes, served: _Served) -> None:
        self.sessions[session_id] = served
        self.opened.set()
        self.opened = trio.Event()


# The push handler looks sessions up here.
_SERVED: weakref.WeakKeyDictionary[SpanWorker, _Table] = weakref.WeakKeyDictionary()


def _refusal(exc: RefusedError, step: int = -1) -> Refusal:
    return Refusal(code=exc.code[:32], detail=exc.detail[:512], retryable=exc.retryable,
                   step=step)


async def serve_inference(workers: Callable[[], SpanWorker | None], session: SessionStream, *,
                          host: Host | None = None, pushes: SessionPool | None = None,
                          idle_s: float = IDLE_S) -> None:
    """Serve one inbound stream until it ends; never raises on bad input.

    A stream carries one session or push stream after another as long as each ends cleanly
    (`CloseSession` answered): clients and predecessors keep streams for their next use
    (`p2p.SessionPool`), sparing both ends a stream's open and teardown. Each one is served
    by the worker of the moment (`workers()`; None while the node moves to another span), and
    the stream ends after `idle_s` without one. Without `host` the node cannot dial
    successors and answers push requests with `pushing=False` (the client then drives every
    hop itself); without `pushes` it opens a new push stream for every session.
    """
    peer = str(session.peer)[:16] if session.peer is not None else "?"
    while True:
        try:
            with trio.move_on_after(idle_s):
                request = await session.receive()
            if request is None:
                return  # idle: the stream ends with a goodbye
        except StreamClosedError:
            return
        except P2PError as exc:
            logger.info("stream from %s ended between sessions: %s", peer, exc)
            return
        try:
            again = await _serve_request(workers(), session, request, host, pushes, peer)
        except P2PError as exc:
            logger.info("stream from %s ended: %s", peer, exc)
            return
        if not again:
            return


async def _serve_request(worker: SpanWorker | None, session: SessionStream, request: Message,
                         host: Host | None, pushes: SessionPool | None, peer: str) -> bool:
    """One session or push stream; True when it ended cleanly and the stream may go on."""
    if worker is None:
        await session.send(Refusal(code="closing", retryable=True,
                                   detail="this node is moving to another span"))
        return False
    if isinstance(request, OpenSession):
        return await _serve_client(worker, session, request, host, pushes, peer)
    if isinstance(request, PushOpen):
        return await _serve_push(worker, session, request, peer)
    await session.send(Refusal(code="bad-request",
                               detail="expected OpenSession or PushOpen first"))
    return False


async def _serve_client(worker: SpanWorker, session: SessionStream, request: OpenSession,
                        host: Host | None, pushes: SessionPool | None, peer: str) -> bool:
    try:
        ws = worker.open(request)
    except RefusedError as exc:
        logger.info("refused session from %s: %s", peer, exc)
        await session.send(_refusal(exc))
        return False
    sid = request.session_id.hex()[:8]
    logger.info("session %s from %s: stages [%d, %d), max_length %d, codec %s%s", sid, peer,
                request.start, request.end, request.max_length, request.codec,
                ", push" if request.successor else "")
    served = _Served(ws=ws, client=session, predecessor=request.predecessor)
    table = _SERVED.setdefault(worker, _Table())
    table.add(request.session_id, served)
    pushing = bool(request.successor) and host is not None
    asked = False
    try:
        async with trio.open_nursery() as nursery:
            if pushing and host is not None:
                nursery.start_soon(_hold_push, host, pushes, served, request, sid)
            else:
                served.push_ready.set()
            try:
                await session.send(SessionOpened(
                    session_id=request.session_id, pushing=pushing,
                    dtype=str(worker.span.dtype).removeprefix("torch.")))
                asked = await _serve_steps(worker, served, session, sid, peer)
            except P2PError as exc:  # caught here: a nursery would wrap it in a group
                logger.info("session %s from %s ended: %s", sid, peer, exc)
            if asked:
                # A step pushed in by the predecessor may still be computing: it answers the
                # client and pushes on first, so nothing of this session follows
                # `SessionClosed` on the client's stream or `CloseSession` on the push stream,
                # both of which may be used again. Steps after this see `closed`, do nothing.
                served.closed = True
                async with served.lock:
                    served.ending.set()  # the push stream ends its use cleanly, to be kept
            else:
                nursery.cancel_scope.cancel()  # the session broke off: drop the push stream
    finally:
        served.closed = True
        table.sessions.pop(request.session_id, None)
        worker.close(request.session_id)
        logger.info("session %s closed; %d open", sid, len(worker.sessions))
    if asked:
        await session.send(SessionClosed(session_id=request.session_id))
    return asked


async def _serve_steps(worker: SpanWorker, served: _Served, session: SessionStream, sid: str,
                       peer: str) -> bool:
    """The client's steps, in order, until it closes the session (True: by `CloseSession`,
    to be acknowledged once the cache is freed) or the stream (False)."""
    while True:
        try:
            msg = await session.receive()
        except StreamClosedError:
            return False
        if isinstance(msg, CloseSession) and msg.session_id == served.ws.session_id:
            return True
        if not isinstance(msg, Step):
            await session.send(Refusal(code="bad-request",
                                       detail=f"unexpected {msg.wire_name} in a session"))
            continue
        await _process(worker, served, msg, sid, peer)


async def _hold_push(host: Host, pushes: SessionPool | None, served: _Served,
                     request: OpenSession, sid: str) -> None:
    """Open the push stream to the successor and hold it until the session ends.

    `served.push` is set once `PushOpen` is written (the successor reads it before any step
    behind it) and cleared when the successor refuses or the stream ends; `push_ready` is set
    either way, so a step never waits past this open. When the client closed the session
    (`served.ending`), the push stream's use ends with `CloseSession`, and once the successor
    answers it goes back to `pushes` for the next session to that peer.
    """
    try:
        peer, transports = _successor(request.successor)
        with trio.fail_after(PUSH_OPEN_TIMEOUT_S):
            if not host.is_connected(peer):
                await host.connect_peer(peer, transports)
        # Not under the timeout: the session's nursery must not straddle a cancel scope
        # (the host bounds the stream open by its dial timeout).
        if pushes is None:
            async with host.open_session(peer, PROTOCOL, config=served.client.config) as push:
                await _use_push(push, served, request, sid)
        else:
            async with pushes.lease(peer) as lease:
                lease.reusable = await _use_push(lease.session, served, request, sid)
    except StreamClosedError:
        pass
    except (P2PError, trio.TooSlowError, ValueError) as exc:
        logger.info("session %s: no push stream to the successor: %s", sid, exc)
    finally:
        served.push = None
        served.push_ready.set()


async def _use_push(push: SessionStream, served: _Served, request: OpenSession,
                    sid: str) -> bool:
    """Serve as `served`'s push stream until the session ends; True if it ended cleanly."""
    with trio.fail_after(PUSH_OPEN_TIMEOUT_S):
        await push.send(PushOpen(session_id=request.successor_session))
    served.push = push
    served.push_ready.set()
    closed = trio.Event()
    acked = False

    async def read() -> None:
        nonlocal acked
        try:
            while True:
                reply = await push.receive()
                if isinstance(reply, SessionOpened):
                    continue
                if isinstance(reply, SessionClosed) \
                        and reply.session_id == request.successor_session:
                    acked = True
                    return
                detail = reply.detail if isinstance(reply, Refusal) else reply.wire_name
                logger.info("session %s: the successor refused the push stream: %s", sid,
                            detail)
                return
        except StreamClosedError:
            pass
        except P2PError as exc:  # caught here: the nursery would wrap it in a group
            logger.info("session %s: the push stream broke: %s", sid, exc)
        finally:
            if not acked:
                served.push = None  # later steps answer pushed=False
            closed.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await served.ending.wait()
        if not closed.is_set():
            with trio.move_on_after(PUSH_CLOSE_TIMEOUT_S), \
                    contextlib.suppress(P2PError):  # a broken stream: not acked, not kept
                await push.send(CloseSession(session_id=request.successor_session))
                await closed.wait()
        nursery.cancel_scope.cancel()
    return acked


def _successor(addrs: tuple[str, ...]) -> tuple[PeerId, list[str]]:
    """The successor's peer id and transport addresses (all must name the same peer)."""
    parsed = [parse_peer_addr(a) for a in addrs]
    peers = {p for p, _ in parsed}
    if len(peers) != 1:
        raise ValueError("successor addresses must name exactly one peer")
    return parsed[0][0], [t for _, t in parsed]


async def _serve_push(worker: SpanWorker, stream: SessionStream, request: PushOpen,
                      peer: str) -> bool:
    """Steps pushed by the session's predecessor; True when it ended the push stream's use
    with `CloseSession` (answered: the stream may carry another)."""
    # A client opens its hops at once, so the push stream may come before the session.
    table = _SERVED.setdefault(worker, _Table())
    with trio.move_on_after(PUSH_OPEN_TIMEOUT_S):
        while request.session_id not in table.sessions:
            await table.opened.wait()
    served = table.sessions.get(request.session_id)
    sender = str(stream.peer) if stream.peer is not None else ""
    if served is None or served.closed or not served.predecessor \
            or served.predecessor != sender or served.attached:
        logger.info("refused a push stream from %s", peer)
        await stream.send(Refusal(code="no-session",
                                  detail="no session here expects pushes from you"))
        return False
    served.attached = True
    sid = request.session_id.hex()[:8]
    await stream.send(SessionOpened(session_id=request.session_id,
                                    dtype=str(worker.span.dtype).removeprefix("torch.")))
    while True:
        try:
            msg = await stream.receive()
        except StreamClosedError:
            return False
        if isinstance(msg, CloseSession) and msg.session_id == request.session_id:
            await stream.send(SessionClosed(session_id=request.session_id))
            return True
        if not isinstance(msg, Step):
            await stream.send(Refusal(code="bad-request",
                                      detail=f"unexpected {msg.wire_name} in a push stream"))
            return False
        if served.closed:
            return False
        await _process(worker, served, msg, sid, peer, pushed_in=True)


async def _process(worker: SpanWorker, served: _Served, step: Step, sid: str,
                   peer: str, *, pushed_in: bool = False) -> None:
    """Compute one step; push its output on when asked; answer the client when it needs it.

    The client gets every hop's output, but not necessarily from that hop: while the outputs
    it lacks stay under `CARRY_BYTES`, they ride along the push chain and arrive with a later
    hop's answer (`Step.relay`/`carried`), which spares every hop but the last a message per
    token. Errors sending to the client end the caller's stream (they propagate as
    `P2PError`); a failed push only clears the push stream and answers `pushed=False`.
    """
    # The lock taken without a trip through the scheduler when it is free (it nearly always
    # is): one trip fewer per hop per token.
    try:
        served.lock.acquire_nowait()
    except trio.WouldBlock:
        await served.lock.acquire()
    try:
        await _process_locked(worker, served, step, sid, peer, pushed_in=pushed_in)
    finally:
        served.lock.release()


async def _process_locked(worker: SpanWorker, served: _Served, step: Step, sid: str,
                          peer: str, *, pushed_in: bool) -> None:
    if served.closed:
        return
    try:
        out = await worker.step(served.ws, step)
    except RefusedError as exc:
        logger.info("session %s from %s: refused step %d: %s", sid, peer, step.step, exc)
        await served.client.send(_refusal(exc, step.step))
        return
    # Outputs of earlier hops that came here by push and are not with the client yet.
    pending = (*step.carried, step.input) if pushed_in and step.relay else ()
    carry = _payload_bytes(pending) + len(out.output.payload) <= CARRY_BYTES
    if step.push and not served.push_ready.is_set():
        await served.push_ready.wait()  # the open ran beside the compute
    if step.push and served.push is not None:
        try:
            await served.push.send(Step(step=step.step, position=step.position,
                                        input=out.output, rollback=step.rollback,
                                        last_only=step.last_only, push=True, relay=carry,
                                        carried=pending if carry else ()))
        except P2PError as exc:
            logger.info("session %s: push to the successor failed: %s", sid, exc)
            served.push = None
        else:
            if not carry:  # a copy now, beside the successor's compute
                await served.client.send(dataclasses.replace(out, pushed=True,
                                                             carried=pending))
            return
    await served.client.send(dataclasses.replace(out, carried=pending) if pending else out)


def _payload_bytes(tensors: tuple[Tensor, ...]) -> int:
    return sum(len(t.payload) for t in tensors)
