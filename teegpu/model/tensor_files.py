"""Read tensors out of safetensors files a block of rows at a time, with plain reads.

A model is never loaded whole: each side reads the tensors it keeps, converting them block by
block into their final dtype. Plain reads (not mmap) keep the file's pages out of the process's
resident set, so a 1B model's files do not count against an enclave's memory.
"""
from __future__ import annotations

import ctypes
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from teegpu.errors import ModelLoadError

FILE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
BLOCK_BYTES = 8 << 20  # the most read (and converted) at once
MMAP_THRESHOLD = 1 << 20  # glibc: allocations from this size get their own mapping
_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)


def return_large_frees_to_the_os() -> None:
    """Fix glibc's mmap threshold. By default glibc raises it after each large free (up to 32 MB),
    so the blocks a load converts and frees end up in the heap, where they stay resident: at the
    1B shape that was 0.5-1 GB of a trusted side's peak RSS. Fixed, every large buffer is its own
    mapping and goes back to the OS when freed. (Not glibc: nothing to do.)"""
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


@dataclass(frozen=True, slots=True)
class StoredTensor:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # of its first byte in the file

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors a safetensors file holds, by name, without reading their data."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not a readable safetensors file: {e}") from e
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in FILE_DTYPES:
            raise ModelLoadError(f"{path}: tensor {name} has dtype {info.get('dtype')}, "
                                 f"teegpu reads {sorted(FILE_DTYPES)}")
        out[name] = StoredTensor(path, FILE_DTYPES[info["dtype"]], tuple(info["shape"]),
                                 8 + n + info["data_offsets"][0])
    return out


def row_blocks(parts: list[StoredTensor], dtype: torch.dtype, rows: tuple[int, int] | None = None
               ) -> Iterator[torch.Tensor]:
    """The rows of `parts` stacked along dim 0 (q|k|v, gate|up), as blocks of at most BLOCK_BYTES;
    only rows [start, end) of the stack when `rows` is given (a tensor-parallel rank's slice)."""
    first = 0  # the stack's row where this part begins
    start, end = rows if rows is not None else (0, sum(p.shape[0] for p in parts) if parts[0].shape else 1)
    for part in parts:
        count = part.shape[0] if part.shape else 1
        lo, hi = max(start - first, 0), min(end - first, count)
        first += count
        if lo >= hi:
            continue
        step = max(1, BLOCK_BYTES // max(part.row_bytes, 1))
        with open(part.path, "rb") as f:
            for at in range(lo, hi, step):
                n = min(step, hi - at)
                buf = bytearray(n * part.row_bytes)
                f.seek(part.offset + at * part.row_bytes)
                if f.readinto(buf) != len(buf):
                    raise ModelLoadError(f"{part.path} ends inside a tensor (truncated file?)")
                block = torch.frombuffer(buf, dtype=part.dtype).view(n, *part.shape[1:])
                yield block.to(dtype) if part.shape else block.to(dtype).view(())


def read_rows(parts: list[StoredTensor], dtype: torch.dtype, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The whole (stacked) tensor in `dtype`, or its rows [start, end), filled block by block: no
    full-size temporary."""
    if not parts[0].shape:  # a scalar
        return next(row_blocks(parts, dtype))
    start, end = rows if rows is not None else (0, sum(p.shape[0] for p in parts))
    out = torch.empty(end - start, *parts[0].shape[1:], dtype=dtype)
    row = 0
    for block in row_blocks(parts, dtype, (start, end)):
        out[row:row + block.shape[0]] = block
        row += block.shape[0]
    return out
