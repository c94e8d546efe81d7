"""Sans-IO framing and the session protocol: no sockets, plus hypothesis fuzzing."""

from __future__ import annotations

import contextlib
import struct
import tracemalloc
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p import (
    CLOSED,
    DEFAULT_LIMITS,
    HEADER_SIZE,
    INITIAL_WINDOW,
    NEED_DATA,
    BrokenStreamError,
    Framer,
    LocalProtocolError,
    Message,
    RemoteProtocolError,
    SessionEvent,
    SessionProtocol,
    TruncatedFrameError,
    WireLimits,
    message,
)
from p2p._framing import CHECKED_BYTES, frame_check
from p2p._messages import _MSGPACK_ERRORS


@message("test.Chunk", 1)
@dataclass(frozen=True, slots=True)
class Chunk(Message):
    seq: int
    data: bytes


def frames(*msgs: Message, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    framer = Framer(limits=limits)
    return b"".join(framer.send(m) for m in msgs)


def framed(payload: bytes) -> bytes:
    """``payload`` behind a valid header, whatever it holds."""
    return struct.pack(">II", len(payload), frame_check(len(payload), payload)) + payload


def drain(framer: Framer) -> list[object]:
    out: list[object] = []
    while (event := framer.next_event()) is not NEED_DATA:
        out.append(event)
        if event is CLOSED:
            break
    return out


def test_byte_by_byte_delivery() -> None:
    msgs = [Chunk(seq=i, data=bytes([i]) * i) for i in range(20)]
    wire = frames(*msgs)
    framer = Framer()
    got: list[object] = []
    for i in range(len(wire)):
        framer.receive_data(wire[i : i + 1])
        got.extend(drain(framer))
    framer.receive_data(b"")
    got.extend(drain(framer))
    assert got == [*msgs, CLOSED]


def test_over_limit_frame_is_rejected_from_the_header() -> None:
    framer = Framer(limits=WireLimits(max_frame_bytes=1024), peer="12D3KooWpeer")
    framer.receive_data(struct.pack(">II", 1 << 30, 0))
    with pytest.raises(RemoteProtocolError, match="exceeds") as info:
        framer.next_event()
    assert info.value.peer == "12D3KooWpeer"
    assert framer.buffered_bytes == HEADER_SIZE  # nothing of the payload allocated
    with pytest.raises(RemoteProtocolError):  # poisoned
        framer.next_event()


def test_truncated_frame_is_an_error_not_a_short_message() -> None:
    wire = frames(Chunk(seq=1, data=b"x" * 100))
    for cut in (3, HEADER_SIZE, len(wire) - 1):
        framer = Framer()
        framer.receive_data(wire[:cut])
        assert framer.next_event() is NEED_DATA
        framer.receive_data(b"")
        with pytest.raises(TruncatedFrameError):
            framer.next_event()
    assert issubclass(TruncatedFrameError, BrokenStreamError)


def test_checksum_mismatch() -> None:
    wire = bytearray(frames(Chunk(seq=1, data=b"abc")))
    wire[-1] ^= 0xFF
    framer = Framer()
    framer.receive_data(bytes(wire))
    with pytest.raises(RemoteProtocolError, match="checksum"):
        framer.next_event()


def test_the_check_covers_the_length_and_the_head_of_the_payload() -> None:
    big = bytearray(frames(Chunk(seq=1, data=b"d" * (3 * CHECKED_BYTES))))
    assert len(big) % 2 == 1  # so flipping the length's low bit shortens the frame
    for pos in (3, HEADER_SIZE + 10, HEADER_SIZE + CHECKED_BYTES - 1):
        damaged = bytearray(big)
        damaged[pos] ^= 0x01
        framer = Framer()
        framer.receive_data(bytes(damaged))
        with pytest.raises(RemoteProtocolError, match="checksum"):
            framer.next_event()
    # Past the checked head, a large payload relies on the transport (Noise's AEAD):
    # a flipped byte there decodes, as a different message.
    damaged = bytearray(big)
    damaged[-1] ^= 0x01
    framer = Framer()
    framer.receive_data(bytes(damaged))
    msg = framer.next_event()
    assert isinstance(msg, Chunk) and msg.data[-1:] == b"e"


def test_not_msgpack_with_valid_frame() -> None:
    payload = b"\xc1\xc1\xc1"
    framer = Framer()
    framer.receive_data(framed(payload))
    with pytest.raises(RemoteProtocolError, match="msgpack"):
        framer.next_event()


def test_buffer_bound_and_local_misuse() -> None:
    framer = Framer(limits=WireLimits(max_frame_bytes=1024))
    with pytest.raises(LocalProtocolError, match="buffer"):
        framer.receive_data(b"\x00" * (framer.max_buffered_bytes + 1))
    framer.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        framer.receive_data(b"x")
    with pytest.raises(LocalProtocolError):
        Framer(limits=WireLimits(max_frame_bytes=64)).send(Chunk(seq=0, data=b"x" * 100))


# --- fuzzing: only declared errors, never a crash, never an over-limit allocation ----

FUZZ_LIMITS = WireLimits(max_frame_bytes=4096, max_tensor_elements=1024, max_collection_len=64)
VALID = frames(Chunk(seq=1, data=b"hello"), Chunk(seq=2, data=b"\x00" * 300), limits=FUZZ_LIMITS)


def feed_all(data: bytes, chunk: int) -> None:
    framer = Framer(limits=FUZZ_LIMITS)
    with contextlib.suppress(RemoteProtocolError):
        for i in range(0, len(data), chunk):
            framer.receive_data(data[i : i + chunk])
            drain(framer)
        framer.receive_data(b"")
        drain(framer)
    assert framer.buffered_bytes <= framer.max_buffered_bytes


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=64))
def test_fuzz_random_bytes(data: bytes, chunk: int) -> None:
    feed_all(data, chunk)


@settings(max_examples=1000, deadline=None)
@given(st.data())
def test_fuzz_mutated_frames(data: st.DataObject) -> None:
    wire = bytearray(VALID)
    for _ in range(data.draw(st.integers(min_value=1, max_value=6))):
        pos = data.draw(st.integers(min_value=0, max_value=len(wire) - 1))
        op = data.draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if op == "flip":
            wire[pos] ^= data.draw(st.integers(min_value=1, max_value=255))
        elif op == "insert":
            wire[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del wire[pos]
        else:
            del wire[pos:]
        if not wire:
            break
    feed_all(bytes(wire), data.draw(st.integers(min_value=1, max_value=512)))


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_payloads_behind_valid_checksums(payload: bytes) -> None:
    """Random payloads with correct length and crc: the message decoder is exposed."""
    framer = Framer(limits=FUZZ_LIMITS)
    framer.receive_data(framed(payload))
    with contextlib.suppress(RemoteProtocolError):
        drain(framer)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(),
        lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
        max_leaves=30,
    )
)
def test_fuzz_structured_msgpack(fields: object) -> None:
    import msgpack

    for envelope in (["test.Chunk", 1, fields], fields):
        try:
            payload = msgpack.packb(envelope, use_bin_type=True)
        except _MSGPACK_ERRORS:
            return
        framer = Framer(limits=FUZZ_LIMITS)
        framer.receive_data(framed(payload))
        with contextlib.suppress(RemoteProtocolError):
            drain(framer)


def test_hostile_lengths_do_not_allocate() -> None:
    """A msgpack header claiming a huge bin/array inside a small frame costs nothing."""
    hostile = [
        b"\x93\xaatest.Chunk\x01\x82\xa3seq\x01\xa4data\xc6\x7f\xff\xff\xff",  # 2 GiB bin
        b"\xdd\x7f\xff\xff\xff",  # array of 2**31 elements
        b"\xdf\x7f\xff\xff\xff",  # map of 2**31 pairs
        b"\x91" * 3000,  # deep nesting
    ]
    tracemalloc.start()
    try:
        for payload in hostile:
            framer = Framer(limits=FUZZ_LIMITS)
            framer.receive_data(framed(payload))
            with pytest.raises(RemoteProtocolError):
                framer.next_event()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# --- session protocol (credits, goodbye) without I/O ----------------------------------


def pipe(sender: SessionProtocol, receiver: SessionProtocol, data: bytes) -> list[object]:
    receiver.receive_data(data)
    out: list[object] = []
    while (event := receiver.next_event()) is not SessionEvent.NEED_DATA:
        out.append(event)
        if event is SessionEvent.CLOSED:
            break
    return out


def test_credits_bound_the_sender_and_are_granted_back() -> None:
    a, b = (
        SessionProtocol(window_bytes=INITIAL_WINDOW),
        SessionProtocol(window_bytes=INITIAL_WINDOW),
    )
    big = Chunk(seq=0, data=b"x" * 100_000)
    sent = b""
    while a.can_send():
        sent += a.send(big)
    assert a.send_credit <= 0
    with pytest.raises(LocalProtocolError, match="credit"):
        a.send(big)
    events = pipe(a, b, sent)
    assert len(events) == 3  # 3 x 100 kB > 256 KiB: one frame of overdraft
    grants = b"".join(b.message_consumed(size) for _, size in events)  # type: ignore[misc]
    assert grants
    pipe(b, a, grants)
    assert a.can_send()


def test_window_violation_is_remote_protocol_error() -> None:
    limits = WireLimits(max_frame_bytes=200_000)
    greedy = Framer(limits=limits)  # ignores credits
    receiver = SessionProtocol(window_bytes=INITIAL_WINDOW, limits=limits)
    chunk = greedy.send(Chunk(seq=0, data=b"x" * 150_000))
    with pytest.raises(RemoteProtocolError, match="window"):
        for _ in range(4):
            receiver.receive_data(chunk)
            while receiver.next_event() is not SessionEvent.NEED_DATA:
                pass


def test_goodbye_then_eof_is_clean_but_bare_eof_is_broken() -> None:
    a, b = SessionProtocol(), SessionProtocol()
    events = pipe(a, b, a.initial_bytes() + a.send(Chunk(seq=1, data=b"")) + a.goodbye("done"))
    assert events[-1] is SessionEvent.GOODBYE
    assert pipe(a, b, b"") == [SessionEvent.CLOSED]
    with pytest.raises(LocalProtocolError):
        a.send(Chunk(seq=2, data=b""))

    c, d = SessionProtocol(peer="12D3KooWx"), SessionProtocol(peer="12D3KooWx")
    pipe(c, d, c.send(Chunk(seq=1, data=b"")))
    with pytest.raises(BrokenStreamError, match="without a goodbye"):
        pipe(c, d, b"")


def test_data_after_goodbye_is_a_violation() -> None:
    a, b = SessionProtocol(), SessionProtocol()
    rogue = Framer()
    with pytest.raises(RemoteProtocolError, match="after goodbye"):
        pipe(a, b, a.goodbye() + rogue.send(Chunk(seq=1, data=b"")))
