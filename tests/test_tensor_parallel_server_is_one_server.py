"""A tensor-parallel server (`teegpu serve --tensor-parallel N`, real ranks on gloo) answers every
request with the single server's bits: each rank multiplies by its column slice with the kernel
and threads of the whole product, and rank 0 concatenates. The client sees one server; a rank
that dies takes the whole group down, and the client fails over; each rank holds its share of
the weights."""
import os
import signal
import time

import pytest
import torch
from openai import OpenAI

from api_process import ApiProcess
from conftest import SERVED_MODEL
from teegpu.config import GenerationConfig, ServerConfig
from teegpu.errors import ServerError, ServerUnavailable
from teegpu.model.config import ModelConfig
from teegpu.model.weights import column_slice
from teegpu.protocol import PAD_KEY_FRAME, Hello, Op
from teegpu.server_process import ServerProcess, private_endpoint
from teegpu.tee.engine import Engine
from teegpu.telemetry.memory import peak_rss
from teegpu.transport.rpc_client import RpcClient

PROMPT = "Explain why the sky is blue."
GEN = GenerationConfig(max_new_tokens=16, stop_at_eos=False)
OPS = (Op.QKV, Op.O, Op.GATE_UP, Op.DOWN, Op.LM_HEAD)
ROWS = (1, 7, 300)  # 300 rows: the float32 products that go to oneDNN (ONEDNN_MACS) on one server
RING_ROWS = (1, 7, 40)  # otp: one kernel at any size (int8 digit GEMMs), exact


@pytest.fixture(scope="module")
def tp_servers():
    """2-rank servers of the real model, one per (dtype, privacy), started on first use."""
    procs: dict = {}

    def get(dtype: str = "float32", privacy: str = "plain", model: str | None = None, ranks: int = 2) -> ServerProcess:
        key = (dtype, privacy, model, ranks)
        if key not in procs:
            procs[key] = ServerProcess(ServerConfig(model=model, endpoint=private_endpoint(), dtype=dtype,
                                                    privacy=privacy, tensor_parallel=ranks))
        procs[key].wait_ready()
        return procs[key]

    yield get
    for p in procs.values():
        p.stop()


def hello(client: RpcClient) -> Hello:
    return Hello.from_bytes(client.call(Op.HELLO, 0).payload)


def op_input(op: Op, rows: int, config: dict, privacy: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d_in = config["intermediate_size"] if op == Op.DOWN else config["hidden_size"]
    if privacy == "otp":  # padded activations: any int64
        return torch.randint(-2 ** 63, 2 ** 63 - 1, (rows, d_in), dtype=torch.int64, generator=g)
    return torch.randn(rows, d_in, generator=g).to(dtype)


def assert_every_op_equal(single: RpcClient, parallel: RpcClient, privacy: str, dtype: torch.dtype) -> None:
    config = hello(single).config
    for op in OPS:
        for layer in ([-1] if op == Op.LM_HEAD else [0, config["num_layers"] - 1]):
            for rows in RING_ROWS if privacy == "otp" else ROWS:
                x = op_input(op, rows, config, privacy, dtype, seed=rows + layer)
                want = single.call(op, layer, [x]).tensors[0].clone()
                got = parallel.call(op, layer, [x]).tensors[0].clone()
                assert got.dtype == want.dtype and torch.equal(got, want), (op.name, layer, rows)


@pytest.mark.parametrize("dtype, privacy", [("float32", "plain"), ("bfloat16", "plain"), ("float32", "otp")])
def test_every_op_is_the_single_servers_bit_for_bit(dtype, privacy, smollm2_servers, tp_servers):
    single = RpcClient(smollm2_servers("ipc", dtype, privacy), data_plane="shm")
    parallel = RpcClient(tp_servers(dtype, privacy).endpoint, data_plane="shm")
    one, two = hello(single), hello(parallel)
    assert two.tensor_parallel == 2 and len(two.ranks) == 2 and one.tensor_parallel == 1
    # the fingerprints are over the whole weights, whoever holds which slice
    assert (two.fingerprint, two.ring_fingerprint) == (one.fingerprint, one.ring_fingerprint)
    wire = torch.int64 if privacy == "otp" else getattr(torch, dtype)
    for client in (single, parallel):  # bad and empty requests get the single server's errors; the group serves on
        for bad in (torch.zeros(2, 3, dtype=wire), torch.zeros(0, one.config["hidden_size"], dtype=wire)):
            with pytest.raises(ServerError, match="BAD_SHAPE"):
                client.call(Op.O, 0, [bad])
    assert_every_op_equal(single, parallel, privacy, wire)
    if privacy == "otp":  # the pad server's request: pads expanded on rank 0, multiplied by every rank
        for client in (single, parallel):
            client.call(Op.PAD_KEY, 0, payload=PAD_KEY_FRAME.pack(7, bytes(range(16))))
        pads = torch.tensor([7, 12345, int(Op.GATE_UP), 5], dtype=torch.int64)
        want = single.call(Op.PADS, 2, [pads]).tensors[0].clone()
        assert torch.equal(want, parallel.call(Op.PADS, 2, [pads]).tensors[0])
    single.close(), parallel.close()


def test_uneven_slices_on_three_ranks(tiny_model_dir, tiny_server, tp_servers):
    """The tiny model's 128, 320 and 64 columns do not divide into 3 blocks of 64: slices of unequal size,
    and an empty one."""
    assert [column_slice(320, r, 3) for r in range(3)] == [(0, 128), (128, 256), (256, 320)]
    assert column_slice(64, 0, 3) == (0, 64) and column_slice(64, 2, 3) == (64, 64)  # none left for rank 2
    single = RpcClient(tiny_server.endpoint, data_plane="socket")
    parallel = RpcClient(tp_servers(model=str(tiny_model_dir), ranks=3).endpoint, data_plane="socket")
    assert hello(parallel).tensor_parallel == 3
    assert_every_op_equal(single, parallel, "plain", torch.float32)
    single.close(), parallel.close()


@pytest.mark.parametrize("privacy", ["plain", "otp"])
def test_greedy_generation_equals_the_single_servers(privacy, smollm2, smollm2_servers, tp_servers):
    """Through the shm plane and the doorbell; otp with --verify (Freivalds on every reply)."""
    weights, tok = smollm2
    kw = dict(privacy=privacy, verify=privacy == "otp", data_plane="shm", control_plane="doorbell")
    if privacy == "otp":
        kw["mask_pool_rows"] = 16  # the pads the trusted side makes ahead: fewer, sooner
    gen = GenerationConfig(max_new_tokens=8 if privacy == "otp" else 16, stop_at_eos=False)  # otp: pads made here
    tokens = []
    for endpoint in (smollm2_servers("ipc", "float32", privacy), tp_servers("float32", privacy).endpoint):
        with Engine.connect(weights, tok, endpoint, **kw) as engine:
            tokens.append(engine.generate(PROMPT, gen, chat=True).token_ids)
    assert len(tokens[0]) == gen.max_new_tokens and tokens[0] == tokens[1]


def test_the_api_batches_on_a_tensor_parallel_server(smollm2, smollm2_servers, tp_servers):
    """Concurrent chats through `teegpu api --server` on a 2-rank server get the solo answers."""
    from concurrent.futures import ThreadPoolExecutor

    weights, tok = smollm2
    prompts = ["The capital of France is", "Write a haiku about the sea.", "def fibonacci(n):"]
    with Engine.connect(weights, tok, smollm2_servers("ipc"), data_plane="shm") as engine:
        solo = [engine.generate(p, GEN, chat=True).text for p in prompts]
    api = ApiProcess("--server", tp_servers().endpoint, "--max-batch", "4", "--api-key", "k")
    try:
        client = OpenAI(base_url=f"{api.url}/v1", api_key="k")

        def ask(prompt: str) -> str:
            reply = client.chat.completions.create(model=SERVED_MODEL, messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=GEN.max_new_tokens, temperature=0)
            return reply.choices[0].message.content

        with ThreadPoolExecutor(len(prompts)) as pool:
            assert list(pool.map(ask, prompts)) == solo
    finally:
        assert api.stop() == 0


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_a_dead_rank_takes_the_group_down_and_the_client_fails_over(smollm2, smollm2_servers):
    weights, tok = smollm2
    backup = smollm2_servers("ipc")
    with Engine.connect(weights, tok, backup, data_plane="shm") as engine:
        undisturbed = engine.generate(PROMPT, GEN, chat=True).token_ids
    group = ServerProcess(ServerConfig(endpoint=private_endpoint(), tensor_parallel=2))
    try:
        with Engine.connect(weights, tok, [group.wait_ready(), backup], data_plane="shm", timeout_ms=20_000) as engine:
            pids = [r["pid"] for r in engine.hello.ranks]
            count = [0]

            def on_text(_):
                count[0] += 1
                if count[0] == 5:
                    os.kill(pids[1], signal.SIGKILL)

            assert engine.generate(PROMPT, GEN, chat=True, on_text=on_text).token_ids == undisturbed
            assert engine.client.stats.failovers >= 1
        assert group.proc.wait(10) != 0  # rank 0 stopped, naming the lost rank
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in pids), "a rank was left behind"
    finally:
        group.stop()


def test_killing_rank_0_leaves_no_rank_behind_and_the_client_gets_server_unavailable():
    group = ServerProcess(ServerConfig(endpoint=private_endpoint(), tensor_parallel=2))
    client = RpcClient(group.wait_ready(), timeout_ms=3000, data_plane="shm")
    pids = [r["pid"] for r in hello(client).ranks]
    x = torch.randn(1, hello(client).config["hidden_size"])
    client.call(Op.O, 0, [x])
    group.proc.kill()
    start = time.monotonic()
    with pytest.raises(ServerUnavailable):
        client.call(Op.O, 0, [x])
    assert time.monotonic() - start < 3.5  # within the client's deadline
    deadline = time.monotonic() + 10
    while alive(pids[1]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pids[1]), "rank 1 outlived rank 0"
    client.close()


def test_a_hung_rank_times_the_group_out_and_the_client_fails_over(smollm2_servers):
    """A rank that stops (SIGSTOP) without dying: rank 0's collective times out (--tp-timeout-s),
    rank 0 stops, kills the rank it started, and the client's next try goes to the pool's other server."""
    backup = smollm2_servers("ipc")
    group = ServerProcess(ServerConfig(endpoint=private_endpoint(), tensor_parallel=2, tp_timeout_s=2))
    client = RpcClient([group.wait_ready(), backup], timeout_ms=20_000, data_plane="shm")
    try:
        pids = [r["pid"] for r in hello(client).ranks]
        x = torch.randn(3, hello(client).config["hidden_size"])
        want = client.call(Op.GATE_UP, 1, [x]).tensors[0].clone()
        os.kill(pids[1], signal.SIGSTOP)
        start = time.monotonic()
        assert torch.equal(client.call(Op.GATE_UP, 1, [x]).tensors[0], want)  # answered by the backup
        assert time.monotonic() - start < 15 and client.stats.failovers >= 1
        assert group.proc.wait(15) != 0
        deadline = time.monotonic() + 15
        while alive(pids[1]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(pids[1]), "the hung rank was left behind"
    finally:
        client.close()
        group.stop()


def test_each_rank_holds_half_the_weights(tp_servers):
    single = tp_servers("float32", "plain", ranks=1)  # a single server, started the same way
    parallel = tp_servers("float32", "plain")
    config = ModelConfig.from_dict(hello(RpcClient(single.endpoint)).config)
    counts = [1 if name == "lm_head" else config.num_layers for name in config.linear_shapes()]

    def held(rank: int, ranks: int) -> int:  # float32 bytes of the rows column_slice gives a rank
        return 4 * sum(n * d_in * (lambda s: s[1] - s[0])(column_slice(d_out, rank, ranks))
                       for n, (d_out, d_in) in zip(counts, config.linear_shapes().values()))

    total, ranks = held(0, 1), hello(RpcClient(parallel.endpoint)).ranks
    assert [r["rank"] for r in ranks] == [0, 1] and total > 100 << 20
    for r in ranks:  # the bytes of its slices: about half of every weight (960 columns: 512 + 448)
        assert r["weight_bytes"] == held(r["rank"], 2)
        assert abs(r["weight_bytes"] - total / 2) < 0.05 * total
    one = peak_rss(single.proc.pid)
    for r in ranks:  # peak RSS: the single server's less about half the weights
        assert r["peak_rss_bytes"] < one - 0.4 * total, (r, one, total)
