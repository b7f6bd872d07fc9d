"""Serves the model's linear layers. Stateless per request; every request validated."""
from __future__ import annotations

import json
import signal
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from teegpu.errors import ConfigError, ProtocolError
from teegpu.model.loading import load_weights
from teegpu.model.weights import WEIGHT_OF_OP, ModelWeights
from teegpu.protocol import (
    ATTENTION_OPS, MAX_ROWS, PROTOCOL_VERSION, WIRE_DTYPES, ErrorCode, Op, decode_header, encode_header,
    tensor_frame, tensors_from_frames,
)
from teegpu.transport import ServerSocket

DEVICES = ("auto", "cpu", "cuda")


@dataclass(slots=True)
class ServerConfig:
    model: str | None = None
    endpoint: str = "tcp://127.0.0.1:5555"
    device: str = "auto"
    dtype: str = "float32"

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ConfigError(f"device {self.device!r}: choose one of {DEVICES}")
        if self.dtype not in WIRE_DTYPES:
            raise ConfigError(f"dtype {self.dtype!r}: choose one of {tuple(WIRE_DTYPES)}")


def pick_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but torch sees no CUDA device")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


class LinearServer:
    """Holds the fused linear weights on the device and answers one request at a time."""

    def __init__(self, weights: ModelWeights, device: torch.device, dtype: torch.dtype):
        self.config = weights.config
        self.fingerprint = weights.fingerprint
        self.device, self.dtype = device, dtype
        cfg = weights.config
        self.weights: dict[tuple[int, int], torch.Tensor] = {}
        for op in WEIGHT_OF_OP:
            for layer in [-1] if op == Op.LM_HEAD else range(cfg.num_layers):
                self.weights[op, layer] = weights.for_op(op, layer).to(device=device, dtype=dtype)
        self.requests = 0

    def hello(self) -> bytes:
        return json.dumps({
            "protocol": PROTOCOL_VERSION,
            "fingerprint": self.fingerprint,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "config": self.config.to_dict(),
        }).encode()

    def handle(self, header_frame, frames) -> tuple[bytes, list]:
        """Answer one request; raise ProtocolError for anything malformed."""
        received_ns = time.perf_counter_ns()
        head = decode_header(header_frame.buffer)
        if head.op not in Op._value2member_map_:
            raise ProtocolError(ErrorCode.UNKNOWN_METHOD, f"unknown op {head.op}")
        op = Op(head.op)
        if op == Op.HELLO:
            return encode_header(op, head.request_id, head.layer), [self.hello()]
        inputs = tensors_from_frames(head.tensors, frames)
        self._validate(op, head.layer, inputs)
        start_ns = time.perf_counter_ns()
        out = self._compute(op, head.layer, inputs)
        compute_ns = time.perf_counter_ns() - start_ns
        queue_ns = time.perf_counter_ns() - received_ns - compute_ns
        return encode_header(op, head.request_id, head.layer, [out], compute_ns=compute_ns,
                             queue_ns=queue_ns), [tensor_frame(out)]

    def _validate(self, op: Op, layer: int, inputs: list[torch.Tensor]) -> None:
        cfg = self.config
        want = 2 if op in ATTENTION_OPS else 1
        if len(inputs) != want:
            raise ProtocolError(ErrorCode.BAD_FRAMES, f"{op.name} takes {want} tensor(s), got {len(inputs)}")
        if op == Op.LM_HEAD:
            if layer != -1:
                raise ProtocolError(ErrorCode.BAD_LAYER, f"LM_HEAD takes layer -1, got {layer}")
        elif not 0 <= layer < cfg.num_layers:
            raise ProtocolError(ErrorCode.BAD_LAYER, f"layer {layer} out of range 0..{cfg.num_layers - 1}")
        for t in inputs:
            if t.dtype != self.dtype:
                raise ProtocolError(ErrorCode.BAD_DTYPE, f"{op.name}: dtype {t.dtype}, server serves {self.dtype}")
        if op in ATTENTION_OPS:
            self._validate_attention(op, *inputs)
            return
        x = inputs[0]
        d_in = self.weights[op, layer].shape[1]
        if x.dim() != 2 or x.shape[1] != d_in or x.shape[0] > MAX_ROWS:
            raise ProtocolError(ErrorCode.BAD_SHAPE, f"{op.name}: input shape {list(x.shape)}, expected [T, {d_in}]")

    def _validate_attention(self, op: Op, a: torch.Tensor, b: torch.Tensor) -> None:
        cfg = self.config
        ok = a.dim() == 3 and b.dim() == 3 and a.shape[0] == b.shape[0] == cfg.num_heads
        if op == Op.ATTN_SCORES:  # (H, T, D) @ (H, D, S)
            ok = ok and a.shape[2] == b.shape[1] == cfg.head_dim and b.shape[2] <= cfg.max_position_embeddings
        else:  # (H, T, S) @ (H, S, D)
            ok = ok and a.shape[2] == b.shape[1] and b.shape[2] == cfg.head_dim
        if not ok:
            raise ProtocolError(ErrorCode.BAD_SHAPE, f"{op.name}: shapes {list(a.shape)} and {list(b.shape)}")

    @torch.inference_mode()
    def _compute(self, op: Op, layer: int, inputs: list[torch.Tensor]) -> torch.Tensor:
        xs = [t.to(self.device, non_blocking=True) for t in inputs]
        if op in ATTENTION_OPS:
            out = torch.bmm(xs[0], xs[1])
        else:
            out = F.linear(xs[0], self.weights[op, layer])
        if out.device.type != "cpu":
            out = out.cpu()
        return out.contiguous()

    def serve(self, sock: ServerSocket, stop: threading.Event, poll_ms: int = 200) -> None:
        """Answer requests until `stop` is set. A bad request gets an error reply, never a crash."""
        while not stop.is_set():
            msg = sock.recv(poll_ms)
            if msg is None:
                continue
            if len(msg) < 2:
                continue  # a ROUTER always prepends the identity; nothing to answer
            identity, header, frames = msg[0], msg[1], msg[2:]
            self.requests += 1
            try:
                reply_header, reply_frames = self.handle(header, frames)
            except ProtocolError as e:
                sock.reply_error(identity, header, e.code, str(e))
                continue
            except Exception as e:  # never let one request take the server down
                sock.reply_error(identity, header, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")
                continue
            sock.reply(identity, reply_header, reply_frames)


def serve(config: ServerConfig, ready=None, stop: threading.Event | None = None) -> None:
    """Load the model, bind, print the endpoint once ready, serve until SIGINT/SIGTERM or `stop`."""
    device = pick_device(config.device)
    weights = load_weights(config.model)
    server = LinearServer(weights, device, WIRE_DTYPES[config.dtype])
    del weights
    sock = ServerSocket(config.endpoint)
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    print(f"teegpu server ready on {sock.bound_url} (device {device}, dtype {config.dtype})", flush=True)
    if ready is not None:
        ready(sock.bound_url)
    try:
        server.serve(sock, stop)
    finally:
        sock.close()
        print(f"teegpu server stopped after {server.requests} requests", file=sys.stderr, flush=True)
