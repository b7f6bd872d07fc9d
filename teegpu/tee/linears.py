"""What sits behind the model's `linears` seam on the trusted side."""
from __future__ import annotations

import functools
import time

import torch

from teegpu.errors import ConfigError, HandshakeError, IntegrityError
from teegpu.model.products import kernels, linear, pack, product_threads
from teegpu.model.weights import ModelWeights
from teegpu.options import DEFAULT_MASK_POOL_ROWS
from teegpu.protocol import WIRE_DTYPES, Hello, Op
from teegpu.ring import block_rows, quantize_linears, quantize_rows, ring_matmul
from teegpu.tee.integrity import FloatVerifier, RingVerifier
from teegpu.tee.mask_pool import LocalPads, MaskPool, PoolStats, Recycler, ServerPads
from teegpu.telemetry import RpcTelemetry
from teegpu.transport import RpcClient



class LocalLinears:
    """The TEE-only baseline: the trusted side multiplies by its own weights, with the server's
    kernels. In otp mode, the integer products of the ring weights without pads: what
    OtpLinears returns after unpadding, so the split equals this bit for bit (docs/fidelity.md)."""

    telemetry = None

    def __init__(self, weights: ModelWeights, dtype: torch.dtype = torch.float32, privacy: str = "plain"):
        kernels()  # before packing: probes the kernels (and asks for AMX tiles where present)
        self.shapes = weights.served_shapes()
        self.scales = None
        if privacy == "otp":
            quantized = quantize_linears(weights)
            self.weights = quantized.weights
            self.scales = quantized.scales
        else:
            self.weights = {key: pack(w) for key, w in weights.served(dtype)}

    def linear(self, op: Op, layer: int, x: torch.Tensor) -> torch.Tensor:
        if self.scales is not None:
            return self._ring_linear(op, layer, x)
        d_out, d_in = self.shapes[op, layer]
        before, threads = torch.get_num_threads(), product_threads(x.shape[0] * d_out * d_in)
        if threads == before:
            return linear(x, self.weights[op, layer])
        torch.set_num_threads(threads)
        try:
            return linear(x, self.weights[op, layer])
        finally:
            torch.set_num_threads(before)

    def _ring_linear(self, op: Op, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Exact integers: the same bits on any number of threads."""
        xq, sx = quantize_rows(x)
        y = ring_matmul(xq, self.weights[op, layer])
        return rescale(y, sx, self.scales[op, layer], x.dtype)

    def matmul(self, op: Op, layer: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.bmm(a, b)

    def stats(self) -> dict:
        return {}

    def close(self) -> None:
        pass  # nothing held but tensors


class RemoteLinears:
    """Every product goes to the untrusted server; every reply is checked for shape and dtype,
    and with `verify` by Freivalds' check before anything uses it.

    Results come back in the wire dtype, which is also the trusted side's activation dtype.
    """

    def __init__(self, client: RpcClient, weights: ModelWeights, wire_dtype: torch.dtype,
                 telemetry: RpcTelemetry | None = None, verify: bool = False):
        self.client = client
        self.telemetry = telemetry or RpcTelemetry(transport=client.endpoint.transport)
        self.wire_dtype = wire_dtype
        self.out_features = {key: shape[0] for key, shape in weights.served_shapes().items()}
        self.verifier = FloatVerifier(weights.served(wire_dtype), wire_dtype) if verify else None

    def linear(self, op: Op, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self._call(op, layer, (x,), (x.shape[0], self.out_features[op, layer]))

    def matmul(self, op: Op, layer: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self._call(op, layer, (a, b), (a.shape[0], a.shape[1], b.shape[2]))

    def _call(self, op: Op, layer: int, inputs, expected_shape, started: int | None = None,
              snapshot: bool = True) -> torch.Tensor:
        """The checked reply; without `snapshot` possibly a view of the shared region, which the
        caller must read exactly once (the server can write there at any time)."""
        reply = self.client.call(op, layer, inputs, dtype=self.wire_dtype, started_ns=started)
        outputs = reply.tensors
        if len(outputs) != 1 or tuple(outputs[0].shape) != expected_shape or outputs[0].dtype != self.wire_dtype:
            got = [(str(t.dtype), list(t.shape)) for t in outputs]
            raise IntegrityError(op.name, layer, f"server replied {got}, expected {self.wire_dtype} "
                                 f"{list(expected_shape)}")
        out = outputs[0]
        if snapshot and self.client.shm is not None:  # the region is reused (and writable by the server): copy out
            out = out.clone()
        if self.verifier is not None:
            self.verifier.check(op, layer, list(inputs), out)
        self.telemetry.record(op.name, layer, (*reply.stamps[:5], time.perf_counter_ns()), reply.header.compute_ns,
                              reply.header.overhead_ns, reply.sent, reply.received, reply.path,
                              reply.tries)
        return out

    def stats(self) -> dict:
        """The client's own call and byte counts, plus the telemetry's time breakdown."""
        return {**self.client.stats.as_dict(), "breakdown_ms": self.telemetry.summary()["breakdown_ms"]}

    def close(self) -> None:
        self.telemetry.close()  # the client belongs to the engine, which closes it


class OtpLinears(RemoteLinears):
    """The server sees only one-time-padded int16 fixed-point activations, uniform over Z/2^64.

    Per call: quantize each row (per-row scale), add fresh pads R from the pool, send;
    subtract the pool's R*W^T from the reply, which leaves the exact integer product;
    check it (with `verify`), rescale. docs/security.md explains what this hides.
    """

    def __init__(self, client: RpcClient, weights: ModelWeights, telemetry: RpcTelemetry | None = None,
                 verify: bool = False, pool_rows: int = DEFAULT_MASK_POOL_ROWS, progress: bool = True,
                 pad_client: RpcClient | None = None, pad_hello: Hello | None = None, pads: str = "local"):
        """With `pad_client` (a pad server pool whose HELLO was `pad_hello`), the pads' products come
        from there and no ring copy of the weights is kept here; `pads` server-or-local allows
        building one when every pad server is down."""
        self.ring_verifier = RingVerifier(weights.served_shapes()) if verify else None
        quantized = quantize_linears(weights, self.ring_verifier.add_rows if verify else None,
                                     keep=pad_client is None)
        self.ring_fingerprint = quantized.fingerprint
        self.scales = quantized.scales
        super().__init__(client, weights, torch.int64, telemetry)  # the exact ring check replaces the float one
        shapes, stats, self.recycler = weights.served_shapes(), PoolStats(), Recycler()
        if pad_client is None:
            source = LocalPads(quantized.weights)
        else:  # the pad servers multiply by the same integer weights, or they are refused
            fingerprint = check_server(pad_hello, weights, "otp", self.ring_fingerprint).ring_fingerprint
            pad_client.on_connect = lambda other: check_server(other, weights, "otp", fingerprint)
            fallback = (lambda: LocalPads(quantize_linears(weights).weights)) if pads == "server-or-local" else None
            source = ServerPads(pad_client, shapes, stats, fallback, self.recycler)
        self.pool = MaskPool(shapes, source, pool_rows, progress=progress, stats=stats)

    def linear(self, op: Op, layer: int, x: torch.Tensor) -> torch.Tensor:
        xq, sx = quantize_rows(x, self.recycler.get(x.numel()).view(x.shape))
        scale, d_out = self.scales[op, layer], self.out_features[op, layer]
        if self.ring_verifier is None:  # rescaled block by block as the pads come off: no integer copy
            out = torch.empty((x.shape[0], d_out), dtype=x.dtype)
            self.integer_linear(op, layer, xq, emit=lambda at, y: rescale_rows(out, at, y, sx, scale))
        else:  # the check needs the whole integer product
            y = self.integer_linear(op, layer, xq, self.recycler.get(x.shape[0] * d_out))
            out = rescale(y, sx, scale, x.dtype)
            self.recycler.put(y)
        self.recycler.put(xq)  # sent and checked: the buffers serve the next request of their size
        return out

    def integer_linear(self, op: Op, layer: int, xq: torch.Tensor, out: torch.Tensor | None = None,
                       emit=None) -> torch.Tensor | None:
        """The exact product xq (int64, |xq| <= 2^15, overwritten) times the integer weight, through the
        padded server. The RPC's record starts once the pads are taken: pads made online count in the
        pool's stall time. The product is written into `out` (flat, T * d_out words) when given, or
        handed to `emit(row, rows)` a block at a time (MaskPool.unpad; not with --verify)."""
        rows, d_out = xq.shape[0], self.out_features[op, layer]
        taken = self.pool.take((op, layer), rows)
        started = time.perf_counter_ns()
        padded = taken.add_to(xq)  # wraps mod 2^64: uniform whatever xq is; in xq's memory (xq is consumed)
        verifier = self.ring_verifier
        check = (lambda r, rw: verifier.check_pads(op, layer, r, rw)) if verifier and self.pool.server else None
        y = None
        if emit is None:
            y = torch.empty((rows, d_out), dtype=torch.int64) if out is None else out.view(rows, d_out)
        # in pieces that fit the shared region (exact: a ring product's rows do not depend on each other);
        # a request of no rows is sent all the same
        step = self.client.region_rows(8 * xq.shape[1], 8 * d_out) or max(rows, 1)
        for at in range(0, max(rows, 1), step):
            n = min(step, rows - at)
            returned = self._call(op, layer, (padded[at:at + n],), (n, d_out), started, snapshot=False)
            piece = taken if n == rows else taken.rows(at, at + n)
            piece_emit = emit if emit is None or at == 0 else functools.partial(_shifted, emit, at)
            # one read of the reply, wherever it lies
            self.pool.unpad((op, layer), returned, piece, check, None if y is None else y[at:at + n], piece_emit)
            started = None
        if verifier is not None:
            verifier.check(op, layer, taken.subtract_from(padded), y)
        self.pool.release(taken)
        return y

    def matmul(self, op: Op, layer: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise ConfigError("attention is never offloaded in otp mode (Q*K^T would reveal the prompt)")

    def stats(self) -> dict:
        return {**super().stats(), "mask_pool": self.pool.stats.as_dict()}

    def close(self) -> None:
        self.pool.close()
        super().close()


def _shifted(emit, offset: int, at: int, rows: torch.Tensor) -> None:
    emit(offset + at, rows)


def rescale(y: torch.Tensor, sx: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float product of an exact integer one (T, d_out), row scales sx, column scales `scale`.
    In float32: y rounded once (its 24-bit mantissa keeps a float32 activation's precision), times
    the two scales, a block of rows at a time (`block_rows`), into a new contiguous tensor (the
    split and the in-process run hand the model the same layout; y's buffer can be reused)."""
    out = torch.empty(y.shape, dtype=dtype)
    step = block_rows(y.shape[1] * 8)
    for i in range(0, y.shape[0], step):
        rescale_rows(out, i, y[i:i + step], sx, scale)
    return out


def rescale_rows(out: torch.Tensor, at: int, y: torch.Tensor, sx: torch.Tensor, scale: torch.Tensor) -> None:
    """out[at:at + len(y)] = rescale's float rows of the integer rows y (rows at.. of the product)."""
    rows = slice(at, at + y.shape[0])
    torch.mul(y, sx[rows], out=out[rows]).mul_(scale)  # y rounded to float32 once, as y.float() would


def handshake(client: RpcClient, weights: ModelWeights, privacy: str = "plain") -> Hello:
    """Check the server's protocol version, privacy mode, and that it serves exactly our weights."""
    return check_server(Hello.from_bytes(client.call(Op.HELLO, 0).payload), weights, privacy)


def check_server(hello: Hello, weights: ModelWeights, privacy: str, ring_fingerprint: str | None = None) -> Hello:
    """Refuse a server (HandshakeError) that serves other weights, another privacy mode, or in otp
    mode other integer weights than `ring_fingerprint`."""
    if hello.fingerprint != weights.fingerprint:
        raise HandshakeError(
            f"server serves weights with fingerprint {str(hello.fingerprint)[:16]}..., this client loaded "
            f"{weights.fingerprint[:16]}... (different model files?)"
        )
    if hello.privacy != privacy:
        raise HandshakeError(f"server runs privacy mode {hello.privacy!r}, this client wants {privacy!r} "
                             f"(start it with --privacy {privacy})")
    if privacy == "plain" and hello.dtype not in WIRE_DTYPES:
        raise HandshakeError(f"server announces unsupported dtype {hello.dtype!r}")
    if ring_fingerprint is not None and hello.ring_fingerprint != ring_fingerprint:
        raise HandshakeError("server's integer weights differ from this client's (another quantization?)")
    return hello


def open_linears(client: RpcClient, weights: ModelWeights, hello: Hello, privacy: str, verify: bool,
                 pool_rows: int = DEFAULT_MASK_POOL_ROWS, pad_client: RpcClient | None = None,
                 pads: str = "local") -> RemoteLinears:
    """The linears for a server that passed `handshake`; in otp mode also compare the integer weights.
    Every server the client reconnects to later (a retry, a failover) passes the same checks, and
    in plain mode must serve the same dtype."""
    if privacy == "plain":
        linears = RemoteLinears(client, weights, WIRE_DTYPES[hello.dtype], verify=verify)
        client.on_connect = lambda other: same_dtype(check_server(other, weights, privacy), hello)
        return linears
    pad_hello = handshake(pad_client, weights, privacy) if pad_client is not None else None
    linears = OtpLinears(client, weights, verify=verify, pool_rows=pool_rows, pad_client=pad_client,
                         pad_hello=pad_hello, pads=pads)
    try:
        check_server(hello, weights, privacy, linears.ring_fingerprint)
    except HandshakeError:
        linears.close()
        raise
    client.on_connect = lambda other: check_server(other, weights, privacy, linears.ring_fingerprint)
    return linears


def same_dtype(hello: Hello, first: Hello) -> None:
    if hello.dtype != first.dtype:
        raise HandshakeError(f"server serves {hello.dtype}, the pool's first server {first.dtype}")
