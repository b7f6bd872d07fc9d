"""Property-based fuzzing of a live server: requests built from the protocol's own header
struct, then mutated (fields, descriptor counts, dimensions, dtypes, frame counts and sizes,
the shared-memory flag). Whatever arrives, the server answers with an error code or a correct
product, never crashes, never hangs, and never writes outside the sender's region."""
import os
import struct

import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raw_requests import send_raw
from teegpu.config import ServerConfig
from teegpu.model.loading import load_weights
from teegpu.protocol import (
    DATA_START, DTYPE_CODES, FLAG_SHM, LINEAR_OPS, PROTOCOL_VERSION, ErrorCode, Op, decode_header, encode_header, shm_offsets, tensor_frame,
)
from teegpu.server_process import ServerProcess
from teegpu.transport import RpcClient, ShmRegion

# 2,000 in `make test`; the full soak of 10,000 by hand: TEEGPU_FUZZ_EXAMPLES=10000 pytest this file
EXAMPLES = int(os.environ.get("TEEGPU_FUZZ_EXAMPLES", "2000"))
_HEAD = struct.Struct("<HBBBQiBQQ")
_DESC = struct.Struct("<BB4I")
SIZES = (1, 2, 3, 16, 32, 64, 96, 128, 160, 320)  # the tiny model's widths, and near misses


D_IN = {Op.QKV: 64, Op.O: 64, Op.GATE_UP: 64, Op.DOWN: 160, Op.LM_HEAD: 64}  # of the tiny test model


@st.composite
def requests(draw):
    """A real request (a product of the tiny model, as a client sends it), then, most of the
    time, mutations of its fields, descriptors and frames."""
    op = draw(st.sampled_from(sorted(D_IN)))
    layer, rows = (-1 if op == Op.LM_HEAD else draw(st.integers(0, 2))), draw(st.integers(1, 4))
    fields = {"version": PROTOCOL_VERSION, "op": int(op), "status": 0, "flags": 0,
              "rid": draw(st.integers(0, 2**64 - 1)), "layer": layer}
    descs = [[1, 2, [rows, D_IN[op], 0, 0]]]  # float32 (rows, d_in)
    mutations = draw(st.lists(st.sampled_from(["version", "op", "status", "flags", "layer", "count", "dtype",
                                                "ndim", "dims", "extra", "cut", "frames", "sizes"]), max_size=3))
    if "version" in mutations:
        fields["version"] = draw(st.sampled_from([0, 1, 2, 4, 65535]))
    if "op" in mutations:
        fields["op"] = draw(st.integers(0, 255).filter(lambda o: o != Op.RING))
    if "status" in mutations:
        fields["status"] = draw(st.integers(0, 255))
    if "flags" in mutations:
        fields["flags"] = draw(st.sampled_from([FLAG_SHM, 0xFE, 0xFF]))
    if "layer" in mutations:
        fields["layer"] = draw(st.sampled_from([-2, -1, 3, 7, 1 << 30, -(1 << 31)]))
    if "dtype" in mutations:
        descs[0][0] = draw(st.sampled_from(sorted(DTYPE_CODES) + [0, 9, 200]))
    if "ndim" in mutations:
        descs[0][1] = draw(st.integers(0, 6))
    if "dims" in mutations:
        descs[0][2] = [draw(st.sampled_from(SIZES + (0, 1 << 20, 1 << 31))) for _ in range(4)]
    if "extra" in mutations:
        descs.append([draw(st.integers(0, 9)), draw(st.integers(0, 4)), [draw(st.sampled_from(SIZES))] * 4])
    declared = draw(st.sampled_from([0, len(descs) + 1, 255])) if "count" in mutations else len(descs)
    header = _HEAD.pack(fields["version"], fields["op"], fields["status"], fields["flags"], fields["rid"],
                        fields["layer"], declared, 0, 0) + b"".join(_DESC.pack(c, n, *d) for c, n, d in descs)
    if "cut" in mutations:
        header = header[:draw(st.integers(0, len(header) - 1))]
    frames = []
    for code, ndim, dims in descs:
        nbytes = DTYPE_CODES.get(code, torch.uint8).itemsize
        for d in dims[:max(ndim, 0)]:
            nbytes *= d
        if "sizes" in mutations or nbytes > (1 << 16):
            nbytes = draw(st.integers(0, 4096))
        frames.append(struct.pack("<f", draw(st.floats(-4, 4, width=32))) * (nbytes // 4) + b"\0" * (nbytes % 4))
    if "frames" in mutations:
        frames = frames[:draw(st.integers(0, len(frames)))] + [b"\1" * draw(st.integers(0, 64))] * draw(st.integers(0, 2))
    return [header, *frames]


def well_formed_linear(server_weights, x: torch.Tensor, op: int, layer: int) -> torch.Tensor | None:
    key = (Op(op), layer)
    w = server_weights.get(key)
    return None if w is None or x.shape[-1] != w.shape[1] else x @ w.t()


def test_ten_thousand_fuzzed_requests(tiny_model_dir, capsys):
    weights = load_weights(str(tiny_model_dir))
    served = dict(weights.served())
    config = ServerConfig(model=str(tiny_model_dir), endpoint="tcp://127.0.0.1:*")
    sent, products = [0], [0]
    with ServerProcess(config) as server, RpcClient(server.wait_ready(), 5_000, data_plane="shm") as guard:
        guard.call(Op.HELLO, 0)  # attaches the guard's region; then fill it with a canary
        canary = torch.arange(guard.shm.size - DATA_START, dtype=torch.int64).to(torch.uint8)
        guard.shm.bytes[DATA_START:].copy_(canary)  # (its doorbell page stays as the client left it)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server.endpoint)
        own = ShmRegion.create(1 << 16)  # the fuzzer's own region: FLAG_SHM requests point into it
        sock.send_multipart([b"", encode_header(Op.ATTACH_SHM, 1, 0), own.name.encode()])
        assert sock.poll(5_000) and sock.recv_multipart()
        own.unlink()  # mapped by the server now: like a real client, leave no name behind, even on failure

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(requests())
        def one(frames):
            sock.send_multipart([b"", *frames])
            sent[0] += 1
            assert sock.poll(10_000), f"no answer to {[len(f) for f in frames]} (server hung or crashed)"
            reply = sock.recv_multipart()[1:]
            head = decode_header(reply[0])
            assert head.status in ErrorCode._value2member_map_
            linear = head.op in [int(o) for o in LINEAR_OPS] + [int(Op.LM_HEAD)]
            if head.status == ErrorCode.OK and linear and not head.flags & FLAG_SHM:  # a product: check it
                request = decode_header(frames[0])
                desc = request.tensors[0]
                if request.flags & FLAG_SHM:  # the input was in the fuzzer's own region
                    x = own.tensor(shm_offsets(request.tensors)[0][0], desc.dtype, desc.shape).clone()
                else:
                    x = torch.frombuffer(bytearray(frames[1]), dtype=desc.dtype).view(desc.shape)
                want = well_formed_linear(served, x, head.op, head.layer)
                got = torch.frombuffer(bytearray(reply[1]), dtype=head.tensors[0].dtype).view(head.tensors[0].shape)
                assert want is not None and torch.allclose(got, want, atol=1e-4, rtol=1e-4)
                products[0] += 1

        one()
        assert server.proc.poll() is None  # alive
        assert torch.equal(guard.shm.bytes[DATA_START:], canary)  # nothing written into another client's region
        x = torch.randn(2, 64)
        y = send_raw(server.endpoint, [encode_header(Op.QKV, 7, 0, [x]), tensor_frame(x)])
        assert decode_header(y[0]).status == ErrorCode.OK  # and still serving
        sock.close(0)
        own.close()
    with capsys.disabled():
        print(f"\nfuzz: {sent[0]} requests sent to a live server, every one answered "
              f"({products[0]} correct products among them)")
    assert sent[0] >= EXAMPLES and products[0] > 0
