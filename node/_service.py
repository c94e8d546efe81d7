"""The inference service (`/shardnet/inference/1`): one session per stream.

The p2p layer gives each inbound stream a `SessionStream` (framing, heartbeats, flow control);
this handler speaks the inference protocol on it. A session's KV cache lives exactly as long as
its stream: whatever ends the stream — the client's close, a dead or frozen client declared
dead by heartbeats, a protocol violation, the node shutting down — the `finally` frees it.
A refused request is answered with a typed `Refusal` and the stream stays usable, so one bad
step costs the client one round trip, never the node.
"""

from __future__ import annotations

import logging

from node._errors import RefusedError
from node._protocol import OpenSession, Refusal, SessionOpened, Step
from node._worker import SpanWorker
from p2p import P2PError, SessionStream, StreamClosedError

logger = logging.getLogger(__name__)


def _refusal(exc: RefusedError) -> Refusal:
    return Refusal(code=exc.code[:32], detail=exc.detail[:512], retryable=exc.retryable)


async def serve_inference(worker: SpanWorker, session: SessionStream) -> None:
    """Serve one client session on `session` until it ends; never raises on bad input."""
    peer = str(session.peer)[:16] if session.peer is not None else "?"
    try:
        request = await session.receive()
    except StreamClosedError:
        return
    if not isinstance(request, OpenSession):
        await session.send(Refusal(code="bad-request", detail="expected OpenSession first"))
        return
    try:
        ws = worker.open(request)
    except RefusedError as exc:
        logger.info("refused session from %s: %s", peer, exc)
        await session.send(_refusal(exc))
        return
    sid = request.session_id.hex()[:8]
    logger.info("session %s from %s: stages [%d, %d), max_length %d, codec %s", sid, peer,
                request.start, request.end, request.max_length, request.codec)
    try:
        await session.send(SessionOpened(session_id=request.session_id,
                                         dtype=str(worker.span.dtype).removeprefix("torch.")))
        while True:
            try:
                msg = await session.receive()
            except StreamClosedError:
                return
            if not isinstance(msg, Step):
                await session.send(Refusal(code="bad-request",
                                           detail=f"unexpected {msg.wire_name} in a session"))
                continue
            try:
                out = await worker.step(ws, msg)
            except RefusedError as exc:
                logger.info("session %s from %s: refused step %d: %s", sid, peer, msg.step, exc)
                await session.send(_refusal(exc))
                continue
            await session.send(out)
    except P2PError as exc:
        logger.info("session %s from %s ended: %s", sid, peer, exc)
    finally:
        worker.close(request.session_id)
        logger.info("session %s closed; %d open", sid, len(worker.sessions))
