"""One decode step of one session through a span's blocks, in numpy.

A decode step of one sequence is four matrix-vector products per block and a couple of dozen
small operations between them (norms, rotary embedding, a cache write, attention over one
query, the SwiGLU gate). The products go through numpy's OpenBLAS either way
(`sharding/_model.py`); the small operations, run as torch operators, cost more than the
products' own arithmetic: each one is a trip through torch's dispatcher, a few microseconds
warm and several times that on a node that just woke. Over 4 blocks of the 125M model the
same step took 4.0-4.7 ms here against 5.7-7.1 ms through the torch modules (the products
alone are ~4 ms), and differs from it by rounding only (7e-7 at a scale of 3.7).

It applies to one row with a cache on the CPU in float32 without autograd (`applies`); batches,
prefill, other dtypes and devices, and training keep the torch modules, which remain the
reference (the tests compare the two). The block's parameters are read as numpy views, and
keys and values are written straight into the session's `KVCache` tensors.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from sharding._kvcache import KVCache

if TYPE_CHECKING:
    from sharding._model import Attention, Block, RMSNorm

Array = np.ndarray


def applies(x: torch.Tensor, caches: list[KVCache] | None, block: Block) -> bool:
    """Whether a step `x` (B, T, C) can take the numpy path: one cached row, float32 on the
    CPU, and neither the input nor the weights tracking gradients."""
    w = block.attn.w_qkv
    return (caches is not None and len(caches) == 1 and x.shape[0] == 1 and x.shape[1] == 1
            and x.dtype == torch.float32 and w.dtype == torch.float32
            and x.device.type == "cpu" and w.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)))


def run_blocks(blocks: list[Block], x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               cache: KVCache) -> torch.Tensor:
    """`x` (1, 1, C) through `blocks` (cache layers 0..), at position `cache.length`."""
    h = x.reshape(-1).detach().numpy().copy()  # (C,); never write into the caller's tensor
    c, s = cos.reshape(-1).numpy(), sin.reshape(-1).numpy()  # (D,)
    keys, values = cache.keys.numpy(), cache.values.numpy()  # (L, 1, K, max_length, D)
    position = cache.length
    for layer, block in enumerate(blocks):
        h = h + _attention(block.attn, _norm(block.attn_norm, h), c, s,
                           keys[layer, 0], values[layer, 0], position)
        mlp = block.mlp
        gate, up = np.split(_norm(block.mlp_norm, h) @ _np(mlp.w_gate_up), 2)
        h = h + (gate / (1.0 + np.exp(-gate)) * up) @ _np(mlp.w_down)
    return torch.from_numpy(h).reshape(1, 1, -1)


def _np(t: torch.Tensor) -> Array:
    return t.detach().numpy()


def _norm(norm: RMSNorm, x: Array) -> Array:
    """RMSNorm as the torch module computes it (float32 throughout)."""
    scale = np.float32(1.0) / np.sqrt(np.mean(x * x, dtype=np.float32) + np.float32(norm.eps))
    out: Array = _np(norm.weight) * (x * scale)
    return out


def _rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate (heads, D) by one position's tables (D,): the half-split layout."""
    half = x.shape[-1] // 2
    rotated = np.concatenate((-x[:, half:], x[:, :half]), axis=1)
    out: Array = x * cos + rotated * sin
    return out


def _attention(attn: Attention, h: Array, cos: Array, sin: Array, keys: Array,
               values: Array, position: int) -> Array:
    """Grouped-query attention of one query; writes its key and value at `position`."""
    config = attn.config
    H, K, D = config.num_heads, config.num_kv_heads, config.head_dim
    qkv = h @ _np(attn.w_qkv)
    if attn.b_qkv is not None:
        qkv = qkv + _np(attn.b_qkv)
    q = _rope(qkv[: H * D].reshape(H, D), cos, sin)
    keys[:, position] = _rope(qkv[H * D : (H + K) * D].reshape(K, D), cos, sin)
    values[:, position] = qkv[(H + K) * D :].reshape(K, D)
    window = config.sliding_window
    first = 0 if window is None else max(0, position + 1 - window)
    ks, vs = keys[:, first : position + 1], values[:, first : position + 1]  # (K, S, D)
    scores = (q.reshape(K, H // K, D) @ ks.transpose(0, 2, 1)) * np.float32(1 / math.sqrt(D))
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))  # (K, H/K, S)
    scores /= scores.sum(axis=-1, keepdims=True)
    y = (scores @ vs).reshape(H * D) @ _np(attn.wo)
    if attn.bo is not None:
        y = y + _np(attn.bo)
    out: Array = y
    return out
