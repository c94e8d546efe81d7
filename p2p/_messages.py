"""Versioned, self-validating wire messages (sans-IO; no trio, no libp2p).

Theory of operation
-------------------
A message is a frozen, slotted dataclass that subclasses :class:`Message` and is
registered under a ``(name, version)`` pair with :func:`message`. Its one encoding is
the msgpack array ``[name, version, {field: value, ...}]``.

Registration compiles a checker for every field from its type annotation, so decoding
validates every field of every message without hand-written code:

* ``int`` (never ``bool``), ``float`` (finite only), ``bool``, ``str``, ``bytes``;
* ``X | None``; ``tuple[X, ...]``; a ``str``-valued ``Enum``; :class:`PeerId` (as bytes);
* a nested frozen dataclass (encoded as a map, e.g. :class:`~p2p.Tensor`).

Decoding rules (see STYLE.md, rule 3): unknown fields are ignored on purpose (newer
peers may add optional fields); a missing required field, a field of the wrong type,
an unknown ``(name, version)``, or bytes that are not msgpack raise
:class:`RemoteProtocolError`. After the type checks, the class's ``validate(limits)``
hook checks semantic invariants (e.g. a span's ``start < end``, a tensor's element cap).
Encoding runs the same hook and raises :class:`LocalProtocolError` instead, so a bad
message is caught on the side that built it.

The frame layer (:mod:`p2p._framing`) bounds the size of what reaches this decoder, so
msgpack never allocates beyond the frame limit.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import msgpack

from p2p._errors import LocalProtocolError, RemoteProtocolError
from p2p._peer_id import InvalidPeerIdError, PeerId

__all__ = [
    "Message",
    "WireLimits",
    "DEFAULT_LIMITS",
    "message",
    "encode_message",
    "decode_message",
    "registered_messages",
]

_M = TypeVar("_M", bound="Message")
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class WireLimits:
    """Hard bounds on what a peer may make us allocate.

    Attributes:
        max_frame_bytes: largest frame payload accepted or sent; checked from the
            frame header before any payload is buffered.
        max_tensor_elements: largest element count of one tensor field.
        max_collection_len: longest array or map inside one message.
    """

    max_frame_bytes: int = 16 * 1024 * 1024
    max_tensor_elements: int = 1 << 24
    max_collection_len: int = 1 << 16

    def __post_init__(self) -> None:
        if self.max_frame_bytes <= 0 or self.max_frame_bytes > (1 << 31):
            raise ValueError("max_frame_bytes must be in 1..2**31")


DEFAULT_LIMITS = WireLimits()


class _FieldError(Exception):
    """A field failed its check; carries the dotted path for the error message."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")


class Message:
    """Base class of every wire message.

    Subclasses are ``@message(name, version)`` + ``@dataclass(frozen=True, slots=True)``.
    """

    __slots__ = ()
    wire_name: ClassVar[str]
    wire_version: ClassVar[int]

    def validate(self, limits: WireLimits) -> None:
        """Check invariants beyond field types; raise ``ValueError`` if violated."""

    def to_wire(self, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
        """Encode as msgpack (validating first)."""
        return encode_message(self, limits)

    @classmethod
    def from_wire(cls: type[_M], data: bytes, limits: WireLimits = DEFAULT_LIMITS) -> _M:
        """Decode and validate bytes that must hold a message of exactly this class."""
        msg = decode_message(data, limits)
        if not isinstance(msg, cls):
            raise RemoteProtocolError(
                f"expected {cls.wire_name} v{cls.wire_version}, got "
                f"{msg.wire_name} v{msg.wire_version}"
            )
        return msg


# --- field compilation --------------------------------------------------------------

_Decode = Callable[[object, WireLimits, str], object]
_Encode = Callable[[object], object]


@dataclass(frozen=True, slots=True)
class _FieldSpec:
    name: str
    required: bool
    default: object
    decode: _Decode
    encode: _Encode


@dataclass(frozen=True, slots=True)
class _StructSpec:
    cls: type
    fields: tuple[_FieldSpec, ...]
    validate: Callable[[Any, WireLimits], None] | None


_STRUCTS: dict[type, _StructSpec] = {}
_REGISTRY: dict[tuple[str, int], type[Message]] = {}


def _identity(value: object) -> object:
    return value


def _exact(kind: type, label: str) -> _Decode:
    def check(value: object, limits: WireLimits, path: str) -> object:
        if type(value) is not kind:
            raise _FieldError(path, f"expected {label}, got {type(value).__name__}")
        return value

    return check


def _check_float(value: object, limits: WireLimits, path: str) -> object:
    if type(value) is not float:
        raise _FieldError(path, f"expected float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise _FieldError(path, "float must be finite")
    return value


def _check_peer_id(value: object, limits: WireLimits, path: str) -> object:
    if type(value) is not bytes:
        raise _FieldError(path, f"expected peer id bytes, got {type(value).__name__}")
    try:
        return PeerId.from_bytes(value)
    except InvalidPeerIdError as exc:
        raise _FieldError(path, str(exc)) from exc


def _encode_peer_id(value: object) -> object:
    if not isinstance(value, PeerId):
        raise TypeError("expected PeerId")
    return value.raw


def _compile(tp: object, owner: type) -> tuple[_Decode, _Encode]:
    """Build (decode-check, encode) functions for one annotated type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is bool:
        return _exact(bool, "bool"), _identity
    if tp is int:
        return _exact(int, "int"), _identity
    if tp is float:
        return _check_float, _identity
    if tp is str:
        return _exact(str, "str"), _identity
    if tp is bytes:
        return _exact(bytes, "bytes"), _identity
    if tp is PeerId:
        return _check_peer_id, _encode_peer_id
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1 or len(args) != 2:
            raise TypeError(f"{owner.__name__}: only `X | None` unions are supported")
        dec, enc = _compile(inner[0], owner)

        def dec_opt(value: object, limits: WireLimits, path: str) -> object:
            return None if value is None else dec(value, limits, path)

        def enc_opt(value: object) -> object:
            return None if value is None else enc(value)

        return dec_opt, enc_opt
    if origin is tuple:
        if len(args) != 2 or args[1] is not Ellipsis:
            raise TypeError(f"{owner.__name__}: only tuple[X, ...] is supported")
        dec_e, enc_e = _compile(args[0], owner)

        def dec_tuple(value: object, limits: WireLimits, path: str) -> object:
            if type(value) is not tuple:
                raise _FieldError(path, f"expected array, got {type(value).__name__}")
            if len(value) > limits.max_collection_len:
                raise _FieldError(path, "array too long")
            return tuple(dec_e(v, limits, f"{path}[{i}]") for i, v in enumerate(value))

        def enc_tuple(value: object) -> object:
            if not isinstance(value, tuple):
                raise TypeError("expected tuple")
            return [enc_e(v) for v in value]

        return dec_tuple, enc_tuple
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        enum_cls = tp
        by_value = {m.value: m for m in enum_cls}
        if not all(type(v) is str for v in by_value):
            raise TypeError(f"{owner.__name__}: enums on the wire must have str values")

        def dec_enum(value: object, limits: WireLimits, path: str) -> object:
            if type(value) is not str:
                raise _FieldError(path, f"expected str, got {type(value).__name__}")
            member = by_value.get(value)
            if member is None:
                raise _FieldError(path, f"unknown {enum_cls.__name__} {value[:40]!r}")
            return member

        def enc_enum(value: object) -> object:
            if not isinstance(value, enum_cls):
                raise TypeError(f"expected {enum_cls.__name__}")
            return value.value

        return dec_enum, enc_enum
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        spec = _struct_spec(tp)

        def dec_struct(value: object, limits: WireLimits, path: str) -> object:
            return _decode_struct(spec, value, limits, path)

        def enc_struct(value: object) -> object:
            return _encode_struct(spec, value)

        return dec_struct, enc_struct
    raise TypeError(f"{owner.__name__}: unsupported wire type {tp!r}")


def _struct_spec(cls: type) -> _StructSpec:
    """Compile (once) the field specs of a frozen, slotted dataclass."""
    cached = _STRUCTS.get(cls)
    if cached is not None:
        return cached
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen or "__slots__" not in cls.__dict__:
        raise TypeError(f"{cls.__name__} must be @dataclass(frozen=True, slots=True)")
    hints = typing.get_type_hints(cls)
    specs: list[_FieldSpec] = []
    for field in dataclasses.fields(cls):
        dec, enc = _compile(hints[field.name], cls)
        has_default = field.default is not dataclasses.MISSING
        factory = field.default_factory
        has_factory = factory is not dataclasses.MISSING
        default: object = field.default if has_default else None
        if callable(factory):
            default = factory()
        specs.append(
            _FieldSpec(
                name=field.name,
                required=not (has_default or has_factory),
                default=default,
                decode=dec,
                encode=enc,
            )
        )
    validate = getattr(cls, "validate", None)
    spec = _StructSpec(cls=cls, fields=tuple(specs), validate=validate)
    _STRUCTS[cls] = spec
    return spec


def _decode_struct(spec: _StructSpec, value: object, limits: WireLimits, path: str) -> object:
    if type(value) is not dict:
        raise _FieldError(path, f"expected map, got {type(value).__name__}")
    if len(value) > limits.max_collection_len:
        raise _FieldError(path, "map too long")
    kwargs: dict[str, object] = {}
    for field in spec.fields:
        if field.name in value:
            kwargs[field.name] = field.decode(value[field.name], limits, f"{path}.{field.name}")
        elif field.required:
            raise _FieldError(f"{path}.{field.name}", "missing required field")
        else:
            kwargs[field.name] = field.default
    try:
        obj = spec.cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise _FieldError(path, str(exc)) from exc
    if spec.validate is not None:
        try:
            spec.validate(obj, limits)
        except ValueError as exc:
            raise _FieldError(path, str(exc)) from exc
    return obj


def _encode_struct(spec: _StructSpec, value: object) -> dict[str, object]:
    if type(value) is not spec.cls:
        raise TypeError(f"expected {spec.cls.__name__}, got {type(value).__name__}")
    return {f.name: f.encode(getattr(value, f.name)) for f in spec.fields}


def _validate_tree(spec: _StructSpec, value: object, limits: WireLimits) -> None:
    """Run ``validate`` hooks of a locally built message and its nested structs."""
    for field in spec.fields:
        _validate_value(getattr(value, field.name), limits)
    if spec.validate is not None:
        spec.validate(value, limits)


def _validate_value(value: object, limits: WireLimits) -> None:
    if isinstance(value, tuple):
        for item in value:
            _validate_value(item, limits)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        nested = _STRUCTS.get(type(value))
        if nested is not None:
            _validate_tree(nested, value, limits)


# --- registry -------------------------------------------------------------------------


def message(name: str, version: int) -> Callable[[type[_M]], type[_M]]:
    """Register a message class under ``(name, version)``.

    Apply it above ``@dataclass(frozen=True, slots=True)``::

        @message("demo.Hello", 1)
        @dataclass(frozen=True, slots=True)
        class Hello(Message):
            text: str

    Raises:
        TypeError: the class is not a frozen slotted dataclass, a field type is not
            supported on the wire, or the ``(name, version)`` is already taken.
    """
    if not name or len(name) > 64 or version < 0:
        raise TypeError("message name must be 1..64 chars and version >= 0")

    def register(cls: type[_M]) -> type[_M]:
        if not issubclass(cls, Message):
            raise TypeError(f"{cls.__name__} must subclass p2p.Message")
        key = (name, version)
        if key in _REGISTRY:
            raise TypeError(f"message {name} v{version} is already registered")
        cls.wire_name = name
        cls.wire_version = version
        _struct_spec(cls)
        _REGISTRY[key] = cls
        return cls

    return register


def registered_messages() -> dict[tuple[str, int], type[Message]]:
    """A copy of the registry (for diagnostics and tests)."""
    return dict(_REGISTRY)


def encode_message(msg: Message, limits: WireLimits = DEFAULT_LIMITS) -> bytes:
    """Encode a registered message, validating it first.

    Raises:
        LocalProtocolError: the message is unregistered or fails validation.
    """
    cls = type(msg)
    spec = _STRUCTS.get(cls)
    if spec is None or _REGISTRY.get((cls.wire_name, cls.wire_version)) is not cls:
        raise LocalProtocolError(f"{cls.__name__} is not a registered message")
    try:
        _validate_tree(spec, msg, limits)
        fields = _encode_struct(spec, msg)
        packed: bytes = msgpack.packb([cls.wire_name, cls.wire_version, fields], use_bin_type=True)
    except (ValueError, TypeError, OverflowError) as exc:
        raise LocalProtocolError(f"invalid {cls.wire_name} v{cls.wire_version}: {exc}") from exc
    if len(packed) > limits.max_frame_bytes:
        raise LocalProtocolError(
            f"{cls.wire_name} is {len(packed)} bytes, over the {limits.max_frame_bytes} limit"
        )
    return packed


# Errors msgpack may raise on hostile input; mapped to RemoteProtocolError.
_MSGPACK_ERRORS: tuple[type[BaseException], ...] = (
    msgpack.UnpackException,
    ValueError,  # includes ExtraData, FormatError, StackError, UnicodeDecodeError
    TypeError,  # unhashable map keys
    OverflowError,
)


def decode_message(data: bytes | memoryview, limits: WireLimits = DEFAULT_LIMITS) -> Message:
    """Decode and fully validate one message.

    Raises:
        RemoteProtocolError: not msgpack, not a message envelope, an unknown
            ``(name, version)``, or any field check failed.
    """
    if len(data) > limits.max_frame_bytes:
        raise RemoteProtocolError("message larger than the frame limit")
    try:
        obj = msgpack.unpackb(
            data,
            raw=False,
            use_list=False,
            strict_map_key=True,
            max_bin_len=limits.max_frame_bytes,
            max_str_len=limits.max_frame_bytes,
            max_array_len=limits.max_collection_len,
            max_map_len=limits.max_collection_len,
            max_ext_len=0,
        )
    except _MSGPACK_ERRORS as exc:
        raise RemoteProtocolError(f"not a msgpack message: {type(exc).__name__}") from exc
    if type(obj) is not tuple or len(obj) != 3:
        raise RemoteProtocolError("message envelope must be [name, version, fields]")
    name, version, fields = obj
    if type(name) is not str or type(version) is not int:
        raise RemoteProtocolError("message envelope has a bad name or version")
    cls = _REGISTRY.get((name, version))
    if cls is None:
        raise RemoteProtocolError(f"unknown message type {name[:64]!r} v{version}")
    try:
        msg = _decode_struct(_STRUCTS[cls], fields, limits, f"{name}v{version}")
    except _FieldError as exc:
        raise RemoteProtocolError(f"invalid message: {exc}") from exc
    return typing.cast(Message, msg)
