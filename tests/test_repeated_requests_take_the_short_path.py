"""A decode step sends the same few kinds of request again and again: the client reuses each
kind's region views and header, the server its validated views and reply header. Reused
plans give the products fresh requests give, belong to one client and one mapping, and never
let through a request that the full path would refuse."""
import pytest
import torch

from teegpu.errors import ProtocolError, ServerError
from teegpu.protocol import ErrorCode, Op, decode_header, encode_header, request_kind, with_request_id
from teegpu.transport import RpcClient

HIDDEN = 64


def fresh(client, op, layer, x):
    return client.call(op, layer, [x]).tensors[0].clone()


def test_repeated_kinds_give_the_products_of_fresh_requests(tiny_server):
    url = tiny_server.endpoint
    with RpcClient(url, 5_000) as sockets, RpcClient(url, 5_000, data_plane="shm") as bell:
        for step in range(6):  # every kind comes back with new activations each time
            for op, layer, rows in ((Op.QKV, 0, 1), (Op.O, 1, 1), (Op.QKV, 1, 3), (Op.GATE_UP, 0, 1)):
                x = torch.randn(rows, HIDDEN)
                want = fresh(sockets, op, layer, x)
                reply = bell.call(op, layer, [x])
                assert reply.path.startswith(("doorbell", "shm")) and torch.equal(reply.tensors[0], want)


def test_plans_belong_to_one_client_and_one_mapping(tiny_server):
    url = tiny_server.endpoint
    with RpcClient(url, 5_000) as sockets, RpcClient(url, 5_000, data_plane="shm") as a, \
            RpcClient(url, 5_000, data_plane="shm") as b:
        xa, xb = torch.randn(2, HIDDEN), torch.randn(2, HIDDEN)
        for _ in range(3):  # same kind from two clients: each gets the product of its own rows
            assert torch.equal(fresh(a, Op.QKV, 0, xa), fresh(sockets, Op.QKV, 0, xa))
            assert torch.equal(fresh(b, Op.QKV, 0, xb), fresh(sockets, Op.QKV, 0, xb))
        old_region = a.shm.name
        a._switch(a._current)  # a new socket: the next call attaches a fresh region
        x = torch.randn(2, HIDDEN)
        assert torch.equal(fresh(a, Op.QKV, 0, x), fresh(sockets, Op.QKV, 0, x))
        assert a.shm.name != old_region


def test_a_bad_request_after_good_ones_of_a_near_kind_is_refused(tiny_server):
    with RpcClient(tiny_server.endpoint, 5_000, data_plane="shm") as client:
        for _ in range(3):
            fresh(client, Op.QKV, 0, torch.randn(1, HIDDEN))
        with pytest.raises(ServerError) as bad_shape:
            client.call(Op.QKV, 0, [torch.randn(1, HIDDEN + 1)])
        assert bad_shape.value.code == ErrorCode.BAD_SHAPE
        with pytest.raises(ServerError) as bad_layer:
            client.call(Op.QKV, 99, [torch.randn(1, HIDDEN)])
        assert bad_layer.value.code == ErrorCode.BAD_LAYER
        with pytest.raises(ServerError) as bad_dtype:
            client.call(Op.QKV, 0, [torch.randn(1, HIDDEN)], dtype=torch.float64)
        assert bad_dtype.value.code == ErrorCode.BAD_DTYPE
        fresh(client, Op.QKV, 0, torch.randn(1, HIDDEN))  # and the good kind still works


def test_a_patched_header_is_the_header_encoded_afresh():
    x = torch.zeros(3, HIDDEN)
    template = encode_header(Op.QKV, 0, 2, [x], flags=1)
    assert bytes(with_request_id(template, 77)) == encode_header(Op.QKV, 77, 2, [x], flags=1)
    assert bytes(with_request_id(template, 78, 1234, 56)) == encode_header(Op.QKV, 78, 2, [x], flags=1,
                                                                          compute_ns=1234, overhead_ns=56)
    assert decode_header(with_request_id(template, 9)).request_id == 9
    assert request_kind(encode_header(Op.QKV, 5, 2, [x])) == request_kind(encode_header(Op.QKV, 6, 2, [x]))
    assert request_kind(encode_header(Op.QKV, 5, 2, [x])) != request_kind(encode_header(Op.QKV, 5, 3, [x]))


def test_a_bad_descriptor_is_refused_every_time():
    """Parsed descriptor sections are remembered only when they parse."""
    bad = bytearray(encode_header(Op.QKV, 1, 0, [torch.zeros(2, 3)]))
    bad[-18] = 99  # the dtype code of the one descriptor (18 bytes: code, ndim, 4 dims)
    for _ in range(2):
        with pytest.raises(ProtocolError) as e:
            decode_header(bytes(bad))
        assert e.value.code == ErrorCode.BAD_DTYPE
