"""Messages of the inference service (`/shardnet/inference/1`), as frozen dataclasses.

A client opens one session stream per hop and speaks:

    client -> OpenSession            server -> SessionOpened | Refusal
    client -> Step (position, input) server -> StepOutput | Refusal
    ...                              (a Refusal to a step leaves the session usable unless the
                                      stream is then closed by the server)
    client -> CloseSession           server -> SessionClosed (once the KV cache is freed)

A client that leaves without `CloseSession` (a dropped stream) frees the session all the same;
the acknowledged close lets a client know its sessions are gone before it returns, so their
teardown does not run into its next generation. After `SessionClosed` the stream may carry the
next `OpenSession` (or `PushOpen`): clients and pushing nodes keep streams for their next use
(`p2p.SessionPool`), and a node ends a stream left idle for 30 s.

The client need not wait for `SessionOpened` before its first step (it does not): a server
reads a stream's messages in order, and a refused session drops the steps behind it.

Push (server-to-server): the client opens all hops at once and tells each hop its successor
(`successor`, `successor_session`) and its predecessor's peer id. The hop opens one stream to
its successor and sends `PushOpen(successor_session)`, its steps right behind; the successor
accepts it only from the declared predecessor (waiting a moment for that session's own
`OpenSession`), else answers a `Refusal` and drops the stream. A client `Step` with `push` set
is then computed by the first hop, forwarded as a `Step` on the push stream, and so on down the
chain; when the session closes, the hop ends the push stream's use with `CloseSession` too
(answered `SessionClosed`) and keeps it for its next session to that peer. The client keeps
every hop's output (the next hop's input, which a replacement replays
after a failure): small outputs ride along the chain (`relay`, `carried`) and arrive with the
last hop's `StepOutput`, one message per token; large ones (a long prompt's) come straight back
from each hop as a copy (`pushed=True`), beside the next hop's compute. A hop that could not
push answers the client with `pushed=False`, and the client drives the next hop itself.

Token ids travel as an int64 `raw` tensor (B=1, T); hidden states as (1, T, C) in the
session's codec; logits as (1, T or 1, V) `raw`. Everything is validated by the p2p message
layer (types, sizes) and then by the server against the session (shapes, positions).
"""

from __future__ import annotations

from dataclasses import dataclass

from p2p import Message, Tensor, WireLimits, message

PROTOCOL = "/shardnet/inference/1"
SESSION_ID_BYTES = 16
_MAX_TEXT = 512
_MAX_ADDRS = 8
MAX_CARRIED = 64  # outputs one push message may carry toward the client (hops of one route)


@message("shardnet.OpenSession", 1)
@dataclass(frozen=True, slots=True)
class OpenSession(Message):
    """Open a session on stages `[start, end)` of `model_id`, up to `max_length` positions."""

    session_id: bytes
    model_id: str
    start: int
    end: int
    max_length: int
    codec: str = "int8-block"
    successor: tuple[str, ...] = ()
    successor_session: bytes = b""
    predecessor: str = ""

    def validate(self, limits: WireLimits) -> None:
        if len(self.session_id) != SESSION_ID_BYTES:
            raise ValueError(f"session_id must be {SESSION_ID_BYTES} bytes")
        if len(self.successor) > _MAX_ADDRS or any(len(a) > _MAX_TEXT for a in self.successor):
            raise ValueError("too many or too long successor addresses")
        if self.successor and len(self.successor_session) != SESSION_ID_BYTES:
            raise ValueError(f"successor_session must be {SESSION_ID_BYTES} bytes")
        if len(self.predecessor) > 128:
            raise ValueError("predecessor peer id too long")
        if not 0 < len(self.model_id) <= 128:
            raise ValueError("model_id length out of range")
        if not 0 <= self.start < self.end:
            raise ValueError("span must satisfy 0 <= start < end")
        if self.max_length <= 0:
            raise ValueError("max_length must be positive")
        if len(self.codec) > 32:
            raise ValueError("codec name too long")


@message("shardnet.SessionOpened", 1)
@dataclass(frozen=True, slots=True)
class SessionOpened(Message):
    """The server holds a KV cache for the session; `dtype` is what it computes in, and
    `pushing` whether it is opening a push stream to the successor the client named (each
    step's `StepOutput.pushed` says whether that step went through)."""

    session_id: bytes
    dtype: str
    pushing: bool = False


@message("shardnet.Step", 1)
@dataclass(frozen=True, slots=True)
class Step(Message):
    """Run the session's stages on `input` at `position` (roll back first if asked).

    `last_only`: the client reads only the last position of what this step gives it. A
    session ending in the head computes logits for that position alone; a session with no
    successor (the route's last hop, or any hop the client drives) answers with that
    position's hidden state alone, which spares a prompt's last leg all its other rows. A hop
    with a successor always answers every position: its output is the next hop's input.

    On a push stream, `relay` says the client does not have `input` yet (its producer sent no
    copy), and `carried` holds the outputs of the hops before that one which the client does
    not have either, oldest first: this hop passes them all on, so they reach the client in
    the chain's last message instead of one message per hop.
    """

    step: int
    position: int
    input: Tensor
    rollback: bool = False
    last_only: bool = False
    push: bool = False
    relay: bool = False
    carried: tuple[Tensor, ...] = ()

    def validate(self, limits: WireLimits) -> None:
        if self.step < 0 or self.position < 0:
            raise ValueError("step and position must be >= 0")
        if len(self.carried) > MAX_CARRIED or (self.carried and not self.relay):
            raise ValueError(f"at most {MAX_CARRIED} carried outputs, and only with relay")


@message("shardnet.StepOutput", 1)
@dataclass(frozen=True, slots=True)
class StepOutput(Message):
    """The output of one step, and how long the server computed it.

    `carried`: the outputs of the hops right before this one that reached it by push and
    not the client, oldest first (the client keeps every hop's input). `pushed`: the output
    also went on to the successor, and this message is the client's copy.
    """

    step: int
    position: int
    output: Tensor
    compute_s: float = 0.0
    pushed: bool = False
    carried: tuple[Tensor, ...] = ()

    def validate(self, limits: WireLimits) -> None:
        if len(self.carried) > MAX_CARRIED:
            raise ValueError(f"at most {MAX_CARRIED} carried outputs")


@message("shardnet.CloseSession", 1)
@dataclass(frozen=True, slots=True)
class CloseSession(Message):
    """End the session: free its KV cache, then answer `SessionClosed`."""

    session_id: bytes

    def validate(self, limits: WireLimits) -> None:
        if len(self.session_id) != SESSION_ID_BYTES:
            raise ValueError(f"session_id must be {SESSION_ID_BYTES} bytes")


@message("shardnet.SessionClosed", 1)
@dataclass(frozen=True, slots=True)
class SessionClosed(Message):
    """The session's KV cache is freed; nothing more of it will be sent."""

    session_id: bytes

    def validate(self, limits: WireLimits) -> None:
        if len(self.session_id) != SESSION_ID_BYTES:
            raise ValueError(f"session_id must be {SESSION_ID_BYTES} bytes")


@message("shardnet.PushOpen", 1)
@dataclass(frozen=True, slots=True)
class PushOpen(Message):
    """First message of a push stream: the sender is the predecessor of `session_id`."""

    session_id: bytes

    def validate(self, limits: WireLimits) -> None:
        if len(self.session_id) != SESSION_ID_BYTES:
            raise ValueError(f"session_id must be {SESSION_ID_BYTES} bytes")


@message("shardnet.Refusal", 1)
@dataclass(frozen=True, slots=True)
class Refusal(Message):
    """A typed refusal (see `RefusedError` for the codes); `step` names the refused step."""

    code: str
    detail: str = ""
    retryable: bool = False
    step: int = -1

    def validate(self, limits: WireLimits) -> None:
        if not 0 < len(self.code) <= 32 or len(self.detail) > _MAX_TEXT:
            raise ValueError("refusal code/detail length out of range")
