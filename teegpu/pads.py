"""One-time pads expanded from a shared key, for the pad server (otp mode), shared by both sides.

The trusted side and a pad server share a 128-bit key. Both expand the same pad rows R from it
with AES-128-CTR: the keystream's bytes, read as little-endian int64, are uniform over Z/2^64.
The pad server returns R*W^T; the main server sees only X+R; the trusted side expands R itself
and never computes R*W^T (docs/security.md).

A pad request names (key id, nonce, op, layer, rows). Its AES counter block is

    bytes 0..7   the nonce, big-endian: the trusted side's count of pad requests under this key
    byte  8      the weight's op (protocol.Op)
    bytes 9..10  layer + 1, big-endian (the LM head's layer -1 is 0)
    byte  11     PAD_DOMAIN: these bytes are pads, and nothing else is ever encrypted under the key
    bytes 12..15 the block counter, from 0

so no two (nonce, op, layer) share a keystream, and a request's own blocks (at most
MAX_ROWS * 2^16 * 8 / 16 = 2^31 of them) never carry into byte 11.
"""
from __future__ import annotations

import struct

import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY_BYTES = 16
PAD_DOMAIN = 0x50  # "P"
CHUNK_BYTES = 1 << 20  # keystream written a megabyte at a time, straight into the pad tensor
_ZEROS = memoryview(bytes(CHUNK_BYTES))
_BLOCK = struct.Struct(">QBHBI")


def pad_words(rows: int, d_in: int) -> int:
    """int64 words of the buffer expand_pads fills: the pads and two spare words (the keystream's margin)."""
    return rows * d_in + 2


def counter_block(nonce: int, op: int, layer: int) -> bytes:
    """The first AES-CTR counter block of the pads of one request (layout in the module docstring)."""
    if not 0 <= nonce < 1 << 64:
        raise ValueError(f"pad nonce {nonce} is not a 64-bit unsigned integer")
    return _BLOCK.pack(nonce, op, layer + 1, PAD_DOMAIN, 0)


def write_keystream(key: bytes, block: bytes, room: torch.Tensor, nbytes: int) -> None:
    """AES-128-CTR's keystream under `key` from counter `block`: its first `nbytes` bytes, written into
    the front of the uint8 CPU tensor `room`, which must hold 15 bytes more (update_into's margin)."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"pad keys are {KEY_BYTES} bytes, got {len(key)}")
    if room.numel() < nbytes + 15:
        raise ValueError(f"a keystream of {nbytes} bytes needs {nbytes + 15} bytes of room, got {room.numel()}")
    view = memoryview(room.numpy()).cast("B")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(block)).encryptor()
    for i in range(0, nbytes, CHUNK_BYTES):
        size = min(CHUNK_BYTES, nbytes - i)
        encryptor.update_into(_ZEROS[:size], view[i:i + size + 15])


def expand_pads(key: bytes, nonce: int, op: int, layer: int, rows: int, d_in: int,
                buf: torch.Tensor | None = None) -> torch.Tensor:
    """The pad rows R (rows, d_in) int64 of one request: uniform over Z/2^64, the same on both sides.
    Written into `buf` when given (a flat int64 tensor of pad_words(rows, d_in) words)."""
    n = rows * d_in
    if buf is None:
        buf = torch.empty(pad_words(rows, d_in), dtype=torch.int64)
    elif buf.numel() != pad_words(rows, d_in) or buf.dtype != torch.int64 or not buf.is_contiguous():
        raise ValueError(f"a buffer of {pad_words(rows, d_in)} contiguous int64 words is needed")
    write_keystream(key, counter_block(nonce, op, layer), buf.view(torch.uint8), 8 * n)
    return buf[:n].view(rows, d_in)
