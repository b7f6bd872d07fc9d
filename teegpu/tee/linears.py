"""What sits behind the model's `linears` seam on the trusted side."""
from __future__ import annotations

import json
import time

import torch
import torch.nn.functional as F

from teegpu.errors import HandshakeError, ProtocolError
from teegpu.model.weights import WEIGHT_OF_OP, ModelWeights
from teegpu.telemetry import RpcTelemetry
from teegpu.protocol import PROTOCOL_VERSION, WIRE_DTYPES, ErrorCode, Op
from teegpu.transport import RpcClient


class LocalLinears:
    """The TEE-only baseline: the trusted side multiplies by its own weights."""

    def __init__(self, weights: ModelWeights, dtype: torch.dtype = torch.float32):
        self.weights = {(op, layer): weights.for_op(op, layer).to(dtype)
                        for op in WEIGHT_OF_OP for layer in ([-1] if op == Op.LM_HEAD else
                                                             range(weights.config.num_layers))}

    def linear(self, op: Op, layer: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weights[op, layer])

    def matmul(self, op: Op, layer: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(a, b)


class RemoteLinears:
    """Every product goes to the untrusted server; every reply is checked for shape and dtype.

    Results come back in the wire dtype, which is also the trusted side's activation dtype.
    """

    def __init__(self, client: RpcClient, weights: ModelWeights, wire_dtype: torch.dtype,
                 telemetry: RpcTelemetry | None = None):
        self.client = client
        self.telemetry = telemetry or RpcTelemetry(transport=client.endpoint.transport)
        self.wire_dtype = wire_dtype
        self.out_features = {(op, layer): weights.for_op(op, layer).shape[0]
                             for op in (Op.QKV, Op.O, Op.GATE_UP, Op.DOWN)
                             for layer in range(weights.config.num_layers)}
        self.out_features[Op.LM_HEAD, -1] = weights.lm_head.shape[0]

    def linear(self, op: Op, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self._call(op, layer, (x,), (x.shape[0], self.out_features[op, layer]))

    def matmul(self, op: Op, layer: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._call(op, layer, (a, b), (a.shape[0], a.shape[1], b.shape[2]))

    def _call(self, op: Op, layer: int, inputs, expected_shape) -> torch.Tensor:
        started = time.perf_counter_ns()
        head, outputs = self.client.call(op, layer, inputs, dtype=self.wire_dtype, started_ns=started)
        if len(outputs) != 1 or tuple(outputs[0].shape) != expected_shape or outputs[0].dtype != self.wire_dtype:
            got = [(str(t.dtype), list(t.shape)) for t in outputs]
            raise ProtocolError(ErrorCode.BAD_SHAPE, f"server replied {got} to {op.name} layer {layer}, "
                                f"expected {self.wire_dtype} {list(expected_shape)}")
        out = outputs[0]
        if self.client.shm is not None:  # the region is reused (and writable by the server): copy out
            out = out.clone()
        stamps = self.client.last_stamps
        self.telemetry.record(op.name, layer, (*stamps[:5], time.perf_counter_ns()), head.compute_ns,
                              head.queue_ns, *self.client.last_sizes)
        return out


def handshake(client: RpcClient, weights: ModelWeights) -> dict:
    """Check the server's protocol version and that it serves exactly our weights."""
    _, payload = client.call(Op.HELLO, 0)
    try:
        info = json.loads(payload)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HandshakeError(f"server sent an unreadable HELLO reply: {e}") from e
    if not isinstance(info, dict) or info.get("protocol") != PROTOCOL_VERSION:
        raise HandshakeError(f"server speaks protocol {info.get('protocol') if isinstance(info, dict) else '?'}, "
                             f"this client {PROTOCOL_VERSION}")
    if info.get("fingerprint") != weights.fingerprint:
        raise HandshakeError(
            f"server serves weights with fingerprint {str(info.get('fingerprint'))[:16]}..., this client loaded "
            f"{weights.fingerprint[:16]}... (different model files?)"
        )
    if info.get("dtype") not in WIRE_DTYPES:
        raise HandshakeError(f"server announces unsupported dtype {info.get('dtype')!r}")
    return info
