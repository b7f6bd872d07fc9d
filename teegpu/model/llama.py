"""The LLaMA forward pass as plain functions on tensors, readable top to bottom.

Every product with a weight matrix goes through `linears`, the one seam: the
trusted engine installs either local weights or a remote GPU server behind it, and
this file never knows which (it imports no sockets).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from teegpu.model.config import ModelConfig, RopeConfig
from teegpu.protocol import Op


class Linears(Protocol):
    """The seam: what multiplies by the served weights (the server, or the trusted side itself)."""

    telemetry: object | None  # an RpcTelemetry when products cross to a server

    def linear(self, op: Op, layer: int, x: torch.Tensor) -> torch.Tensor:
        """x (T, d_in) times the op's weight of that layer, transposed: (T, d_out)."""

    def matmul(self, op: Op, layer: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Batched a @ b for --offload-attention (plaintext Q*K^T and P*V)."""

    def stats(self) -> dict:
        """Running totals (calls, bytes, time breakdown); empty when nothing crosses a wire."""

    def close(self) -> None:
        """Release sockets, threads and pads."""


@dataclass(slots=True)
class TrustedWeights:
    """The weights that never leave the trusted side: token embeddings and the norms."""

    embed: torch.Tensor  # in the file's dtype when that converts exactly (bf16 rows for fp32 activations)
    attn_norm: list[torch.Tensor]
    ffn_norm: list[torch.Tensor]
    final_norm: torch.Tensor


@dataclass(slots=True)
class RopeTables:
    cos: torch.Tensor  # (positions, head_dim)
    sin: torch.Tensor


class KVCache:
    """One sequence's keys and values of every layer, indexed by position (gpt-fast style).
    Allocated uninitialised: pages are only committed as positions are written."""

    def __init__(self, config: ModelConfig, max_positions: int, dtype=torch.float32):
        shape = (config.num_layers, config.num_kv_heads, max_positions, config.head_dim)
        self.k = torch.empty(shape, dtype=dtype)
        self.v = torch.empty(shape, dtype=dtype)
        self.layers = list(zip(self.k.unbind(0), self.v.unbind(0)))  # per-layer views: a decode step indexes less
        self.max_positions = max_positions

    @staticmethod
    def nbytes_for(config: ModelConfig, positions: int, dtype) -> int:
        return 2 * config.num_layers * config.num_kv_heads * positions * config.head_dim * dtype.itemsize

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[1]
        keys, values = self.layers[layer]
        keys[:, start:end] = k
        values[:, start:end] = v
        return keys[:, :end], values[:, :end]


@dataclass(slots=True)
class Segment:
    """One sequence's rows in a packed step: its cache, and the position of its first row."""

    cache: KVCache
    start: int
    length: int


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """In float32 whatever x is, cast back before the weight (as transformers does, so that
    bfloat16 runs round where the reference rounds)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rope_inv_freq(rope: RopeConfig, head_dim: int, freq_factors: torch.Tensor | None = None) -> torch.Tensor:
    """Rotary inverse frequencies, with linear or llama3-style scaling as configured."""
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if freq_factors is not None:  # GGUF stores llama3 scaling as precomputed factors
        return inv / freq_factors.float()
    if rope.rope_type == "linear":
        return inv / rope.factor
    if rope.rope_type == "llama3":
        old_ctx = rope.original_max_position_embeddings
        low_wavelen = old_ctx / rope.low_freq_factor
        high_wavelen = old_ctx / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (old_ctx / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


def rope_tables(config: ModelConfig, max_positions: int, freq_factors=None) -> RopeTables:
    """cos and sin of the float32 angles, by the C library one angle at a time: torch's vectorized
    cos gave other last bits for the same angles now and then (MKL's vector math on an Intel Xeon),
    and every engine of a process must hold the same tables (docs/fidelity.md)."""
    inv = rope_inv_freq(config.rope, config.head_dim, freq_factors)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv).flatten().tolist()
    scale = config.rope.attention_factor

    def table(fn) -> torch.Tensor:
        half = torch.tensor([fn(a) for a in angles], dtype=torch.float64).view(max_positions, -1).float()
        return torch.cat([half, half], dim=-1) * scale
    return RopeTables(table(math.cos), table(math.sin))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (heads, T, head_dim); cos/sin (T, head_dim). HF's rotate-half layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def causal_mask(start: int, t: int) -> torch.Tensor:
    """(t, start + t) boolean mask: query i sees keys up to start + i."""
    keys = torch.arange(start + t)
    return keys[None, :] <= (start + torch.arange(t))[:, None]


def attention(q, k, v, start: int) -> torch.Tensor:
    """q (H, T, D), k/v (Hkv, S, D) with grouped heads; returns (T, H*D).

    Batched 4-D calls and is_causal from position 0 select the kernels transformers uses,
    so that bfloat16 runs round exactly where the reference rounds.
    """
    t = q.shape[1]
    q, k, v = q[None], k[None], v[None]
    if t == 1 or start == 0:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=True)
    else:  # a chunk after cached positions: causal relative to its own start
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(start, t), enable_gqa=True)
    return out[0].transpose(0, 1).reshape(t, -1)


def attention_offloaded(q, k, v, start: int, linears: Linears, layer: int) -> torch.Tensor:
    """The seed's attention: Q*K^T and P*V on the server, softmax and mask here."""
    h, t, d = q.shape
    group = h // k.shape[0]
    k = k.repeat_interleave(group, dim=0)
    v = v.repeat_interleave(group, dim=0)
    scores = linears.matmul(Op.ATTN_SCORES, layer, q, k.transpose(1, 2).contiguous()) / math.sqrt(d)
    if t > 1:
        scores = scores.masked_fill(~causal_mask(start, t), float("-inf"))
    out = linears.matmul(Op.ATTN_CONTEXT, layer, torch.softmax(scores, dim=-1), v)
    return out.transpose(0, 1).reshape(t, -1)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def attend(q, k, v, seg: Segment, layer: int, linears: Linears, offload: bool) -> torch.Tensor:
    """One sequence's attention over its cache: q/k/v (heads, T, D) of its rows; returns (T, H*D)."""
    k, v = seg.cache.update(layer, seg.start, k, v)
    if offload:
        return attention_offloaded(q, k, v, seg.start, linears, layer)
    return attention(q, k, v, seg.start)


def decoder_layer(x, i: int, cfg: ModelConfig, tw: TrustedWeights, cos, sin, linears: Linears,
                  segments: list[Segment], offload_attention: bool = False) -> torch.Tensor:
    """x (N, hidden): the packed rows of every sequence; products batched, attention per sequence."""
    n = x.shape[0]
    h = rms_norm(x, tw.attn_norm[i], cfg.rms_norm_eps)
    qkv = linears.linear(Op.QKV, i, h)
    q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
    q = q.view(n, cfg.num_heads, cfg.head_dim).transpose(0, 1)
    k = k.view(n, cfg.num_kv_heads, cfg.head_dim).transpose(0, 1)
    v = v.view(n, cfg.num_kv_heads, cfg.head_dim).transpose(0, 1)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    parts, row = [], 0
    for seg in segments:
        rows = slice(row, row + seg.length)
        parts.append(attend(q[:, rows], k[:, rows], v[:, rows], seg, i, linears, offload_attention))
        row += seg.length
    a = parts[0] if len(parts) == 1 else torch.cat(parts)
    x = x + linears.linear(Op.O, i, a)
    h = rms_norm(x, tw.ffn_norm[i], cfg.rms_norm_eps)
    return x + linears.linear(Op.DOWN, i, swiglu(linears.linear(Op.GATE_UP, i, h)))


def forward(ids: torch.Tensor, segments: list[Segment], cfg: ModelConfig, tw: TrustedWeights, rope: RopeTables,
            linears: Linears, logit_rows: list[int] | None = None, offload_attention: bool = False) -> torch.Tensor:
    """Logits for packed rows: ids (N,) are the segments' tokens one after another, each segment
    at its own positions. Returns the logits of `logit_rows` (all rows when None)."""
    positions = torch.cat([torch.arange(s.start, s.start + s.length) for s in segments])
    cos, sin = rope.cos[positions], rope.sin[positions]
    x = tw.embed[ids].to(tw.final_norm.dtype)
    for i in range(cfg.num_layers):
        x = decoder_layer(x, i, cfg, tw, cos, sin, linears, segments, offload_attention)
    if logit_rows is not None:
        if not logit_rows:  # a step of prompt chunks that finish no prompt: no LM head round trip
            return x.new_empty(0, cfg.vocab_size)
        x = x[logit_rows]
    return linears.linear(Op.LM_HEAD, -1, rms_norm(x, tw.final_norm, cfg.rms_norm_eps))
