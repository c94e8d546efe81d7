"""Tensors on the wire, as plain bytes (no torch here).

A tensor travels as ``{dtype, shape, codec, payload}`` (DESIGN.md, "Wire"). The p2p
layer never interprets the numbers; it only checks that the header is sane and that
the payload has exactly the size the header implies, so the receiver can hand the
bytes to ``torch.frombuffer`` without another check:

* ``raw``: ``n * itemsize(dtype)`` bytes;
* ``fp16``: ``n * 2`` bytes (``dtype`` names the dtype to restore);
* ``int8-block``: ``n`` int8 values followed by one fp16 absmax scale per block of
  :data:`INT8_BLOCK` values, i.e. ``n + 2 * ceil(n / 64)`` bytes.

Element counts are capped by :attr:`WireLimits.max_tensor_elements`.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2p._messages import WireLimits

__all__ = ["Tensor", "TENSOR_DTYPES", "TENSOR_CODECS", "INT8_BLOCK", "tensor_payload_bytes"]

# dtype name -> bytes per element (names as torch spells them, without "torch.").
TENSOR_DTYPES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "bool": 1,
}
INT8_BLOCK = 64
TENSOR_CODECS = ("raw", "fp16", "int8-block")
MAX_NDIM = 8


def tensor_payload_bytes(dtype: str, shape: tuple[int, ...], codec: str) -> int:
    """The exact payload size for a header.

    Raises:
        ValueError: unknown dtype or codec, or a negative dimension.
    """
    if dtype not in TENSOR_DTYPES:
        raise ValueError(f"unknown tensor dtype {dtype[:32]!r}")
    if any(d < 0 for d in shape):
        raise ValueError("tensor dimensions must be >= 0")
    n = 1
    for d in shape:
        n *= d
    if codec == "raw":
        return n * TENSOR_DTYPES[dtype]
    if codec == "fp16":
        return n * 2
    if codec == "int8-block":
        return n + 2 * (-(-n // INT8_BLOCK))
    raise ValueError(f"unknown tensor codec {codec[:32]!r}")


@dataclass(frozen=True, slots=True)
class Tensor:
    """A tensor header plus its raw payload bytes.

    Attributes:
        dtype: element type name (a key of :data:`TENSOR_DTYPES`).
        shape: dimensions, outermost first.
        codec: payload encoding (one of :data:`TENSOR_CODECS`).
        payload: the encoded bytes (size checked against the header).
    """

    dtype: str
    shape: tuple[int, ...]
    codec: str
    payload: bytes

    @property
    def numel(self) -> int:
        """Number of elements the header describes."""
        n = 1
        for d in self.shape:
            n *= d
        return n

    def validate(self, limits: WireLimits) -> None:
        """Check the header against the limits and the payload size.

        Raises:
            ValueError: too many dims or elements, unknown dtype/codec, or a payload
                whose size does not match the header.
        """
        if len(self.shape) > MAX_NDIM:
            raise ValueError(f"tensor has more than {MAX_NDIM} dimensions")
        if any(d < 0 for d in self.shape):
            raise ValueError("tensor dimensions must be >= 0")
        if self.numel > limits.max_tensor_elements:
            raise ValueError(
                f"tensor has {self.numel} elements, over the {limits.max_tensor_elements} cap"
            )
        expected = tensor_payload_bytes(self.dtype, self.shape, self.codec)
        if len(self.payload) != expected:
            raise ValueError(
                f"tensor payload is {len(self.payload)} bytes, header implies {expected}"
            )
