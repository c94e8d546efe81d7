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
    if not _all_finite(x):
        raise CodecError("refusing to encode non-finite activations (NaN or inf)")
    shape = tuple(x.shape)
    if codec == "raw":
        payload = _bytes(x)
    elif codec == "fp16":
        if x.numel() and float(x.abs().max()) > _FP16_MAX:
            raise CodecError("activations exceed the fp16 range")
        payload = _bytes(x.to(torch.float16))
    else:
        scales, values = _quantize(x.reshape(-1).float())
        payload = _bytes(scales) + _bytes(values)
    return Encoded(codec, dtype, shape, payload)


def decode(enc: Encoded, *, max_elements: int = 1 << 26) -> torch.Tensor:
    """Decode to a tensor of `enc.dtype` and `enc.shape`, after checking sizes and values."""
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
    out_dtype = DTYPES[enc.dtype]
    if enc.codec == "int8-block":  # numpy, for the same reason as `_quantize`
        nb = -(-n // BLOCK)
        scales = np.frombuffer(enc.payload, dtype=np.float16, count=nb).astype(np.float32)
        if not np.isfinite(scales).all() or (scales < 0).any():
            raise CodecError("int8-block payload has a negative or non-finite scale")
        values = np.zeros(nb * BLOCK, dtype=np.float32)
        values[:n] = np.frombuffer(enc.payload, dtype=np.int8, offset=2 * nb)
        # A finite scale (<= 65504) times an int8 is finite in float32 (and bfloat16); only
        # a float16 result can overflow, so only that one needs the check below.
        x = torch.from_numpy((values.reshape(nb, BLOCK) * scales[:, None]).reshape(-1)[:n])
        x = x.to(out_dtype)
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
    scales, _ = _quantize(x.detach().reshape(-1).float().cpu())
    n = x.numel()
    return (scales.float()[:, None] / 2).expand(-1, BLOCK).reshape(-1)[:n]


def _quantize(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scales (one per block) and int8 values for a flat fp32 tensor.

    In numpy: a decode step's activations are a few KB, where torch's per-op dispatch cost
    (tens of microseconds each) would dominate; the float32 operations are the same IEEE ones,
    so the bytes are the same either way.
    """
    arr = flat.numpy()
    n = arr.size
    nb = -(-n // BLOCK)
    padded = np.zeros(nb * BLOCK, dtype=np.float32)
    padded[:n] = arr
    blocks = padded.reshape(nb, BLOCK)
    scale = np.abs(blocks).max(axis=1) / np.float32(127.0) if nb else np.zeros(0, np.float32)
    if nb and float(scale.max()) > _FP16_MAX:
        raise CodecError("activations too large for an fp16 block scale")
    s16 = scale.astype(np.float16)
    # Round the scale up to the next fp16 value where rounding went down, so |x / s| <= 127.
    bits = s16.view(np.int16)
    s16 = np.where(s16.astype(np.float32) < scale, bits + np.int16(1), bits).astype(
        np.int16).view(np.float16)
    s = s16.astype(np.float32)
    safe = np.where(s > 0, s, np.float32(1.0))
    q = np.clip(np.round(blocks / safe[:, None]), -127, 127).astype(np.int8)
    return torch.from_numpy(s16), torch.from_numpy(q.reshape(-1)[:n].copy())


def _bytes(x: torch.Tensor) -> bytes:
    return x.contiguous().view(torch.uint8).numpy().tobytes()


def _tensor(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)
