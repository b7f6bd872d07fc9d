"""Serves the model's linear layers. Stateless per request; every request validated."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import OrderedDict

import torch

from teegpu.config import ServerConfig
from teegpu.errors import ConfigError, ProtocolError
from teegpu.model.loading import load_weights
from teegpu.model.weights import ModelWeights
from teegpu.protocol import (
    ALIGN, ATTENTION_OPS, FLAG_SHM, MAX_ROWS, PROTOCOL_VERSION, WIRE_DTYPES, ErrorCode, Hello, Op, TensorDesc,
    decode_header, encode_header, reply_offsets, shm_offsets, tensor_frame, tensors_from_frames,
)
from teegpu.ring import RingWeight, quantize_linears, ring_fingerprint, ring_matmul
from teegpu.transport import ServerCurve, ServerSocket, ShmRegion

MAX_REGIONS = 64  # shared regions mapped at once; the oldest goes first


def pick_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but torch sees no CUDA device")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


class LinearServer:
    """Holds the fused linear weights on the device and answers one request at a time."""

    def __init__(self, weights: ModelWeights, device: torch.device, dtype: torch.dtype, allow_shm: bool = True,
                 privacy: str = "plain"):
        self.config = weights.config
        self.allow_shm = allow_shm
        self.fingerprint = weights.fingerprint
        self.privacy = privacy
        self.ring_fingerprint = None
        self.weights: dict = {}  # (op, layer) -> weight tensor, or RingWeight in otp mode
        if privacy == "otp":  # exact products in Z/2^64: int8 GEMMs on byte digits and weight halves
            dtype = torch.int64
            quantized = quantize_linears(weights)
            self.ring_fingerprint = ring_fingerprint(quantized)
            for key, (q, _) in quantized.items():
                self.weights[key] = RingWeight(q).to(device)
        else:
            for key, w in weights.served().items():
                self.weights[key] = w.to(device=device, dtype=dtype)
        self.device, self.dtype = device, dtype
        self.shapes = {key: tuple(w.shape) for key, w in weights.served().items()}  # (d_out, d_in)
        self.requests = 0
        self.regions: OrderedDict[bytes, ShmRegion] = OrderedDict()  # by client socket identity

    def hello(self) -> Hello:
        return Hello(protocol=PROTOCOL_VERSION, fingerprint=self.fingerprint,
                     dtype=str(self.dtype).removeprefix("torch."), device=str(self.device), privacy=self.privacy,
                     ring_fingerprint=self.ring_fingerprint, config=self.config.to_dict())

    def handle(self, identity: bytes, header_frame, frames) -> tuple[bytes, list]:
        """Answer one request; raise ProtocolError for anything malformed."""
        received_ns = time.perf_counter_ns()
        head = decode_header(header_frame.buffer)
        if head.op not in Op._value2member_map_:
            raise ProtocolError(ErrorCode.UNKNOWN_METHOD, f"unknown op {head.op}")
        op = Op(head.op)
        if op == Op.HELLO:
            return encode_header(op, head.request_id, head.layer), [self.hello().to_bytes()]
        if op == Op.ATTACH_SHM:
            return self._attach(identity, head, frames)
        region = None
        if head.flags & FLAG_SHM:
            region = self.regions.get(identity)
            if region is None or frames:
                raise ProtocolError(ErrorCode.BAD_SHM, "tensors announced in a shared region that this "
                                    "client has not attached, or frames sent as well")
            offsets, request_end = shm_offsets(head.tensors)
            if request_end > region.size:
                raise ProtocolError(ErrorCode.BAD_SHM, f"request of {request_end} bytes exceeds the shared "
                                    f"region of {region.size}")
            inputs = [region.tensor(off, d.dtype, d.shape) for d, off in zip(head.tensors, offsets)]
        else:
            # a frame may lie at any address, and CPU GEMM kernels round differently on unaligned
            # input: align it, so that a result never depends on the data plane that carried it
            inputs = [t if t.data_ptr() % ALIGN == 0 else t.clone() for t in tensors_from_frames(head.tensors, frames)]
        if op == Op.SINK:
            if len(inputs) != 1:
                raise ProtocolError(ErrorCode.BAD_FRAMES, f"SINK takes 1 tensor, got {len(inputs)}")
            return encode_header(op, head.request_id, head.layer), []
        self._validate(op, head.layer, inputs)
        out_shape = self._out_shape(op, head.layer, inputs)
        out = None
        if region is not None:  # the reply goes after the request when it fits
            out_offsets, reply_end = reply_offsets(request_end, [TensorDesc(self.dtype, out_shape)])
            if reply_end <= region.size:
                out = region.tensor(out_offsets[0], self.dtype, out_shape)
        start_ns = time.perf_counter_ns()
        result = self._compute(op, head.layer, inputs, out)
        compute_ns = time.perf_counter_ns() - start_ns
        overhead_ns = time.perf_counter_ns() - received_ns - compute_ns
        header = encode_header(op, head.request_id, head.layer, [result], compute_ns=compute_ns,
                               overhead_ns=overhead_ns, flags=FLAG_SHM if out is not None else 0)
        return header, [] if out is not None else [tensor_frame(result)]

    def _attach(self, identity: bytes, head, frames) -> tuple[bytes, list]:
        if not self.allow_shm:
            raise ProtocolError(ErrorCode.BAD_SHM, "this server was started with --data-plane socket")
        if len(frames) != 1 or head.tensors:
            raise ProtocolError(ErrorCode.BAD_FRAMES, "ATTACH_SHM takes one frame: the region's name")
        try:
            name = bytes(frames[0].buffer).decode("ascii")
        except UnicodeDecodeError as e:
            raise ProtocolError(ErrorCode.BAD_SHM, f"region name is not ASCII: {e}") from e
        region = ShmRegion.attach(name)
        old = self.regions.pop(identity, None)
        if old is not None:
            old.close()
        self.regions[identity] = region
        while len(self.regions) > MAX_REGIONS:  # clients that went away without a word
            self.regions.popitem(last=False)[1].close()
        return encode_header(Op.ATTACH_SHM, head.request_id, head.layer), [b"attached"]

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
        if op in ATTENTION_OPS and self.privacy == "otp":
            raise ProtocolError(ErrorCode.UNKNOWN_METHOD, f"{op.name}: attention is never offloaded in otp mode")
        if op in ATTENTION_OPS:
            self._validate_attention(op, *inputs)
            return
        x = inputs[0]
        d_in = self.shapes[op, layer][1]
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

    def _out_shape(self, op: Op, layer: int, inputs: list[torch.Tensor]) -> tuple[int, ...]:
        if op in ATTENTION_OPS:
            a, b = inputs
            return (a.shape[0], a.shape[1], b.shape[2])
        return (inputs[0].shape[0], self.shapes[op, layer][0])

    @torch.inference_mode()
    def _compute(self, op: Op, layer: int, inputs: list[torch.Tensor], out: torch.Tensor | None) -> torch.Tensor:
        """The product, written into `out` (a view of the shared region) when given."""
        if self.privacy == "otp":
            result = ring_matmul(inputs[0].to(self.device), self.weights[op, layer]).cpu()
            if out is not None:
                out.copy_(result)
                return out
            return result
        on_cpu = self.device.type == "cpu"
        xs = inputs if on_cpu else [t.to(self.device, non_blocking=True) for t in inputs]
        if op in ATTENTION_OPS:
            result = torch.bmm(xs[0], xs[1], out=out if on_cpu else None)
        else:
            result = torch.mm(xs[0], self.weights[op, layer].t(), out=out if on_cpu else None)
        if out is not None and not on_cpu:
            out.copy_(result)
            return out
        return result if on_cpu else result.cpu()

    def serve(self, sock: ServerSocket, stop: threading.Event, poll_ms: int = 200, busy_poll_us: int = 0) -> None:
        """Answer requests until `stop` is set. A bad request gets an error reply, never a crash."""
        spin_us = 0
        while not stop.is_set():
            msg = sock.recv(poll_ms, spin_us)
            spin_us = busy_poll_us if msg is not None else 0
            if msg is None:
                continue
            if len(msg) < 2:
                continue  # a ROUTER always prepends the identity; nothing to answer
            identity, header, frames = msg[0], msg[1], msg[2:]
            self.requests += 1
            try:
                reply_header, reply_frames = self.handle(identity.bytes, header, frames)
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
    server = LinearServer(weights, device, WIRE_DTYPES[config.dtype], allow_shm=config.data_plane == "shm",
                          privacy=config.privacy)
    del weights
    curve = ServerCurve(config.curve_secret, config.curve_allow) if config.curve_secret else None
    sock = ServerSocket(config.endpoint, curve=curve)
    stop = stop or threading.Event()
    if config.parent_pid is not None:
        threading.Thread(target=_stop_when_gone, args=(config.parent_pid, stop), daemon=True).start()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    print(f"teegpu server ready on {sock.bound_url} (device {device}, dtype {config.dtype}, "
          f"data plane {config.data_plane}, privacy {config.privacy}, curve {'on' if curve else 'off'})", flush=True)
    if ready is not None:
        ready(sock.bound_url)
    try:
        server.serve(sock, stop, busy_poll_us=config.busy_poll_us)
    finally:
        for region in server.regions.values():
            region.close()
        sock.close()
        print(f"teegpu server stopped after {server.requests} requests", file=sys.stderr, flush=True)


def _stop_when_gone(pid: int, stop: threading.Event, interval_s: float = 0.5) -> None:
    """Set `stop` once process `pid` has exited (we were reparented), even if it died by SIGKILL."""
    while not stop.wait(interval_s):
        if os.getppid() != pid:
            print(f"teegpu server: parent process {pid} is gone, stopping", file=sys.stderr, flush=True)
            stop.set()
