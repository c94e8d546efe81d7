"""Activation codecs for the wire: pure functions from tensors to bytes and back.

- `raw`: the tensor's own dtype, byte for byte (exact).
- `fp16`: half precision (2 bytes a value).
- `int8-block`: the flattened tensor cut in blocks of 64 values; each block stores one fp16
  scale (its absolute maximum / 127, rounded *up* to the next fp16 so no value clips) followed,
  after all scales, by the int8 values round(x / scale). Each value is then within scale / 2 of
  the original; a block costs 64 + 2 bytes, about 0.258 of fp32.

Non-finite values are refused on both sides: a NaN that reached a peer would silently poison
every later token, so `encode` raises and `decode` rejects payloads that decode to NaN/inf.
`decode` checks the payload length against dtype and shape, and the element count against a
caller's limit, before it allocates anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sharding._errors import CodecError

CODECS = ("raw", "fp16", "int8-block")
BLOCK = 64
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_FP16_MAX = 65504.0
_NUMPY_FLOATS = (torch.float32, torch.float16)  # numpy has no bfloat16


@dataclass(frozen=True, slots=True)
class Encoded:
    """A tensor on the wire: what it was (`dtype`, `shape`), how it travels, and its bytes."""

    codec: str
    dtype: str
    shape: tuple[int, ...]
    payload: bytes


def payload_size(codec: str, dtype: str, shape: tuple[int, ...]) -> int:
    """Exact payload bytes for a tensor of `dtype` and `shape` under `codec`."""
    if dtype not in DTYPES:
        raise CodecError(f"unsupported dtype {dtype!r}")
    n = math.prod(shape)
    if codec == "raw":
        return n * DTYPES[dtype].itemsize
    if codec == "fp16":
        return 2 * n
    if codec == "int8-block":
        return 2 * -(-n // BLOCK) + n
    raise CodecError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")


def encode(x: torch.Tensor, codec: str) -> Encoded:
    """Encode a floating tensor; raises `CodecError` on NaN/inf or an unknown codec."""
    dtype = _DTYPE_NAMES.get(x.dtype)
    if dtype is None:
        raise CodecError(f"cannot encode a {x.dtype} tensor")
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r} (known: {', '.join(CODECS)})")
    x = x.detach().contiguous().cpu()
    shape = tuple(x.shape)
    if codec == "int8-block":  # its block maxima double as the finite check
        scales, values = _quantize(x.reshape(-1).float().numpy())
        return Encoded(codec, dtype, shape, scales.tobytes() + values.tobytes())
    if not _all_finite(x):
        raise CodecError("refusing to encode non-finite activations (NaN or inf)")
    if codec == "raw":
        payload = _bytes(x)
    else:
        if x.numel() and float(x.abs().max()) > _FP16_MAX:
            raise CodecError("activations exceed the fp16 range")
        payload = _bytes(x.to(torch.float16))
    return Encoded(codec, dtype, shape, payload)


def check_encoded(enc: Encoded, *, max_elements: int = 1 << 26) -> None:
    """Every check `decode` makes, without building the tensor where it can (an `int8-block`
    row passed on unread costs its scales, not a dequantization)."""
    if enc.codec != "int8-block" or DTYPES.get(enc.dtype) == torch.float16:
        decode(enc, max_elements=max_elements)  # values must be read (or may overflow)
        return
    n = _checked_size(enc, max_elements)
    _checked_scales(enc.payload, -(-n // BLOCK))


def _checked_size(enc: Encoded, max_elements: int) -> int:
    """The element count, after checking the shape, the cap and the payload's length."""
    if not all(isinstance(d, int) and d >= 0 for d in enc.shape):
        raise CodecError(f"malformed shape {enc.shape!r}")
    n = math.prod(enc.shape)
    if n > max_elements:
        raise CodecError(f"tensor of {n} elements exceeds the limit of {max_elements}")
    expected = payload_size(enc.codec, enc.dtype, enc.shape)
    if len(enc.payload) != expected:
        raise CodecError(
            f"{enc.codec} payload is {len(enc.payload)} bytes, expected {expected} for "
            f"{enc.dtype} {list(enc.shape)}"
        )
    return n


def _checked_scales(payload: bytes, nb: int) -> np.ndarray:
    """An `int8-block` payload's scales as float32; each must be finite and >= 0."""
    scales = np.frombuffer(payload, dtype=np.float16, count=nb).astype(np.float32)
    # min >= 0 is False for NaN; max < inf rules out inf.
    if nb and not (scales.min() >= 0 and scales.max() < np.inf):
        raise CodecError("int8-block payload has a negative or non-finite scale")
    return scales


def decode(enc: Encoded, *, max_elements: int = 1 << 26) -> torch.Tensor:
    """Decode to a tensor of `enc.dtype` and `enc.shape`, after checking sizes and values."""
    n = _checked_size(enc, max_elements)
    out_dtype = DTYPES[enc.dtype]
    if enc.codec == "int8-block":  # numpy, for the same reason as `_quantize`
        nb = -(-n // BLOCK)
        scales = _checked_scales(enc.payload, nb)
        values = np.frombuffer(enc.payload, dtype=np.int8, offset=2 * nb)
        if n % BLOCK:
            padded = np.zeros(nb * BLOCK, dtype=np.int8)
            padded[:n] = values
            values = padded
        # int8 times float32 is computed in float32: the same products as before the change.
        flat = (values.reshape(nb, BLOCK) * scales[:, None]).reshape(-1)[:n]
        x = torch.from_numpy(flat).to(out_dtype)
        # A finite scale (<= 65504) times an int8 is finite in float32 (and bfloat16); only
        # a float16 result can overflow, so only that one needs the check below.
        if out_dtype == torch.float16 and not _all_finite(x):
            raise CodecError("payload decodes to non-finite values (NaN or inf)")
        return x.reshape(enc.shape)
    x = _tensor(enc.payload, out_dtype if enc.codec == "raw" else torch.float16)
    if not _all_finite(x):
        raise CodecError("payload decodes to non-finite values (NaN or inf)")
    return x.to(out_dtype).reshape(enc.shape)


def _all_finite(x: torch.Tensor) -> bool:
    """No NaN or inf in a CPU tensor. In numpy where it can: wire tensors are a few KB, where
    torch's two operations and a sync cost several times numpy's one call."""
    if x.dtype in _NUMPY_FLOATS and x.device.type == "cpu" and not x.requires_grad:
        return bool(np.isfinite(x.numpy()).all())
    return bool(torch.isfinite(x).all())


def error_bound(x: torch.Tensor) -> torch.Tensor:
    """Per-element bound on `int8-block`'s round-trip error for `x` (flattened): scale / 2."""
    scales, _ = _quantize(x.detach().reshape(-1).float().cpu().numpy())
    n = x.numel()
    return (torch.from_numpy(scales).float()[:, None] / 2).expand(-1, BLOCK).reshape(-1)[:n]


def _quantize(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fp16 scales (one per block) and int8 values for a flat float32 array.

    In numpy: a decode step's activations are a few KB, where torch's per-op dispatch cost
    (tens of microseconds each) would dominate; the float32 operations are the same IEEE ones,
    so the bytes are the same either way. Raises `CodecError` on NaN/inf: a block's maximum
    is non-finite exactly when the block holds a NaN or an inf.
    """
    n = flat.size
    nb = -(-n // BLOCK)
    if n % BLOCK:
        padded = np.zeros(nb * BLOCK, dtype=np.float32)
        padded[:n] = flat
        flat = padded
    blocks = flat.reshape(nb, BLOCK)
    if not nb:
        return np.zeros(0, np.float16), np.zeros(0, np.int8)
    scale = np.abs(blocks).max(axis=1) / np.float32(127.0)
    top = scale.max()
    if not np.isfinite(top):
        raise CodecError("refusing to encode non-finite activations (NaN or inf)")
    if top > _FP16_MAX:
        raise CodecError("activations too large for an fp16 block scale")
    s16 = scale.astype(np.float16)
    # Round the scale up to the next fp16 value where rounding went down, so |x / s| <= 127.
    low = s16.astype(np.float32) < scale
    if low.any():
        s16 = np.where(low, np.nextafter(s16, np.float16(np.inf)), s16)
    s = s16.astype(np.float32)
    s[s == 0] = 1.0  # an all-zero block: any scale gives zeros
    q = np.round(blocks / s[:, None])
    np.clip(q, -127, 127, out=q)
    return s16, q.astype(np.int8).reshape(-1)[:n]


def _bytes(x: torch.Tensor) -> bytes:
    return x.contiguous().view(torch.uint8).numpy().tobytes()


def _tensor(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)
