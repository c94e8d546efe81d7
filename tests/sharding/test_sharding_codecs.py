"""Activation codecs: sizes, error bounds, exactness, and refusal of bad values or payloads."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sharding import (
    BLOCK,
    CODECS,
    CodecError,
    Encoded,
    check_encoded,
    decode,
    encode,
    error_bound,
    payload_size,
)

shapes = st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple)
finite = st.floats(min_value=-1e5, max_value=1e5, allow_nan=False, width=32)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    shape = draw(shapes)
    n = math.prod(shape)
    values = draw(st.lists(finite, min_size=n, max_size=n))
    scale = draw(st.sampled_from([1e-6, 1.0, 50.0]))
    return torch.tensor(values, dtype=torch.float32).reshape(shape) * scale


@pytest.mark.parametrize("hidden", [256, 768, 4096])
@pytest.mark.parametrize("tokens", [1, 7])
def test_int8_block_is_under_27_percent_of_fp32(hidden: int, tokens: int) -> None:
    x = torch.randn(1, tokens, hidden)
    enc = encode(x, "int8-block")
    assert len(enc.payload) <= 0.27 * x.numel() * 4
    assert len(enc.payload) == payload_size("int8-block", "float32", enc.shape)


@settings(max_examples=300, deadline=None)
@given(x=tensors())
def test_int8_block_round_trip_within_the_per_block_bound(x: torch.Tensor) -> None:
    y = decode(encode(x, "int8-block"))
    assert y.shape == x.shape and y.dtype == x.dtype
    err = (y - x).abs().reshape(-1)
    bound = error_bound(x) * (1 + 1e-6) + 1e-30
    assert bool((err <= bound).all())
    # The bound is tight enough to matter: half a step of absmax / 127 per block (the scale is
    # rounded up to an fp16 value: one fp16 step at most, 2**-24 among subnormals).
    blocks = torch.nn.functional.pad(x.reshape(-1).abs(), (0, -x.numel() % BLOCK))
    absmax = blocks.view(-1, BLOCK).amax(1)
    assert bool((error_bound(x).view(-1)[::BLOCK] <= absmax / 127 * 0.5 * 1.001 + 2**-25).all())


@settings(max_examples=200, deadline=None)
@given(x=tensors(), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_raw_is_exact_in_every_dtype(x: torch.Tensor, dtype: torch.dtype) -> None:
    x = x.clamp(-6e4, 6e4).to(dtype)
    assert torch.equal(decode(encode(x, "raw")), x)


@settings(max_examples=200, deadline=None)
@given(x=tensors())
def test_fp16_matches_a_half_precision_cast(x: torch.Tensor) -> None:
    x = x.clamp(-6e4, 6e4)
    assert torch.equal(decode(encode(x, "fp16")), x.half().float())


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_activations_are_refused(codec: str, bad: float) -> None:
    x = torch.randn(2, 70)
    x[1, 5] = bad
    with pytest.raises(CodecError, match="non-finite"):
        encode(x, codec)


@settings(max_examples=300, deadline=None)
@given(codec=st.sampled_from(CODECS), dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
       shape=shapes, data=st.data())
def test_decoding_random_payloads_never_yields_non_finite_values(
    codec: str, dtype: str, shape: tuple[int, ...], data: st.DataObject
) -> None:
    size = payload_size(codec, dtype, shape)
    payload = data.draw(st.binary(min_size=size, max_size=size))
    try:
        y = decode(Encoded(codec, dtype, shape, payload))
    except CodecError:
        return
    assert bool(torch.isfinite(y).all())


@settings(max_examples=300, deadline=None)
@given(codec=st.sampled_from(CODECS), dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
       shape=shapes, cut=st.integers(0, 2), data=st.data())
def test_checking_without_decoding_refuses_exactly_what_decoding_refuses(
    codec: str, dtype: str, shape: tuple[int, ...], cut: int, data: st.DataObject
) -> None:
    """`check_encoded` (which skips the dequantization) agrees with `decode` on every payload:
    random bytes (NaN, inf and negative scales among them), and lengths cut short."""
    size = payload_size(codec, dtype, shape)
    payload = data.draw(st.binary(min_size=size, max_size=size))[: max(0, size - cut)]
    enc = Encoded(codec, dtype, shape, payload)
    try:
        decode(enc, max_elements=40)
    except CodecError:
        with pytest.raises(CodecError):
            check_encoded(enc, max_elements=40)
    else:
        check_encoded(enc, max_elements=40)


@pytest.mark.parametrize("codec", CODECS)
def test_nan_payloads_are_rejected(codec: str) -> None:
    enc = encode(torch.ones(64), codec)
    nan16 = torch.tensor([math.nan], dtype=torch.float16).view(torch.uint8).numpy().tobytes()
    nan32 = torch.tensor([math.nan]).view(torch.uint8).numpy().tobytes()
    payload = (nan32 if codec == "raw" else nan16) + enc.payload[len(nan32 if codec == "raw"
                                                                      else nan16):]
    with pytest.raises(CodecError, match="non-finite"):
        decode(Encoded(codec, "float32", (64,), payload))


def test_an_int8_block_payload_too_large_for_float16_is_refused() -> None:
    """A valid scale (65504) times 127 overflows a float16 result: refused, not inf."""
    payload = torch.tensor([65504.0], dtype=torch.float16).view(torch.uint8).numpy().tobytes()
    payload += bytes([127]) * 64
    with pytest.raises(CodecError, match="non-finite"):
        decode(Encoded("int8-block", "float16", (64,), payload))
    assert bool(torch.isfinite(decode(Encoded("int8-block", "float32", (64,), payload))).all())


def test_payload_length_and_limits_are_checked_before_allocation() -> None:
    enc = encode(torch.randn(4, 64), "int8-block")
    with pytest.raises(CodecError, match="expected"):
        decode(Encoded(enc.codec, enc.dtype, enc.shape, enc.payload[:-1]))
    with pytest.raises(CodecError, match="exceeds the limit"):
        decode(Encoded("raw", "float32", (1 << 20, 1 << 20), b""), max_elements=1 << 20)
    with pytest.raises(CodecError, match="unknown codec"):
        decode(Encoded("zstd", "float32", (1,), b"\0" * 4))
    with pytest.raises(CodecError, match="dtype"):
        decode(Encoded("raw", "int64", (1,), b"\0" * 8))
    with pytest.raises(CodecError, match="shape"):
        decode(Encoded("raw", "float32", (-1,), b""))


def test_extreme_magnitudes() -> None:
    tiny = torch.full((64,), 1e-9)
    assert (decode(encode(tiny, "int8-block")) - tiny).abs().max() <= error_bound(tiny).max()
    with pytest.raises(CodecError, match="too large"):
        encode(torch.full((64,), 1e8), "int8-block")
    with pytest.raises(CodecError, match="fp16 range"):
        encode(torch.full((3,), 1e6), "fp16")
    zeros = torch.zeros(130)
    assert torch.equal(decode(encode(zeros, "int8-block")), zeros)


@pytest.mark.parametrize("codec", CODECS)
def test_an_empty_tensor_round_trips(codec: str) -> None:
    enc = encode(torch.zeros(1, 0, 8), codec)
    assert enc.payload == b""
    assert decode(enc).shape == (1, 0, 8)
