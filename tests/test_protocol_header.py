"""The header frame round-trips and rejects what it cannot describe."""
import pytest
import torch

from teegpu.errors import ProtocolError
from teegpu.protocol import HEADER_BASE_BYTES, ErrorCode, Op, decode_header, encode_header, tensor_frame, tensors_from_frames


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int64])
def test_round_trip_without_copy(dtype):
    x = (torch.randn(3, 5) * 10).to(dtype)
    head = decode_header(encode_header(Op.GATE_UP, 77, 4, [x], compute_ns=5, overhead_ns=6))
    assert (head.op, head.request_id, head.layer, head.compute_ns, head.overhead_ns) == (Op.GATE_UP, 77, 4, 5, 6)
    frame = bytearray(tensor_frame(x))
    (y,) = tensors_from_frames(head.tensors, [frame])
    assert torch.equal(x, y)
    frame[0] ^= 0xFF  # y is a view of the received buffer, not a copy
    assert not torch.equal(x, y)


def test_rejections():
    x = torch.randn(2, 3)
    good = encode_header(Op.QKV, 1, 0, [x])
    with pytest.raises(ProtocolError) as e:
        decode_header(good[:-1])
    assert e.value.code == ErrorCode.BAD_FRAMES
    with pytest.raises(ProtocolError) as e:
        decode_header(good[:HEADER_BASE_BYTES] + bytes([99]) + good[HEADER_BASE_BYTES + 1:])  # unknown dtype code
    assert e.value.code == ErrorCode.BAD_DTYPE
    with pytest.raises(ProtocolError) as e:
        tensors_from_frames(decode_header(good).tensors, [b"\0" * 23])
    assert e.value.code == ErrorCode.BAD_FRAMES and "23 bytes" in str(e.value)
