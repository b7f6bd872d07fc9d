"""The wire protocol: one header frame, then one raw frame per tensor.

Every constant of the protocol lives here, once. A message is

    [header, frame_0, ..., frame_{n-1}]

where the header is a fixed binary struct followed by one descriptor per tensor
(dtype code, ndim, up to 4 dims). Tensor frames are the raw little-endian bytes of
contiguous tensors: no msgpack, pickle or JSON around payloads. An error reply and
the HELLO reply carry one UTF-8 (JSON for HELLO) frame instead of tensors.

With the shared-memory data plane (FLAG_SHM) the message is the header alone: the
tensors it describes lie in the client's region under /dev/shm, packed from DATA_START
at ALIGN-byte boundaries (`shm_offsets`); the reply's tensors follow the request's. The
region's first CONTROL_BYTES hold the doorbell (transport/doorbell.py): with it even the
header travels through the region, and RING over the socket only wakes a sleeping server.
"""
from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import NamedTuple

import torch

from teegpu.errors import HandshakeError, ProtocolError
from teegpu.options import DTYPES

PROTOCOL_VERSION = 3  # 3: the envelope (routing frames, an empty delimiter, then the header)
MAX_TENSORS = 4
MAX_DIMS = 4
MAX_ROWS = 1 << 16  # largest token count one request may carry


class Op(IntEnum):
    """What a request asks the server to compute (also the model's seam)."""

    HELLO = 0
    QKV = 1  # fused q|k|v projection of one layer
    O = 2  # attention output projection
    GATE_UP = 3  # fused gate|up projection
    DOWN = 4  # MLP down projection
    LM_HEAD = 5  # vocabulary projection (layer = -1)
    ATTN_SCORES = 6  # plaintext Q*K^T (--offload-attention only)
    ATTN_CONTEXT = 7  # plaintext P*V (--offload-attention only)
    ATTACH_SHM = 8  # one UTF-8 frame: the name of the client's region under /dev/shm
    SINK = 9  # takes one tensor of any shape, returns nothing: measures transfers
    RING = 10  # no payload: "a request waits in my region's doorbell" (the server was asleep)
    PAD_KEY = 11  # otp pad server: one frame, PAD_KEY_FRAME (key id, 128-bit key); the key expands pads
    PADS = 12  # otp pad server: one int64 tensor [key id, nonce, op, rows]; returns R*W^T (pads.py)


LINEAR_OPS = (Op.QKV, Op.O, Op.GATE_UP, Op.DOWN)
ATTENTION_OPS = (Op.ATTN_SCORES, Op.ATTN_CONTEXT)


class ErrorCode(IntEnum):
    OK = 0
    BAD_VERSION = 1
    UNKNOWN_METHOD = 2
    BAD_LAYER = 3
    BAD_DTYPE = 4
    BAD_SHAPE = 5
    BAD_FRAMES = 6
    INTERNAL = 7
    BAD_SHM = 8
    UNKNOWN_KEY = 9  # PADS under a key id this server does not hold (it restarted): register it again


FLAG_SHM = 1  # the tensors of this message lie in the shared region, not in frames
ALIGN = 64
CONTROL_BYTES = 4096  # the doorbell page at the start of a shared region
DATA_START = CONTROL_BYTES  # where a shared-memory request's tensors begin
PAD_KEY_FRAME = struct.Struct("<q16s")  # PAD_KEY's frame: key id, key
PADS_FIELDS = 4  # PADS's int64 tensor: key id, nonce, op, rows
REGISTERED = b"registered"  # the PAD_KEY reply
ATTACHED = b"attached"  # the ATTACH_SHM reply; with the doorbell: ATTACHED + DOORBELL
DOORBELL = b" doorbell"


DTYPE_CODES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.bfloat16,
    3: torch.float16,
    4: torch.int8,
    5: torch.int32,
    6: torch.int64,
    7: torch.float64,
}
CODE_OF_DTYPE: dict[torch.dtype, int] = {v: k for k, v in DTYPE_CODES.items()}
WIRE_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPES}

# version, op, status, flags, request id, layer, tensor count, server compute ns, server overhead ns
_HEAD = struct.Struct("<HBBBQiBQQ")
_DESC = struct.Struct("<BB4I")
HEADER_BASE_BYTES = _HEAD.size


class TensorDesc(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


class Header(NamedTuple):
    version: int
    op: int
    status: int
    flags: int
    request_id: int
    layer: int
    tensors: tuple[TensorDesc, ...]
    compute_ns: int = 0
    overhead_ns: int = 0  # the server's time on the request outside the product


def encode_header(
    op: int,
    request_id: int,
    layer: int,
    tensors: tuple[torch.Tensor, ...] | list[torch.Tensor] = (),
    status: int = ErrorCode.OK,
    compute_ns: int = 0,
    overhead_ns: int = 0,
    version: int = PROTOCOL_VERSION,
    flags: int = 0,
) -> bytes:
    """`tensors` may be tensors or TensorDesc (dtype, shape) pairs: only dtype and shape are read."""
    parts = [_HEAD.pack(version, op, status, flags, request_id, layer, len(tensors), compute_ns, overhead_ns)]
    for t in tensors:
        shape = tuple(t.shape)
        parts.append(_DESC.pack(CODE_OF_DTYPE[t.dtype], len(shape), *shape, *(0,) * (MAX_DIMS - len(shape))))
    return b"".join(parts)


_PARSED: dict[bytes, tuple[TensorDesc, ...]] = {}  # descriptor sections seen (a decode step repeats a few)
MAX_PARSED = 4096
REQUEST_ID_AT, TIMES_AT = 5, 18  # byte offsets of the request id and of the two server times
_REQUEST_ID, _TIMES = struct.Struct("<Q"), struct.Struct("<QQ")


def with_request_id(template: bytes, request_id: int, compute_ns: int = 0, overhead_ns: int = 0) -> bytearray:
    """A copy of an encoded header with another request id (and server times): a message of a
    kind sent before, without encoding it again."""
    head = bytearray(template)
    _REQUEST_ID.pack_into(head, REQUEST_ID_AT, request_id)
    if compute_ns or overhead_ns:
        _TIMES.pack_into(head, TIMES_AT, compute_ns, overhead_ns)
    return head


def request_kind(raw: bytes) -> tuple[bytes, bytes]:
    """An encoded header less its request id: equal for two requests of the same op, layer,
    flags and tensor descriptors."""
    return raw[:REQUEST_ID_AT], raw[REQUEST_ID_AT + _REQUEST_ID.size:]


def request_id_of(raw: bytes) -> int:
    return _REQUEST_ID.unpack_from(raw, REQUEST_ID_AT)[0]


def decode_header(buf: bytes | memoryview) -> Header:
    """Parse a header frame; raise ProtocolError naming what is wrong."""
    if len(buf) < _HEAD.size:
        raise ProtocolError(ErrorCode.BAD_FRAMES, f"header frame of {len(buf)} bytes, need {_HEAD.size}")
    version, op, status, flags, rid, layer, n, compute_ns, overhead_ns = _HEAD.unpack_from(buf, 0)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.BAD_VERSION, f"protocol version {version}, this side speaks {PROTOCOL_VERSION}"
        )
    if n > MAX_TENSORS:
        raise ProtocolError(ErrorCode.BAD_FRAMES, f"{n} tensors in one message, at most {MAX_TENSORS}")
    if len(buf) != _HEAD.size + n * _DESC.size:
        raise ProtocolError(
            ErrorCode.BAD_FRAMES, f"header frame of {len(buf)} bytes does not match {n} tensor descriptors"
        )
    section = bytes(buf[_HEAD.size:])
    descs = _PARSED.get(section)
    if descs is None:
        descs = _parse_descs(buf, n)
        if len(_PARSED) >= MAX_PARSED:
            _PARSED.clear()
        _PARSED[section] = descs
    return Header(version, op, status, flags, rid, layer, descs, compute_ns, overhead_ns)


def _parse_descs(buf, n: int) -> tuple[TensorDesc, ...]:
    descs = []
    for i in range(n):
        code, ndim, *dims = _DESC.unpack_from(buf, _HEAD.size + i * _DESC.size)
        if code not in DTYPE_CODES:
            raise ProtocolError(ErrorCode.BAD_DTYPE, f"tensor {i}: unknown dtype code {code}")
        if not 1 <= ndim <= MAX_DIMS:
            raise ProtocolError(ErrorCode.BAD_SHAPE, f"tensor {i}: {ndim} dimensions")
        shape = tuple(dims[:ndim])
        if any(d == 0 for d in shape):
            raise ProtocolError(ErrorCode.BAD_SHAPE, f"tensor {i}: empty shape {shape}")
        descs.append(TensorDesc(DTYPE_CODES[code], shape))
    return tuple(descs)


def peek_ids(buf) -> tuple[int, int, int]:
    """(request id, op, layer) of a header that may not parse, for its error reply."""
    if len(buf) < _HEAD.size:
        return 0, 0, 0
    _, op, _, _, rid, layer, *_ = _HEAD.unpack_from(buf, 0)
    return rid, op, layer


def align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def shm_offsets(descs, start: int = DATA_START) -> tuple[list[int], int]:
    """Offsets of tensors packed from `start` at ALIGN boundaries, and the end of the last one."""
    offsets, pos = [], start
    for d in descs:
        pos = align_up(pos)
        offsets.append(pos)
        pos += d.nbytes
    return offsets, pos


def reply_offsets(request_end: int, descs) -> tuple[list[int], int]:
    """Where a shared-memory reply's tensors lie: right after the request's, aligned."""
    return shm_offsets(descs, align_up(request_end))


@dataclass(slots=True)
class Hello:
    """The server's answer to HELLO: what the client checks before it sends anything else."""

    protocol: int
    fingerprint: str  # SHA-256 of the config and every served fp32 weight
    dtype: str
    device: str
    privacy: str
    ring_fingerprint: str | None  # otp: of the integer weights and scales
    config: dict  # the model's ModelConfig.to_dict()
    kernels: dict = field(default_factory=dict)  # products.Kernels of a CPU server, or the CUDA device
    tensor_parallel: int = 1  # ranks that each hold a column slice of every weight
    ranks: list = field(default_factory=list)  # of a tensor-parallel server: each rank's pid, host, weight bytes, RSS

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_bytes(cls, payload: bytes) -> "Hello":
        """Parse a HELLO reply; raise HandshakeError on anything unreadable or of another protocol."""
        try:
            info = json.loads(payload)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HandshakeError(f"server sent an unreadable HELLO reply: {e}") from e
        if not isinstance(info, dict) or info.get("protocol") != PROTOCOL_VERSION:
            theirs = info.get("protocol", "?") if isinstance(info, dict) else "?"
            raise HandshakeError(f"server speaks protocol {theirs}, this client {PROTOCOL_VERSION}")
        try:
            return cls(**info)
        except TypeError as e:
            raise HandshakeError(f"server sent a HELLO reply of another shape: {e}") from e


def tensor_frame(t: torch.Tensor) -> memoryview:
    """Raw bytes of a contiguous CPU tensor, without copying (bf16 included)."""
    return memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B")


def tensors_from_frames(descs: tuple[TensorDesc, ...], frames: list) -> list[torch.Tensor]:
    """Wrap received zmq frames as tensors without copying; check every length."""
    if len(frames) != len(descs):
        raise ProtocolError(
            ErrorCode.BAD_FRAMES, f"header announces {len(descs)} tensor frames, message has {len(frames)}"
        )
    out = []
    for i, (desc, frame) in enumerate(zip(descs, frames)):
        buf = frame.buffer if hasattr(frame, "buffer") else memoryview(frame)
        if buf.nbytes != desc.nbytes:
            raise ProtocolError(
                ErrorCode.BAD_FRAMES,
                f"tensor {i}: frame of {buf.nbytes} bytes, header says {desc.nbytes} "
                f"({desc.dtype} {list(desc.shape)})",
            )
        out.append(torch.frombuffer(buf, dtype=desc.dtype).view(desc.shape))
    return out
