"""otp with a pad server: the same bits as local pads, each server sees only its share (from the
bytes on the wire), a lying pad server is caught, and a dead one costs no answer."""
import socket
import struct
import threading

import pytest
import torch

from rewriting_proxy import RewritingProxy
from teegpu.config import ServerConfig
from teegpu.errors import IntegrityError, ServerError
from teegpu.protocol import PAD_KEY_FRAME, ErrorCode, Op, TensorDesc, decode_header, encode_header, tensor_frame
from teegpu.server_process import ServerProcess, private_endpoint
from teegpu.tee.engine import Engine, GenerationConfig
from teegpu.tee.mask_pool import ServerPads
from teegpu.tee.scheduler import Scheduler, SchedulerConfig
from teegpu.transport import RpcClient

PROMPT = "The capital of France is"
GEN = GenerationConfig(max_new_tokens=8, stop_at_eos=False)


@pytest.fixture(scope="module")
def pad_servers():
    """Pad servers of this module (each a plain `teegpu serve --privacy otp`), started on first use."""
    procs = {}

    def get(name: str, transport: str = "ipc") -> ServerProcess:
        if name not in procs:
            endpoint = "tcp://127.0.0.1:*" if transport == "tcp" else private_endpoint()
            procs[name] = ServerProcess(ServerConfig(endpoint=endpoint, privacy="otp"))
        procs[name].wait_ready()
        return procs[name]

    yield get
    for p in procs.values():
        p.stop()


@pytest.fixture(scope="module")
def local_pads(smollm2, smollm2_servers):
    """The reference: otp with the pads made in the trusted side. (tokens, logits of the prompt)."""
    weights, tok = smollm2
    with Engine.connect(weights, tok, smollm2_servers("ipc", privacy="otp"), privacy="otp", data_plane="shm") as e:
        tokens = e.generate(PROMPT, GEN).token_ids
        ids = e.encode(PROMPT)
        logits = e.forward(ids, 0, e.new_cache(len(ids)), all_logits=True)
    return tokens, logits


def pad_engine(smollm2, main: str, pad_urls: list[str], plane: str, **kw) -> Engine:
    weights, tok = smollm2
    return Engine.connect(weights, tok, main, privacy="otp", data_plane=plane, pad_server=tuple(pad_urls),
                          pads=kw.pop("pads", "server"), **kw)


def test_pad_server_pads_give_the_bits_of_local_pads(smollm2, smollm2_servers, pad_servers, local_pads):
    """On the shm plane here; on the socket plane in the wire test below."""
    plane = "shm"
    tokens, logits = local_pads
    pad = pad_servers("a").wait_ready()
    with pad_engine(smollm2, smollm2_servers("ipc", privacy="otp"), [pad], plane) as engine:
        assert isinstance(engine.linears.pool.source, ServerPads)
        assert engine.linears.pool.source._local is None  # no ring copy of the weights here
        result = engine.generate(PROMPT, GEN)
        ids = engine.encode(PROMPT)
        assert torch.equal(engine.forward(ids, 0, engine.new_cache(len(ids)), all_logits=True), logits)
        stats = engine.linears.pool.stats.as_dict()
    assert result.token_ids == tokens
    assert stats["pads"] == "server" and stats["server_rows"] > 0 and stats["fallback_rows"] == 0
    assert result.timings["prefill_cpu_ms"] > 0 and result.timings["decode_cpu_ms_per_token"] > 0


def test_requests_larger_than_the_region_go_in_pieces_with_the_same_bits(smollm2, smollm2_servers, pad_servers,
                                                                          local_pads):
    """A 64 KB region holds 2 rows of SmolLM2's gate/up product: the prompt's products go through it
    a few rows at a time (not inline), pieces that cross the pool's 3-row batches, and give local
    pads' bits."""
    tokens, logits = local_pads
    pad = pad_servers("a").wait_ready()
    with pad_engine(smollm2, smollm2_servers("ipc", privacy="otp"), [pad], "shm", shm_bytes=64 << 10,
                    mask_pool_rows=3) as engine:
        assert engine.client.region_rows(8 * 576, 8 * 3072) == 2
        ids = engine.encode(PROMPT)
        assert len(ids) > 3
        calls = engine.client.stats.calls
        assert torch.equal(engine.forward(ids, 0, engine.new_cache(len(ids)), all_logits=True), logits)
        layers = engine.config.num_layers
        assert engine.client.stats.calls - calls > 4 * layers + 1  # pieces: more than one call per weight
        assert engine.generate(PROMPT, GEN).token_ids == tokens


def test_batched_sequences_get_the_bits_of_local_pads(smollm2, smollm2_servers, pad_servers):
    """The scheduler's packed steps (several sequences, several pad requests per weight) unpad exactly."""
    weights, tok = smollm2
    main = smollm2_servers("ipc", privacy="otp")
    prompts = [PROMPT, "Water boils at", "List three colours:"]
    outputs = []
    for pads in ([], [pad_servers("a").wait_ready()]):
        engine = Engine.connect(weights, tok, main, privacy="otp", data_plane="shm", pad_server=tuple(pads),
                                pads="server" if pads else "local", mask_pool_rows=4)
        with engine:
            scheduler = Scheduler(engine, SchedulerConfig(max_batch=3, prefill_chunk=64))
            seqs = [scheduler.submit(engine.encode(p), GenerationConfig(max_new_tokens=6, stop_at_eos=False,
                                                                         logprobs=2)) for p in prompts]
            while not all(s.done.is_set() for s in seqs):
                scheduler.step()
            outputs.append([(s.out, s.logprobs) for s in seqs])
    assert outputs[0] == outputs[1]


def test_bad_pad_requests_get_their_errors(pad_servers):
    key_id = 12345
    with RpcClient(pad_servers("a").wait_ready(), timeout_ms=10_000) as client:
        def pads(layer=0, op=Op.QKV, rows=2, key=key_id, dtype=torch.int64, nonce=1):
            return client.call(Op.PADS, layer, [torch.tensor([key, nonce, int(op), rows], dtype=dtype)])

        bad = [(dict(), ErrorCode.UNKNOWN_KEY, "key id 12345"),
               (dict(dtype=torch.int32), ErrorCode.BAD_SHAPE, "int64"),
               (dict(op=Op.ATTN_SCORES), ErrorCode.UNKNOWN_METHOD, "not a linear layer"),
               (dict(rows=0), ErrorCode.BAD_SHAPE, "0 rows"),
               (dict(layer=99), ErrorCode.BAD_LAYER, "layer 99"),
               (dict(op=Op.LM_HEAD), ErrorCode.BAD_LAYER, "layer -1")]
        for kw, code, text in bad:
            with pytest.raises(ServerError) as info:
                pads(**kw)
            assert info.value.code == code and text in str(info.value), str(info.value)
        with pytest.raises(ServerError) as info:
            client.call(Op.PAD_KEY, 0, payload=bytes(23))
        assert info.value.code == ErrorCode.BAD_FRAMES
        client.call(Op.PAD_KEY, 0, payload=PAD_KEY_FRAME.pack(key_id, bytes(range(16))))
        first, again, other = (pads(nonce=n).tensors[0].clone() for n in (1, 1, 2))
    assert first.shape == (2, 576 + 2 * 192) and first.dtype == torch.int64
    assert torch.equal(first, again) and not torch.equal(first, other)


class RecordingRelay:
    """A TCP relay in front of a server that keeps every byte that crosses it, both ways."""

    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("tcp://").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.bytes = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst):
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            with self.lock:
                self.bytes += data
            try:
                dst.sendall(data)
            except OSError:
                return

    def transcript(self) -> bytes:
        with self.lock:
            return bytes(self.bytes)


def test_each_server_sees_only_its_share_on_the_wire(smollm2, smollm2_servers, pad_servers, local_pads):
    """The main server never receives the key, a nonce or R; the pad server never receives X+R."""
    main_relay = RecordingRelay(smollm2_servers("tcp", privacy="otp"))
    pad_relay = RecordingRelay(pad_servers("wire", "tcp").wait_ready())
    engine = pad_engine(smollm2, main_relay.url, [pad_relay.url], "socket", mask_pool_rows=4)
    source = engine.linears.pool.source
    sent_to_main, pads, products, nonces = [], [], [], []
    call, expand = engine.linears.client.call, source._expand

    def recording_call(op, layer, tensors=(), **kw):
        sent_to_main.extend(bytes(tensor_frame(t[:1, :4])) for t in tensors)  # 32 bytes of each request
        return call(op, layer, tensors, **kw)

    def recording_expand(batch):
        r = expand(batch)
        pads.append(bytes(tensor_frame(r[:, :4].contiguous())))
        nonces.append(struct.pack("<qq", source.key_id, batch.nonce))
        return r

    engine.linears.client.call, source._expand = recording_call, recording_expand
    with engine:  # the socket plane, bit for bit as local pads
        assert engine.generate(PROMPT, GenerationConfig(max_new_tokens=3, stop_at_eos=False)).token_ids == \
            local_pads[0][:3]
        products = [bytes(tensor_frame(b.rw[:1, :4].contiguous())) for q in engine.linears.pool._queue.values()
                    for b, _ in q if b.ready.is_set() and b.rw is not None]
    to_main, to_pad = main_relay.transcript(), pad_relay.transcript()
    assert sent_to_main and pads and products and nonces
    assert all(x in to_main for x in sent_to_main)  # the relay sees what crosses (the test can fail)
    assert source.key in to_pad and source.key not in to_main
    assert all(n in to_pad for n in nonces) and not any(n in to_main for n in nonces)
    assert struct.pack("<q", source.key_id) not in to_main
    assert not any(r[:32] in to_main or r[:32] in to_pad for r in pads)  # R never travels
    assert not any(x in to_pad for x in sent_to_main)  # X+R never reaches the pad server
    assert all(rw in to_pad for rw in products) and not any(rw in to_main for rw in products)
    assert len(set(nonces)) == len(nonces)  # no pad made twice


class LyingPadServer(RewritingProxy):
    """Forwards to a real pad server and rewrites its PADS replies as `mode` says."""

    def __init__(self, server_url: str, mode: str):
        self.mode, self.tampered, self.previous = mode, 0, {}
        super().__init__(server_url)

    def _rewrite(self, reply):
        head = decode_header(reply[0])
        if head.op != Op.PADS or head.status:
            return reply
        desc = head.tensors[0]
        out = torch.frombuffer(bytearray(reply[1]), dtype=torch.int64).view(desc.shape).clone()
        key = (head.layer, desc.shape)
        stale = self.previous.get(key)
        self.previous[key] = out.clone()
        if self.mode == "replay":
            if stale is None:
                return reply
            out = stale
        elif self.mode == "noise":
            out += torch.randint(-(1 << 40), 1 << 40, out.shape)  # as large as honest products
        elif self.mode == "top_bit":
            out[0, 5] += -(1 << 63)
        elif self.mode == "swap_rows":
            if out.shape[0] < 2:
                return reply
            out[[0, 1]] = out[[1, 0]]
        self.tampered += 1
        return [encode_header(head.op, head.request_id, head.layer, [TensorDesc(torch.int64, desc.shape)]),
                bytes(tensor_frame(out))]


@pytest.mark.parametrize("mode", ["noise", "top_bit", "replay", "swap_rows"])
def test_a_lying_pad_server_is_caught_under_verify(mode, smollm2, smollm2_servers, pad_servers):
    liar = LyingPadServer(pad_servers("a").wait_ready(), mode)
    streamed, error = [], None
    try:
        with pad_engine(smollm2, smollm2_servers("ipc", privacy="otp"), [liar.url], "socket", verify=True,
                        mask_pool_rows=2) as engine:
            engine.generate(PROMPT, GEN, on_text=streamed.append)
    except IntegrityError as e:
        error = e
    finally:
        liar.close()
    assert liar.tampered >= 1
    assert isinstance(error, IntegrityError), f"{mode} went unnoticed"
    if mode != "top_bit":  # a top-bit lie may pass the pad check (1 in 4), never the range check after it
        assert "pad server" in str(error)
    if mode != "replay":  # a replay needs an earlier reply of the same shape: some tokens came first
        assert streamed == []


def test_without_verify_a_lying_pad_server_goes_through(smollm2, smollm2_servers, pad_servers, local_pads):
    """The control: nothing checks, so the lie changes the answer (the test above can fail)."""
    liar = LyingPadServer(pad_servers("a").wait_ready(), "noise")
    try:
        with pad_engine(smollm2, smollm2_servers("ipc", privacy="otp"), [liar.url], "socket") as engine:
            tokens = engine.generate(PROMPT, GEN).token_ids
    finally:
        liar.close()
    assert tokens != local_pads[0]


def kill_after_first_token(proc: ServerProcess):
    done = []

    def on_text(_text):
        if not done:
            done.append(True)
            proc.proc.kill()
    return on_text


def test_a_dead_pad_server_fails_over_to_the_next(smollm2, smollm2_servers, local_pads):
    first, second = (ServerProcess(ServerConfig(endpoint=private_endpoint(), privacy="otp")) for _ in range(2))
    try:
        with pad_engine(smollm2, smollm2_servers("ipc", privacy="otp"), [first.wait_ready(), second.wait_ready()],
                        "shm", mask_pool_rows=2, timeout_ms=10_000) as engine:
            result = engine.generate(PROMPT, GEN, on_text=kill_after_first_token(first))
            stats = engine.linears.pool.stats.as_dict()
    finally:
        first.stop()
        second.stop()
    assert result.token_ids == local_pads[0]
    assert stats["pad_failovers"] >= 1 and stats["fallback_rows"] == 0 and stats["pads"] == "server"


def test_with_every_pad_server_dead_the_allowed_fallback_says_so(smollm2, smollm2_servers, local_pads, capfd):
    only = ServerProcess(ServerConfig(endpoint=private_endpoint(), privacy="otp"))
    try:
        with pad_engine(smollm2, smollm2_servers("ipc", privacy="otp"), [only.wait_ready()], "shm",
                        pads="server-or-local", mask_pool_rows=2, timeout_ms=3_000) as engine:
            result = engine.generate(PROMPT, GEN, on_text=kill_after_first_token(only))
            stats = engine.linears.pool.stats.as_dict()
    finally:
        only.stop()
    assert result.token_ids == local_pads[0]
    assert stats["pads"] == "local-fallback" and stats["fallback_rows"] > 0 and stats["pad_outages"] >= 1
    assert "every pad server is down" in capfd.readouterr().err


def test_the_api_with_a_pad_server_answers_as_local_pads(smollm2, smollm2_servers, pad_servers):
    """`teegpu api --privacy otp --pad-server`: concurrent requests, batched by the scheduler, answer
    as one otp sequence with local pads; /metrics and the evidence say where the pads come from."""
    import concurrent.futures

    import httpx
    import openai
    from api_process import ApiProcess

    weights, tok = smollm2
    main, pad = smollm2_servers("ipc", privacy="otp"), pad_servers("a").wait_ready()
    prompts = [PROMPT, "Water boils at", "List three colours:"]
    with Engine.connect(weights, tok, main, privacy="otp", data_plane="shm") as engine:
        solo = [engine.generate(p, GenerationConfig(max_new_tokens=6, stop_at_eos=False)).text for p in prompts]
    api = ApiProcess("--server", main, "--privacy", "otp", "--pad-server", pad, "--max-batch", "4")
    try:
        client = openai.OpenAI(base_url=api.url + "/v1", api_key="none", max_retries=0, timeout=120)
        ask = lambda p: client.completions.create(model="SmolLM2-135M-Instruct.Q4_1", prompt=p, max_tokens=6, temperature=0,  # noqa: E731
                                                  extra_body={"ignore_eos": True}).choices[0].text
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(ask, prompts))
        metrics = httpx.get(api.url + "/metrics").text
        evidence = httpx.get(api.url + "/.well-known/teegpu-attestation").json()
    finally:
        api.stop()
    assert answers == solo
    assert 'teegpu_pads{source="server"} 1.0' in metrics
    server_rows = next(line for line in metrics.splitlines() if line.startswith('teegpu_pad_rows{source="server"}'))
    assert float(server_rows.split()[-1]) > 0
    assert evidence["privacy"] == "otp" and evidence["pads"] == "server-or-local"
