"""Lazy multistream-select (`p2p/_select.py`): the proposal's bytes and the answer's parser."""

from __future__ import annotations

import pytest

from p2p import RemoteProtocolError
from p2p._select import HEADER, Answer, proposal

PROTO = "/shardnet/inference/1"


def line(text: bytes) -> bytes:
    """A multistream message for a line shorter than 128 bytes: one length byte."""
    return bytes([len(text) + 1]) + text + b"\n"


def test_the_proposal_is_the_header_then_the_protocol() -> None:
    assert proposal(PROTO) == line(HEADER) + line(PROTO.encode())
    long = "/" + "x" * 200  # a two-byte varint length
    assert proposal(long)[len(line(HEADER)):][:2] == bytes([(202 & 0x7F) | 0x80, 202 >> 7])


def test_an_acceptance_fed_byte_by_byte_hands_over_what_follows_it() -> None:
    answer = Answer(PROTO)
    wire = line(HEADER) + line(PROTO.encode()) + b"session bytes"
    got = [answer.feed(wire[i : i + 1]) for i in range(len(wire) - len(b"session bytes") - 1)]
    assert all(g is None for g in got)
    assert answer.feed(wire[len(wire) - len(b"session bytes") - 1 :]) == b"session bytes"


def test_an_acceptance_with_nothing_after_it_hands_over_nothing() -> None:
    assert Answer(PROTO).feed(line(HEADER) + line(PROTO.encode())) == b""


@pytest.mark.parametrize(("wire", "match"), [
    (line(HEADER) + line(b"na"), "does not speak"),
    (line(HEADER) + line(b"/other/1"), "answered"),
    (line(b"/multistream/2.0.0"), "header"),
    (bytes([0x80, 0x80, 0x80, 0x01]), "oversized"),
    (bytes([0x81, 0x40]) + b"x" * 10, "bytes"),  # 8193 bytes announced
    (bytes([0]), "0 bytes"),
    (bytes([3]) + b"abc", "newline"),
])
def test_anything_but_our_protocol_echoed_is_refused(wire: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        Answer(PROTO).feed(wire)
