"""Sans-IO message codec: encoding, validation, unknown/missing/mistyped fields."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import msgpack
import pytest

from p2p import (
    Identity,
    LocalProtocolError,
    Message,
    PeerId,
    RemoteProtocolError,
    Tensor,
    WireLimits,
    decode_message,
    encode_message,
    message,
    tensor_payload_bytes,
)


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@message("test.Sample", 1)
@dataclass(frozen=True, slots=True)
class Sample(Message):
    count: int
    ratio: float
    name: str
    blob: bytes
    flag: bool
    color: Color
    dims: tuple[int, ...]
    owner: PeerId
    note: str | None = None
    extra: int = 7

    def validate(self, limits: WireLimits) -> None:
        if self.count < 0:
            raise ValueError("count must be >= 0")


@message("test.Sample", 2)
@dataclass(frozen=True, slots=True)
class SampleV2(Message):
    count: int


@message("test.Carrier", 1)
@dataclass(frozen=True, slots=True)
class Carrier(Message):
    tensors: tuple[Tensor, ...]


PEER = Identity.from_seed(b"\x01" * 32).peer_id


def sample(**overrides: object) -> Sample:
    fields: dict[str, object] = dict(
        count=3,
        ratio=0.5,
        name="x",
        blob=b"\x00\x01",
        flag=True,
        color=Color.BLUE,
        dims=(1, 2, 3),
        owner=PEER,
    )
    fields.update(overrides)
    return Sample(**fields)  # type: ignore[arg-type]


def raw_fields(msg: Message) -> dict[str, object]:
    name, version, fields = msgpack.unpackb(encode_message(msg), raw=False)
    return dict(fields)


def pack(name: str, version: int, fields: object) -> bytes:
    data: bytes = msgpack.packb([name, version, fields], use_bin_type=True)
    return data


def test_round_trip() -> None:
    msg = sample(note="hello")
    assert decode_message(encode_message(msg)) == msg
    assert Sample.from_wire(msg.to_wire()) == msg
    assert decode_message(SampleV2(count=1).to_wire()) == SampleV2(count=1)


def test_unknown_fields_are_ignored_and_defaults_filled() -> None:
    fields = raw_fields(sample())
    del fields["note"], fields["extra"]
    fields["from_the_future"] = [1, 2, 3]
    msg = decode_message(pack("test.Sample", 1, fields))
    assert msg == sample()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("count", "3"),
        ("count", True),  # bool is not an int on the wire
        ("count", 1.0),
        ("ratio", 1),
        ("ratio", float("nan")),
        ("name", b"x"),
        ("blob", "x"),
        ("flag", 1),
        ("color", "green"),
        ("color", 1),
        ("dims", [1, "2"]),
        ("dims", 5),
        ("owner", b"\x00" * 38),
        ("owner", "12D3KooW"),
        ("note", 5),
        ("count", -1),  # fails the message's own validate()
    ],
)
def test_mistyped_field_is_remote_protocol_error(field: str, value: object) -> None:
    fields = raw_fields(sample())
    fields[field] = value
    with pytest.raises(RemoteProtocolError, match=field):
        decode_message(pack("test.Sample", 1, fields))


def test_missing_required_field() -> None:
    fields = raw_fields(sample())
    del fields["name"]
    with pytest.raises(RemoteProtocolError, match="missing required"):
        decode_message(pack("test.Sample", 1, fields))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",  # never used in msgpack
        b"\x93",  # truncated array
        msgpack.packb(["test.Sample", 1]),
        msgpack.packb(["test.Sample", 1, {}, 4]),
        msgpack.packb({"test.Sample": 1}),
        msgpack.packb(["test.Sample", "1", {}]),
        msgpack.packb(["test.Unknown", 1, {}]),
        msgpack.packb(["test.Sample", 99, {}]),
        msgpack.packb(["test.Sample", 1, []]),
        msgpack.packb(["test.Sample", 1, {}]) + b"\x00",  # trailing bytes
        msgpack.packb(msgpack.ExtType(5, b"x")),
    ],
)
def test_garbage_is_remote_protocol_error(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        decode_message(data)


def test_from_wire_checks_the_class() -> None:
    with pytest.raises(RemoteProtocolError, match="expected"):
        Sample.from_wire(SampleV2(count=1).to_wire())


def test_invalid_local_message_is_local_protocol_error() -> None:
    with pytest.raises(LocalProtocolError):
        encode_message(sample(count=-1))
    with pytest.raises(LocalProtocolError):
        encode_message(sample(count=1 << 70))  # not representable in msgpack
    with pytest.raises(LocalProtocolError, match="limit"):
        encode_message(sample(blob=b"x" * 2000), WireLimits(max_frame_bytes=1000))


def test_registration_rejects_bad_classes() -> None:
    with pytest.raises(TypeError, match="already registered"):

        @message("test.Sample", 1)
        @dataclass(frozen=True, slots=True)
        class Dup(Message):
            x: int

    with pytest.raises(TypeError, match="frozen"):

        @message("test.NotFrozen", 1)
        @dataclass(slots=True)
        class NotFrozen(Message):
            x: int

    with pytest.raises(TypeError, match="unsupported"):

        @message("test.BadType", 1)
        @dataclass(frozen=True, slots=True)
        class BadType(Message):
            x: dict[str, int]


def tensor(n: int = 6, codec: str = "raw", dtype: str = "float16") -> Tensor:
    shape = (2, n // 2)
    return Tensor(
        dtype=dtype,
        shape=shape,
        codec=codec,
        payload=b"\x00" * tensor_payload_bytes(dtype, shape, codec),
    )


def test_tensor_round_trip_and_sizes() -> None:
    msg = Carrier(
        tensors=(tensor(), tensor(codec="int8-block", n=130), tensor(codec="fp16", dtype="float32"))
    )
    assert decode_message(msg.to_wire()) == msg
    assert tensor_payload_bytes("float32", (3, 5), "raw") == 60
    assert tensor_payload_bytes("bfloat16", (130,), "int8-block") == 130 + 2 * 3


@pytest.mark.parametrize(
    "change",
    [
        {"dtype": "complex64"},
        {"codec": "zstd"},
        {"shape": (2, -3)},
        {"shape": (1,) * 9},
        {"shape": (1 << 20, 1 << 20)},  # over the element cap, never allocated
        {"payload": b"\x00" * 5},
    ],
)
def test_bad_tensor_header_is_rejected(change: dict[str, object]) -> None:
    good = raw_fields(Carrier(tensors=(tensor(),)))
    header = dict(good["tensors"][0])  # type: ignore[index]
    header.update(change)
    with pytest.raises(RemoteProtocolError, match="tensor"):
        decode_message(pack("test.Carrier", 1, {"tensors": [header]}))


def test_tensor_element_cap_is_configurable() -> None:
    data = Carrier(tensors=(tensor(n=100),)).to_wire()
    with pytest.raises(RemoteProtocolError, match="cap"):
        decode_message(data, WireLimits(max_tensor_elements=50))
