"""The model's tensors, by canonical name, fused the way the server serves them (q|k|v, gate|up).

Nothing is held: `ModelWeights` knows where each tensor lies in the model's files, and each side
reads only what it keeps, in the dtype it keeps it in, a block of rows at a time. The trusted
side reads the embeddings and norms; the server, the linear weights.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterator

import torch

from teegpu.errors import ModelLoadError
from teegpu.model.config import ModelConfig
from teegpu.model.tensor_files import StoredTensor, read_rows, row_blocks
from teegpu.protocol import Op

LINEAR_NAMES = ("qkv", "o", "gate_up", "down")
WEIGHT_OF_OP = {Op.QKV: "qkv", Op.O: "o", Op.GATE_UP: "gate_up", Op.DOWN: "down", Op.LM_HEAD: "lm_head"}


@dataclass(slots=True)
class ModelWeights:
    config: ModelConfig
    tensors: dict[str, list[StoredTensor]]  # canonical name -> parts stacked along dim 0
    fingerprint: str = ""

    @classmethod
    def from_files(cls, config: ModelConfig, tensors: dict[str, list[StoredTensor]], fingerprint: str | None = None,
                   compute: bool = True):
        """Check every tensor's shape against the config (headers only); the fingerprint is computed
        (one pass over the linear weights) unless a cache knows it or `compute` is off (a
        tensor-parallel rank other than 0, which reads only its own slices)."""
        weights = cls(config, tensors)
        for name, shape in weights.expected_shapes().items():
            weights._check_shape(name, shape)
        weights.fingerprint = fingerprint or (compute_fingerprint(weights) if compute else "")
        return weights

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        c, h = self.config, self.config.hidden_size
        shapes = {"embed": (c.vocab_size, h), "final_norm": (h,)}
        if not c.tie_word_embeddings:
            shapes["lm_head"] = c.linear_shapes()["lm_head"]
        for i in range(c.num_layers):
            shapes |= {f"layers.{i}.attn_norm": (h,), f"layers.{i}.ffn_norm": (h,)}
            shapes |= {f"layers.{i}.{n}": c.linear_shapes()[n] for n in LINEAR_NAMES}
        return shapes

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        parts = self.tensors.get(name)
        if not parts:
            raise ModelLoadError(f"model file has no tensor for {name}")
        got = (sum(p.shape[0] for p in parts), *parts[0].shape[1:]) if parts[0].shape else ()
        if any(p.shape[1:] != parts[0].shape[1:] for p in parts) or got != shape:
            raise ModelLoadError(f"tensor {name} has shape {[p.shape for p in parts]}, config implies {shape}")

    def read(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return read_rows(self.tensors[name], dtype)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def weight_name(self, op: Op, layer: int) -> str:
        name = WEIGHT_OF_OP[op]
        if name == "lm_head":
            return "embed" if self.config.tie_word_embeddings else "lm_head"
        return f"layers.{layer}.{name}"

    def shape(self, op: Op) -> tuple[int, int]:
        """(out, in) of the weight an op multiplies by."""
        return self.config.linear_shapes()[WEIGHT_OF_OP[op]]

    def for_op(self, op: Op, layer: int, dtype: torch.dtype = torch.float32,
               rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The (out, in) weight a linear op multiplies by (layer -1 for the LM head), read now:
        only its rows [start, end) when `rows` is given."""
        return read_rows(self.tensors[self.weight_name(op, layer)], dtype, rows)

    def blocks(self, op: Op, layer: int, dtype: torch.dtype = torch.float32,
               rows: tuple[int, int] | None = None) -> Iterator[torch.Tensor]:
        """The same weight (or its rows [start, end)) as blocks of rows, for converting it without a
        full-size temporary."""
        return row_blocks(self.tensors[self.weight_name(op, layer)], dtype, rows)

    def served_keys(self) -> list[tuple[Op, int]]:
        """(op, layer) of every product the server computes, in serving order."""
        layers = [(op, i) for i in range(self.config.num_layers) for op in (Op.QKV, Op.O, Op.GATE_UP, Op.DOWN)]
        return layers + [(Op.LM_HEAD, -1)]

    def served_shapes(self) -> dict[tuple[Op, int], tuple[int, int]]:
        """{(op, layer): (out, in)} of every served weight, from the config."""
        return {(op, layer): self.shape(op) for op, layer in self.served_keys()}

    def served(self, dtype: torch.dtype = torch.float32, part: tuple[int, int] = (0, 1)
               ) -> Iterator[tuple[tuple[Op, int], torch.Tensor]]:
        """Each served weight in turn, read when asked for: one at a time in memory. With `part`
        (rank, ranks) only the rows that tensor-parallel rank holds (`column_slice`)."""
        for key in self.served_keys():
            yield key, self.for_op(*key, dtype=dtype, rows=column_slice(self.shape(key[0])[0], *part))


COLUMN_BLOCK = 64  # tensor-parallel slices start at multiples of this many columns


def column_slice(d_out: int, rank: int, ranks: int) -> tuple[int, int]:
    """The rows [start, end) of an (out, in) weight, so the columns of its product, that
    tensor-parallel rank `rank` of `ranks` holds. Slices start at multiples of COLUMN_BLOCK: a CPU
    kernel computes a column in a vector lane fixed by its place in a block, and a slice cut
    elsewhere (43 columns) sums some columns in another order than the whole product (measured:
    cuts at multiples of 4 or 8 columns differed, 16 and up never). Blocks are shared as evenly
    as can be, the larger shares first, so rank 0's slice is never smaller than another's; a
    weight of fewer blocks than ranks leaves the last ranks none."""
    blocks = -(-d_out // COLUMN_BLOCK)
    size, extra = divmod(blocks, ranks)
    first = rank * size + min(rank, extra)
    last = first + size + (rank < extra)
    return min(first * COLUMN_BLOCK, d_out), min(last * COLUMN_BLOCK, d_out)


def compute_fingerprint(weights: ModelWeights) -> str:
    """SHA-256 over the config and every served fp32 linear weight, in serving order.

    Both sides compute it from their own copy of the files; the handshake compares them, so a
    server holding other weights is refused instead of answering wrongly.
    """
    h = hashlib.sha256(json.dumps(weights.config.to_dict(), sort_keys=True).encode())
    for op, layer in weights.served_keys():
        for block in weights.blocks(op, layer):
            h.update(block.contiguous().view(torch.uint8).numpy())
    return h.hexdigest()
