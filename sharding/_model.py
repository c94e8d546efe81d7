"""The decoder itself, in plain torch: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Each stage of a model is one module here: `Embedding` (stage 0), `Block` (stages 1..L) and
`Head` (stage L+1). Weights are held the way a lean decode loop wants them: fused (one
query/key/value matrix, one gate/up matrix), so a decode step is four matrix-vector products per
block, and transposed to (in, out), because on CPUs `x @ W` over an (in, out) matrix streams
memory 1.3-1.4x faster than `F.linear` over the checkpoint's (out, in) layout when the weights
come from DRAM (decode is bound by exactly that). `weights()` converts back to the checkpoint's
separate (out, in) tensors.

Which kernel runs a product depends on its rows, because on CPUs no one kernel is good at both
(measured on this project's 2-core AMD EPYC machine, 4 blocks of the 125M model):

* one row (a decode step of one session): numpy's OpenBLAS `gemv` over the (in, out) matrix,
  15-30% faster than torch's MKL path, which is 10-25% faster than oneDNN's; with a cache, on
  the CPU in float32, the whole step skips these modules and runs in numpy (`sharding/_row.py`,
  the small operations between the products cost less there), against the same weights;
* several rows (a batch of sessions, a prefill): oneDNN with the matrix `pack()`ed into its
  blocked layout (`torch.ops.mkldnn`, what torch's compiler uses for frozen linears), when the
  span holds that second copy. MKL's small-M kernels are poor on these cores (2 rows cost 1.8x
  one row, 8 rows 2.7x); packed, 8 rows cost 1.3x one row, prefill runs 1.3-1.6x faster, and
  each row's result does not depend on the other rows of the batch. Without the copy, torch's
  matmul runs them.

The packed copy doubles the weights' memory, so it is a choice (`Span.load(pack=...)`; a node
makes it from its memory budget). It cannot be trained, so a training model never packs.

Shapes: B = batch (sessions), T = new tokens, S = cached + new positions, C = hidden size,
H = query heads, K = key/value heads, D = head dim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sharding import _pages as pages
from sharding._config import ModelConfig, RopeScaling
from sharding._kvcache import KVCache


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 like the reference implementation."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=weight.is_floating_point())
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """RoPE's inverse frequencies (D/2,), with linear or Llama-3 scaling applied."""
    dim = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv
    if scaling.kind == "linear":
        return inv / scaling.factor
    return _llama3_scaling(inv, scaling)


def _llama3_scaling(inv: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Llama 3.1's rule: slow frequencies divided by `factor`, fast kept, a blend between."""
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (B, 1, T, D) for integer `positions` of shape (B, T)."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq  # (B, T, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, D) by the position tables; the half-split (GPT-NeoX) layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention_mask(
    num_new: int, num_keys: int, position: int, window: int | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean (T, S) mask for queries at `position..position+T` over keys `0..S`, or None.

    None means every key is visible (a single decode token inside the window), which lets
    attention skip the mask entirely.
    """
    if num_new == 1 and (window is None or num_keys <= window):
        return None
    q_pos = torch.arange(position, position + num_new, device=device)[:, None]
    k_pos = torch.arange(num_keys, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
            packed: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ w (+ b)` for a weight stored (in, out): (B, T, in) -> (B, T, out).

    `packed` is the same matrix in oneDNN's layout (see the module docstring for the kernels).
    """
    rows = x.numel() // x.shape[-1]
    if packed is not None and rows > 1:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, packed, b, "none", [], "")
        return out
    if rows == 1 and _numpy_gemv(x, w):
        y = torch.from_numpy(x.reshape(1, -1).numpy() @ w.numpy())
        y = y.reshape(*x.shape[:-1], w.shape[1])
    else:
        y = torch.matmul(x, w)
    return y if b is None else y + b


def _numpy_gemv(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether a one-row product can go through numpy: float32 on the CPU, no autograd."""
    return (x.device.type == "cpu" and w.device.type == "cpu"
            and x.dtype == torch.float32 and w.dtype == torch.float32
            and not (x.requires_grad or w.requires_grad))


def transposed(w: torch.Tensor) -> torch.Tensor:
    """A checkpoint's (out, in) matrix as a contiguous (in, out) one; on the CPU, on huge
    pages where the system has them (`sharding/_pages.py`: decode streams these matrices)."""
    if w.device.type != "cpu" or w.requires_grad:
        return w.t().contiguous()
    out = pages.empty((w.shape[1], w.shape[0]), w.dtype)
    out.copy_(w.t())
    return out


# The batch size oneDNN lays the packed weights out for: decode batches are 1-8 rows. Laid out
# for 8, eight rows cost 1.3x one row (measured on 4 blocks of the 125M model, one thread);
# laid out for 1, they cost 2x, for one row 1% less.
_PACK_ROWS = 8


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `pack()` applies: float32 on a CPU with oneDNN's linear kernels in this torch."""
    return (device.type == "cpu" and dtype == torch.float32
            and bool(torch._C._has_mkldnn)
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def packed(w: torch.Tensor) -> torch.Tensor:
    """A copy of an (in, out) matrix in oneDNN's blocked layout for linear."""
    out: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(transposed(w.detach()),
                                                                _PACK_ROWS)
    return out


class Attention(nn.Module):
    """Grouped-query self-attention with a fused QKV projection (weights stored (in, out))."""

    def __init__(self, config: ModelConfig, w_qkv: torch.Tensor, b_qkv: torch.Tensor | None,
                 wo: torch.Tensor, bo: torch.Tensor | None) -> None:
        super().__init__()
        self.config = config
        self.w_qkv = nn.Parameter(w_qkv)
        self.b_qkv = None if b_qkv is None else nn.Parameter(b_qkv)
        self.wo = nn.Parameter(wo)
        self.bo = None if bo is None else nn.Parameter(bo)
        self.p_qkv: torch.Tensor | None = None  # packed copies (`pack`)
        self.p_o: torch.Tensor | None = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
        caches: Sequence[KVCache] | None,
    ) -> torch.Tensor:
        c = self.config
        B, T, _ = x.shape
        H, K, D = c.num_heads, c.num_kv_heads, c.head_dim
        qkv = project(x, self.w_qkv, self.b_qkv, self.p_qkv)  # (B, T, (H + 2K) * D)
        q, k, v = torch.split(qkv, [H * D, K * D, K * D], dim=-1)
        q = apply_rope(q.view(B, T, H, D).transpose(1, 2), cos, sin)  # (B, H, T, D)
        k = apply_rope(k.view(B, T, K, D).transpose(1, 2), cos, sin)  # (B, K, T, D)
        v = v.view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        if caches is None:  # a whole sequence from position 0, no cache (training, oracle)
            y = self._attend(q, k, v, 0)
        else:
            outs = []
            for b, cache in enumerate(caches):
                pos = cache.length
                keys, values = cache.write(layer, pos, k[b : b + 1], v[b : b + 1])  # (1,K,S,D)
                outs.append(self._attend(q[b : b + 1], keys, values, pos))
            y = outs[0] if B == 1 else torch.cat(outs)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H * D)
        return project(y, self.wo, self.bo, self.p_o)  # (B, T, C)

    def pack(self) -> None:
        self.p_qkv, self.p_o = packed(self.w_qkv), packed(self.wo)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: int) -> torch.Tensor:
        T, S = q.shape[2], k.shape[2]
        window = self.config.sliding_window
        gqa = self.config.num_heads != self.config.num_kv_heads
        if pos == 0 and T == S and (window is None or window >= S):
            return F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        mask = attention_mask(T, S, pos, window, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class MLP(nn.Module):
    """SwiGLU feed-forward with a fused gate/up projection."""

    def __init__(self, w_gate_up: torch.Tensor, w_down: torch.Tensor) -> None:
        super().__init__()
        self.w_gate_up = nn.Parameter(w_gate_up)
        self.w_down = nn.Parameter(w_down)
        self.p_gate_up: torch.Tensor | None = None  # packed copies (`pack`)
        self.p_down: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.w_gate_up, packed=self.p_gate_up).chunk(2, dim=-1)  # (B,T,I)
        return project(F.silu(gate) * up, self.w_down, packed=self.p_down)  # (B, T, C)

    def pack(self) -> None:
        self.p_gate_up, self.p_down = packed(self.w_gate_up), packed(self.w_down)


class Block(nn.Module):
    """One decoder block: pre-norm attention and pre-norm SwiGLU, each with a residual."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        w = weights
        bias = (
            torch.cat((w["bq"], w["bk"], w["bv"])) if config.qkv_bias else None
        )
        self.attn_norm = RMSNorm(w["attn_norm"], config.rms_norm_eps)
        self.attn = Attention(config, transposed(torch.cat((w["wq"], w["wk"], w["wv"]))), bias,
                              transposed(w["wo"]), w.get("bo"))
        self.mlp_norm = RMSNorm(w["mlp_norm"], config.rms_norm_eps)
        self.mlp = MLP(transposed(torch.cat((w["w_gate"], w["w_up"]))), transposed(w["w_down"]))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int,
        caches: Sequence[KVCache] | None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, layer, caches)  # (B, T, C)
        out: torch.Tensor = x + self.mlp(self.mlp_norm(x))  # (B, T, C)
        return out

    def pack(self) -> None:
        """Inference only: add oneDNN copies of the matrices (see the module docstring)."""
        self.attn.pack()
        self.mlp.pack()

    @property
    def packed(self) -> bool:
        return self.attn.p_qkv is not None

    def weights(self) -> dict[str, torch.Tensor]:
        """The block's tensors under our logical names, split back into checkpoint shapes."""
        c = self.attn.config
        sizes = [c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim,
                 c.num_kv_heads * c.head_dim]
        qkv = torch.split(self.attn.w_qkv.detach().t(), sizes)
        out = dict(zip(("wq", "wk", "wv"), qkv, strict=True))
        if self.attn.b_qkv is not None:
            bias = torch.split(self.attn.b_qkv.detach(), sizes)
            out |= zip(("bq", "bk", "bv"), bias, strict=True)
        if self.attn.bo is not None:
            out["bo"] = self.attn.bo.detach()
        gate, up = self.mlp.w_gate_up.detach().t().chunk(2)
        out |= {
            "attn_norm": self.attn_norm.weight.detach(), "wo": self.attn.wo.detach().t(),
            "mlp_norm": self.mlp_norm.weight.detach(), "w_gate": gate, "w_up": up,
            "w_down": self.mlp.w_down.detach().t(),
        }
        return out


class Embedding(nn.Module):
    """Stage 0: token ids (B, T) to hidden states (B, T, C)."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.embed = nn.Parameter(weights["embed"])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = F.embedding(ids, self.embed)  # (B, T, C)
        return out

    def weights(self) -> dict[str, torch.Tensor]:
        return {"embed": self.embed.detach()}


class Head(nn.Module):
    """Stage L+1: final norm and LM head, hidden states (B, T, C) to logits (B, T, V)."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor],
                 tied: nn.Parameter | None = None) -> None:
        super().__init__()
        self.norm = RMSNorm(weights["norm"], config.rms_norm_eps)
        # A tied head shares the embedding's (V, C) parameter when training both in one module;
        # otherwise the head holds its own (C, V) copy for the faster (in, out) product.
        self.tied = tied
        self.lm_head = nn.Parameter(transposed(weights["lm_head"])) if tied is None else None
        self.p_head: torch.Tensor | None = None  # packed copy (`pack`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return project(self.norm(x), self.lm_head, packed=self.p_head)  # (B, T, V)
        if self.tied is None:  # pragma: no cover - one of the two is always set
            raise RuntimeError("head has no weights")
        out: torch.Tensor = F.linear(self.norm(x), self.tied)  # (B, T, V)
        return out

    def pack(self) -> None:
        """Inference only: add a oneDNN copy of the LM head (a tied head is left as it is)."""
        if self.lm_head is not None:
            self.p_head = packed(self.lm_head)

    def weights(self) -> dict[str, torch.Tensor]:
        head = self.lm_head.detach().t() if self.lm_head is not None else self.tied
        if head is None:  # pragma: no cover
            raise RuntimeError("head has no weights")
        return {"norm": self.norm.weight.detach(), "lm_head": head.detach()}
