"""Serves the model's linear layers. Stateless per request; every request validated."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from teegpu.config import ServerConfig
from teegpu.errors import ConfigError, ProtocolError
from teegpu.model.loading import load_weights
from teegpu.model.products import kernels, linear, pack, product_threads
from teegpu.model.weights import ModelWeights
from teegpu.protocol import (
    ALIGN, ATTACHED, ATTENTION_OPS, DOORBELL, FLAG_SHM, LINEAR_OPS, MAX_ROWS, PAD_KEY_FRAME, PADS_FIELDS, PROTOCOL_VERSION,
    REGISTERED, WIRE_DTYPES, ErrorCode, Hello, Op, TensorDesc,
    decode_header, encode_header, reply_offsets, request_id_of, request_kind, shm_offsets, tensor_frame,
    tensors_from_frames, with_request_id,
)
from teegpu.pads import expand_pads
from teegpu.ring import quantize_linears, ring_fingerprint_of_ranks, ring_matmul
from teegpu.server import tensor_parallel
from teegpu.options import DEFAULT_SPIN_MAX_US
from teegpu.transport import Incoming, ServerCurve, ServerSocket, ShmRegion
from teegpu.transport.doorbell import ASLEEP, AWAKE, SOCKET_EVERY, WAITING, CpuWait, relax

MAX_REGIONS = 64  # shared regions mapped at once; the oldest goes first
MAX_PLANS = 1024  # validated request kinds remembered (all regions together)
MAX_PAD_KEYS = 4096  # pad keys held (one per trusted session); the oldest goes first


@dataclass(slots=True)
class _Plan:
    """A validated shared-memory request of one kind from one client: its views in the region
    and its reply header (request id 0). A decode step asks the same few kinds again and again."""

    op: Op
    layer: int
    inputs: list
    out: torch.Tensor
    reply: bytes


def pick_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda requested but torch sees no CUDA device")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


class LinearServer:
    """Holds the fused linear weights on the device and answers one request at a time."""

    def __init__(self, weights: ModelWeights, device: torch.device, dtype: torch.dtype, allow_shm: bool = True,
                 privacy: str = "plain", doorbell: bool = True, part: tuple[int, int] = (0, 1)):
        self.config = weights.config
        # before any weight is packed: probes the kernels (and asks for AMX tiles where present)
        self.kernels = kernels().as_dict() if device.type == "cpu" else {"cuda": torch.cuda.get_device_name(device)}
        self.allow_shm = allow_shm
        self.fingerprint = weights.fingerprint
        self.privacy = privacy
        self.part = part  # (rank, ranks): a tensor-parallel rank holds only its column slice of each weight
        self.ring_fingerprint = None
        self.row_digests: dict = {}  # otp on a tensor-parallel rank: for rank 0's ring fingerprint
        self.weights: dict = {}  # (op, layer) -> weight tensor, or RingWeight in otp mode
        self.weight_bytes = 0  # what this process holds of the weights
        if privacy == "otp":  # exact products in Z/2^64 (ring.py: int8 or float64 GEMMs on digits)
            dtype = torch.int64
            quantized = quantize_linears(weights, part=part)  # weight by weight: only the ring weights stay
            self.ring_fingerprint = quantized.fingerprint or None
            self.row_digests = quantized.row_digests
            self.weights = {key: w.to(device) for key, w in quantized.weights.items()}
            self.weight_bytes = sum(w.rows.nbytes + w.correction.nbytes for w in self.weights.values())
        else:
            for key, w in weights.served(dtype, part):  # read in the served dtype, one weight at a time
                self.weight_bytes += w.nbytes
                self.weights[key] = pack(w.to(device))
        self.group = None  # on rank 0 of a tensor-parallel server: its TensorGroup
        self.ranks: list[dict] = []  # every rank's report (tensor_parallel.rank_report), rank 0's first
        self.device, self.dtype = device, dtype
        self.shapes = weights.served_shapes()  # (d_out, d_in)
        self.requests = 0
        self.regions: OrderedDict[bytes, ShmRegion] = OrderedDict()  # by the client's envelope (Incoming.key)
        self.peers: dict[bytes, Incoming] = {}  # by key: where to send what its doorbell asks
        self.handled: dict[bytes, int] = {}  # by client: the last doorbell sequence number answered
        self.doorbell = doorbell  # poll the attached regions' doorbells
        self.threads = torch.get_num_threads()  # per product: product_threads of its size, of CORES
        self.plans: dict[tuple, _Plan] = {}  # (client, request kind) -> views and reply; dropped at any attach
        self.pad_keys: OrderedDict[int, bytes] = OrderedDict()  # otp pad server: key id -> 128-bit key

    def hello(self) -> Hello:
        return Hello(protocol=PROTOCOL_VERSION, fingerprint=self.fingerprint,
                     dtype=str(self.dtype).removeprefix("torch."), device=str(self.device), privacy=self.privacy,
                     ring_fingerprint=self.ring_fingerprint, config=self.config.to_dict(), kernels=self.kernels,
                     tensor_parallel=self.part[1], ranks=self.ranks)

    def handle(self, msg: Incoming) -> tuple[bytes, list] | None:
        """Answer one request (None for RING, which only wakes us); raise ProtocolError for anything malformed."""
        received_ns = time.perf_counter_ns()
        raw = bytes(msg.header)
        plan = self.plans.get((msg.key, *request_kind(raw))) if not msg.frames else None
        if plan is not None:  # validated before: same client, op, layer and tensors
            start_ns = time.perf_counter_ns()
            self._compute(plan.op, plan.layer, plan.inputs, plan.out)
            compute_ns = time.perf_counter_ns() - start_ns
            return with_request_id(plan.reply, request_id_of(raw), compute_ns, start_ns - received_ns), []
        head, frames = decode_header(raw), msg.frames
        if head.op not in Op._value2member_map_:
            raise ProtocolError(ErrorCode.UNKNOWN_METHOD, f"unknown op {head.op}")
        op = Op(head.op)
        if op == Op.HELLO:
            return encode_header(op, head.request_id, head.layer), [self.hello().to_bytes()]
        if op == Op.ATTACH_SHM:
            return self._attach(msg, head)
        if op == Op.RING:
            return None
        if op == Op.PAD_KEY:
            return self._register_key(msg, head)
        region, inputs, request_end = self._inputs(msg.key, head, frames)
        if op == Op.SINK:
            if len(inputs) != 1:
                raise ProtocolError(ErrorCode.BAD_FRAMES, f"SINK takes 1 tensor, got {len(inputs)}")
            return encode_header(op, head.request_id, head.layer), []
        if op == Op.PADS:  # the pads' product: the weight's own op, on pads expanded here
            op, inputs = self._pads(head.layer, inputs)
        else:
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
        reply = encode_header(head.op, head.request_id, head.layer, [result], compute_ns=compute_ns,
                              overhead_ns=overhead_ns, flags=FLAG_SHM if out is not None else 0)
        if out is not None and head.op != Op.PADS:  # a PADS request's inputs are expanded anew each time
            self._remember(msg.key, raw, _Plan(op, head.layer, inputs, out,
                                               encode_header(op, 0, head.layer, [out], flags=FLAG_SHM)))
        return reply, [] if out is not None else [tensor_frame(result)]

    def _remember(self, identity: bytes, raw: bytes, plan: _Plan) -> None:
        if len(self.plans) >= MAX_PLANS:
            self.plans.clear()
        self.plans[identity, *request_kind(raw)] = plan

    def _inputs(self, identity: bytes, head, frames) -> tuple[ShmRegion | None, list[torch.Tensor], int]:
        """(the client's region if the tensors lie there, the input tensors, the end of the request)."""
        if not head.flags & FLAG_SHM:
            # a frame may lie at any address, and CPU GEMM kernels round differently on unaligned
            # input: align it, so that a result never depends on the data plane that carried it
            tensors = tensors_from_frames(head.tensors, frames)
            return None, [t if t.data_ptr() % ALIGN == 0 else t.clone() for t in tensors], 0
        region = self.regions.get(identity)
        if region is None or frames:
            raise ProtocolError(ErrorCode.BAD_SHM, "tensors announced in a shared region that this "
                                "client has not attached, or frames sent as well")
        offsets, request_end = shm_offsets(head.tensors)
        if request_end > region.size:
            raise ProtocolError(ErrorCode.BAD_SHM, f"request of {request_end} bytes exceeds the shared "
                                f"region of {region.size}")
        return region, [region.tensor(off, d.dtype, d.shape) for d, off in zip(head.tensors, offsets)], request_end

    def _attach(self, msg: Incoming, head) -> tuple[bytes, list]:
        if not self.allow_shm:
            raise ProtocolError(ErrorCode.BAD_SHM, "this server was started with --data-plane socket")
        if len(msg.frames) != 1 or head.tensors:
            raise ProtocolError(ErrorCode.BAD_FRAMES, "ATTACH_SHM takes one frame: the region's name")
        try:
            name = bytes(msg.frames[0]).decode("ascii")
        except UnicodeDecodeError as e:
            raise ProtocolError(ErrorCode.BAD_SHM, f"region name is not ASCII: {e}") from e
        region = ShmRegion.attach(name)
        key = msg.key
        self.plans.clear()  # plans hold views of regions that may go now
        old = self.regions.pop(key, None)
        if old is not None:
            old.close()
        self.regions[key], self.peers[key] = region, Incoming(msg.envelope, b"", [], msg.legacy, key)
        self.handled[key] = 0  # a fresh region: its first request will be number 1
        while len(self.regions) > MAX_REGIONS:  # clients that went away without a word
            gone, old = self.regions.popitem(last=False)
            self.handled.pop(gone, None)
            self.peers.pop(gone, None)
            old.close()
        answer = ATTACHED + DOORBELL if self.doorbell else ATTACHED
        return encode_header(Op.ATTACH_SHM, head.request_id, head.layer), [answer]

    def _register_key(self, msg: Incoming, head) -> tuple[bytes, list]:
        """PAD_KEY: hold a trusted session's pad key (it came over CURVE where configured)."""
        if self.privacy != "otp":
            raise ProtocolError(ErrorCode.UNKNOWN_METHOD, "PAD_KEY: pads are served in otp mode only")
        if len(msg.frames) != 1 or head.tensors or len(msg.frames[0]) != PAD_KEY_FRAME.size:
            raise ProtocolError(ErrorCode.BAD_FRAMES, f"PAD_KEY takes one frame of {PAD_KEY_FRAME.size} bytes")
        key_id, key = PAD_KEY_FRAME.unpack(bytes(msg.frames[0]))
        self.pad_keys[key_id] = key
        self.pad_keys.move_to_end(key_id)
        while len(self.pad_keys) > MAX_PAD_KEYS:
            self.pad_keys.popitem(last=False)
        return encode_header(Op.PAD_KEY, head.request_id, head.layer), [REGISTERED]

    def _pads(self, layer: int, inputs: list[torch.Tensor]) -> tuple[Op, list[torch.Tensor]]:
        """PADS [key id, nonce, op, rows]: the weight's op and the pad rows to multiply by it."""
        if self.privacy != "otp":
            raise ProtocolError(ErrorCode.UNKNOWN_METHOD, "PADS: pads are served in otp mode only")
        if len(inputs) != 1 or inputs[0].dtype != torch.int64 or tuple(inputs[0].shape) != (PADS_FIELDS,):
            raise ProtocolError(ErrorCode.BAD_SHAPE, f"PADS takes one int64 tensor of {PADS_FIELDS} values")
        key_id, nonce, op, rows = inputs[0].tolist()
        if op not in (*LINEAR_OPS, Op.LM_HEAD):
            raise ProtocolError(ErrorCode.UNKNOWN_METHOD, f"PADS: op {op} is not a linear layer")
        op = Op(op)
        if not 1 <= rows <= MAX_ROWS:
            raise ProtocolError(ErrorCode.BAD_SHAPE, f"PADS: {rows} rows, expected 1..{MAX_ROWS}")
        self._validate(op, layer, [torch.empty(1, self.shapes.get((op, layer), (0, 0))[1], dtype=self.dtype)])
        key = self.pad_keys.get(key_id)
        if key is None:
            raise ProtocolError(ErrorCode.UNKNOWN_KEY, f"PADS: key id {key_id} is not held here (register it)")
        return op, [expand_pads(key, nonce % (1 << 64), op, layer, rows, self.shapes[op, layer][1])]

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

    def _compute(self, op: Op, layer: int, inputs: list[torch.Tensor], out: torch.Tensor | None) -> torch.Tensor:
        """The product, written into `out` (a view of the shared region) when given."""
        if not torch.is_inference_mode_enabled():  # serve() enters it once; entering costs a microsecond
            with torch.inference_mode():
                return self._compute(op, layer, inputs, out)
        on_cpu = self.device.type == "cpu"
        if op in ATTENTION_OPS:  # no weight: rank 0 computes it whole
            a, b = inputs
            self._use_threads(a.numel() * b.shape[-1])
            xs = inputs if on_cpu else [t.to(self.device, non_blocking=True) for t in inputs]
            result = torch.bmm(xs[0], xs[1], out=out if on_cpu else None)
        elif self.group is not None:
            result = self.group.product(self, op, layer, inputs[0], out)
        else:
            result = self.columns(op, layer, inputs[0], out if on_cpu else None)
        if out is not None and result.data_ptr() != out.data_ptr():
            return out.copy_(result)
        return result.cpu()

    def columns(self, op: Op, layer: int, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x times this process's rows of the weight: every column on a single server, its slice on a
        tensor-parallel rank, computed with the kernel and threads of the whole product (so a slice's
        columns are the whole product's, bit for bit), into `out` (on the device) when given."""
        d_out, d_in = self.shapes[op, layer]
        macs = x.shape[0] * d_out * d_in
        x = x.to(self.device)
        if self.device.type == "cpu":
            self._use_threads(macs)
        weight = self.weights[op, layer]
        if (weight.d_out if self.privacy == "otp" else weight.shape[0]) == 0:  # a rank left no columns
            return x.new_empty(x.shape[0], 0)
        if self.privacy == "otp":
            return ring_matmul(x, weight, out)
        return linear(x, weight, out=out, macs=macs)

    def _use_threads(self, macs: int) -> None:
        if self.device.type != "cpu":
            return
        threads = product_threads(macs)
        if threads != self.threads:
            torch.set_num_threads(threads)
            self.threads = threads

    def serve(self, sock: ServerSocket, stop: threading.Event, poll_ms: int = 200, busy_poll_us: int = 0,
              spin_max_us: int = DEFAULT_SPIN_MAX_US) -> None:
        """Answer requests until `stop` is set. A bad request gets an error reply, never a crash.

        While doorbell clients are attached, poll their doorbells and the socket for a window
        adapted to the traffic after the last request; then announce sleep, look once more, and
        block on the socket (a client rings there when it sees us asleep)."""
        window = SpinWindow(spin_max_us if self.doorbell else 0)
        cpu_wait = CpuWait()
        with torch.inference_mode():
            self._serve_until(sock, stop, window, cpu_wait, poll_ms, busy_poll_us)

    def _serve_until(self, sock: ServerSocket, stop: threading.Event, window: "SpinWindow", cpu_wait: CpuWait,
                     poll_ms: int, busy_poll_us: int) -> None:
        turns = 0  # since the last request: a look at the socket costs a microsecond, so every SOCKET_EVERY turns
        while not stop.is_set():
            if self._serve_doorbells(sock) or (turns % SOCKET_EVERY == 0 and self._serve_socket(sock, 0)):
                window.busy()
                turns = 0
            elif window.open() and self.regions and not cpu_wait.contended():
                turns += 1
                relax()
            elif self._sleep(sock, poll_ms, busy_poll_us):
                window.busy()
                turns = 0

    def _sleep(self, sock: ServerSocket, poll_ms: int, busy_poll_us: int) -> bool:
        """Block on the socket until a message or poll_ms; whether something was served."""
        self._announce(ASLEEP)
        try:
            if self._serve_doorbells(sock):  # posted while we decided to sleep: its client saw us awake
                return True
            if self._serve_socket(sock, poll_ms, busy_poll_us):
                return True
            if self.group is not None:
                self.group.heartbeat()
            return False
        finally:
            self._announce(AWAKE)

    def _announce(self, state: int) -> None:
        if self.doorbell:
            for region in self.regions.values():
                region.doorbell.set_server(state)

    def _serve_socket(self, sock: ServerSocket, timeout_ms: int, spin_us: int = 0) -> bool:
        msg = sock.recv(timeout_ms, spin_us)
        if msg is None:
            return False
        self.requests += 1
        reply = self._answer(sock, msg)
        if reply is not None:
            sock.reply(msg, *reply)
        return True

    def _answer(self, sock: ServerSocket, msg: Incoming) -> tuple[bytes, list] | None:
        """handle(), with every failure turned into an error reply sent at once."""
        try:
            return self.handle(msg)
        except tensor_parallel.GroupDown:  # a rank is gone: no reply; rank 0 stops, and its clients see the connection go
            raise
        except ProtocolError as e:
            sock.reply_error(msg, msg.header, e.code, str(e))
        except Exception as e:  # never let one request take the server down
            sock.reply_error(msg, msg.header, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}")
        return None

    def _serve_doorbells(self, sock: ServerSocket) -> bool:
        """Answer every request waiting in a doorbell; whether there was one."""
        served = False
        for key, region in list(self.regions.items()):
            seq = region.doorbell.pending(self.handled.get(key, 0)) if self.doorbell else 0
            if not seq:
                continue
            served, self.handled[key] = True, seq
            self.requests += 1
            peer, bell = self.peers[key], region.doorbell
            try:
                msg = Incoming(peer.envelope, bell.request_header(), [], peer.legacy, key)
            except ProtocolError as e:
                sock.reply_error(peer, b"", e.code, str(e))
                msg = None
            reply = self._answer(sock, msg) if msg is not None else None
            if reply is not None and not reply[1]:
                state = bell.answer(seq, reply[0])
                if state not in (AWAKE, WAITING):  # it sleeps on its socket: the reply goes there too
                    sock.reply(msg, *reply)
            else:  # an error (sent already) or a reply too large for the region: news on the socket
                if reply is not None:
                    sock.reply(msg, *reply)
                state = bell.client_state()
            if state == WAITING:
                bell.wake_client()
        return served


class SpinWindow:
    """How long the server keeps polling after a request: twice the typical gap between requests
    (the clients' own compute between products), within [MIN_SPIN_US, the configured maximum].
    Gaps longer than the maximum are idle time and do not count."""

    MIN_SPIN_US = 50

    def __init__(self, max_us: int):
        self.max_ns = max_us * 1000
        self.gap_ns = self.MIN_SPIN_US * 1000.0
        self.last_ns = 0

    def busy(self) -> None:
        now = time.perf_counter_ns()
        gap = now - self.last_ns
        if gap < self.max_ns:
            self.gap_ns += (gap - self.gap_ns) / 8
        self.last_ns = now

    def open(self) -> bool:
        window = min(self.max_ns, max(self.MIN_SPIN_US * 1000, 2 * self.gap_ns))
        return time.perf_counter_ns() - self.last_ns < window


def serve(config: ServerConfig, ready=None, stop: threading.Event | None = None) -> None:
    """Load the model, bind, print the endpoint once ready, serve until SIGINT/SIGTERM or `stop`.
    With --tensor-parallel N: join (or start) the group first; ranks other than 0 follow rank 0."""
    device = pick_device(config.device)
    where = tensor_parallel.place(config)
    store, procs = tensor_parallel.start_ranks(config, where) if where else (None, [])
    server, grace_s, stop, down, serving = None, 10.0, stop or threading.Event(), [], threading.Event()
    if procs:
        threading.Thread(target=tensor_parallel.watch_ranks, args=(procs, stop, down, serving), daemon=True).start()
    try:
        if where is not None:
            tensor_parallel.join(where, device, store)
        server = _load(config, device, where)
        if where is not None and where.rank > 0:
            _follow(config, server)
        else:
            serving.set()
            _serve_endpoint(config, server, ready, stop, down)
    except tensor_parallel.GroupDown:
        grace_s = 1.0  # a rank failed: the others get a moment to exit, then are killed
        raise
    finally:
        if server is not None and server.group is not None and server.part[0] == 0:
            server.group.stop()
        tensor_parallel.end_ranks(procs, grace_s)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _load(config: ServerConfig, device: torch.device, where) -> LinearServer:
    """This process's LinearServer: every weight, or this rank's slices (then the group's reports)."""
    weights = load_weights(config.model, fingerprint=where is None or where.rank == 0)
    server = LinearServer(weights, device, WIRE_DTYPES[config.dtype], allow_shm=config.data_plane == "shm",
                          privacy=config.privacy, doorbell=config.control_plane == "doorbell",
                          part=where.part if where else (0, 1))
    del weights
    if where is not None:
        server.group = tensor_parallel.TensorGroup(where, device, config.tp_fan_out, config.tp_timeout_s)
        gathered = server.group.collect(tensor_parallel.rank_report(server), server.row_digests or None)
        if where.rank == 0:
            server.ranks = [report for report, _ in gathered]
            if server.privacy == "otp":  # the whole integer weights' fingerprint, from every rank's rows
                server.ring_fingerprint = ring_fingerprint_of_ranks([digests for _, digests in gathered])
        server.row_digests = {}
    return server


def _follow(config: ServerConfig, server: LinearServer) -> None:
    """A rank other than 0: compute its columns of every request until rank 0 says stop or is gone."""
    rank, ranks = server.part
    if config.parent_pid is not None:
        threading.Thread(target=tensor_parallel.exit_when_gone, args=(config.parent_pid,), daemon=True).start()
    print(f"teegpu tensor-parallel rank {rank} of {ranks} ready ({server.weight_bytes / 2**20:.1f} MiB of "
          f"weights)", file=sys.stderr, flush=True)
    try:
        with torch.inference_mode():
            server.group.follow(server)
    except RuntimeError as e:  # rank 0 is gone, or a collective timed out
        raise tensor_parallel.GroupDown(f"tensor-parallel rank {rank}: group down: {tensor_parallel.reason(e)}") from e


def _serve_endpoint(config: ServerConfig, server: LinearServer, ready, stop: threading.Event, down: list) -> None:
    """Rank 0 (or a single server): bind the endpoint and answer requests until `stop` (or a rank
    it started exits: `down` then says which)."""
    curve = ServerCurve(config.curve_secret, config.curve_allow) if config.curve_secret else None
    sock = ServerSocket(config.endpoint, curve=curve)
    if config.parent_pid is not None:
        threading.Thread(target=_stop_when_gone, args=(config.parent_pid, stop), daemon=True).start()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    group = f", tensor parallel {server.part[1]} (fan-out {server.group.fan_out})" if server.group else ""
    print(f"teegpu server ready on {sock.bound_url} (device {server.device}, dtype {config.dtype}, "
          f"data plane {config.data_plane}, control plane {config.control_plane}, privacy {config.privacy}, "
          f"curve {'on' if curve else 'off'}, kernels {server.kernels.get('isa', 'cuda')}{group})", flush=True)
    if ready is not None:
        ready(sock.bound_url)
    try:
        server.serve(sock, stop, busy_poll_us=config.busy_poll_us, spin_max_us=config.spin_max_us)
    finally:
        for region in server.regions.values():
            region.close()
        sock.close()
        print(f"teegpu server stopped after {server.requests} requests", file=sys.stderr, flush=True)
    if down:
        raise tensor_parallel.GroupDown(down[0])


def _stop_when_gone(pid: int, stop: threading.Event, interval_s: float = 0.5) -> None:
    """Set `stop` once process `pid` has exited (we were reparented), even if it died by SIGKILL."""
    while not stop.wait(interval_s):
        if os.getppid() != pid:
            print(f"teegpu server: parent process {pid} is gone, stopping", file=sys.stderr, flush=True)
            stop.set()
