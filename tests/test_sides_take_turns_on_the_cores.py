"""The two sides compute one after the other: idle OpenMP workers sleep (the `teegpu` command
asks for it before torch loads, unless the user chose a policy), long steps and large
products use every core, decode-sized ones one thread."""
import os
import subprocess
import sys

import pytest
import torch

from teegpu.model.loading import load_weights
from teegpu.model.tokenizer import load_tokenizer
from teegpu.model.products import product_threads, threaded_macs
from teegpu.options import THREADED_MACS
from teegpu.protocol import Op, encode_header, tensor_frame
from teegpu.server.linear_server import LinearServer
from teegpu.tee.engine import THREADED_ROWS, Engine, trusted_threads
from teegpu.tee.linears import LocalLinears
from teegpu.transport.rpc_server import Incoming


def policy_after(code: str, **env) -> str:
    """OMP_WAIT_POLICY as a fresh interpreter leaves it after running `code`."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport os; print(os.environ.get('OMP_WAIT_POLICY'))"],
                         env={**clean, **env}, capture_output=True, text=True, timeout=120)
    return out.stdout.strip().splitlines()[-1]


def test_idle_workers_are_asked_to_sleep_before_torch_loads_only():
    ask = "from teegpu.options import let_idle_workers_sleep; let_idle_workers_sleep()"
    assert policy_after(ask) == "PASSIVE"
    assert policy_after(ask, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"  # the user's choice stands
    assert policy_after(f"import torch\n{ask}") == "None"  # too late: libgomp has read it


@pytest.mark.parametrize("argv, policy", [
    (["serve", "--model", "/nonexistent/model.gguf"], "PASSIVE"),
    (["generate", "hi", "--model", "/nonexistent/model.gguf"], "PASSIVE"),
    (["generate", "hi", "--local", "--model", "/nonexistent/model.gguf"], "None"),  # one process: spinning pays
])
def test_the_command_asks_for_sleeping_workers_where_two_sides_take_turns(argv, policy):
    assert policy_after(f"from teegpu import cli; cli.main({argv!r})") == policy


def test_trusted_threads_follow_the_policy_and_the_cap(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert trusted_threads() == (os.cpu_count() or 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert trusted_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert trusted_threads() == 1  # spinning workers of ours would steal the server's cores


def test_long_steps_use_the_engine_threads_and_decode_steps_one(tiny_model_dir):
    weights, tok = load_weights(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    engine = Engine(weights, tok, LocalLinears(weights))
    before = torch.get_num_threads()
    try:
        engine.threads = 2
        cache = engine.new_cache(THREADED_ROWS + 1)
        engine.forward(list(range(1, THREADED_ROWS + 1)), 0, cache)
        assert torch.get_num_threads() == 2
        engine.forward([5], THREADED_ROWS, cache)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_the_server_threads_each_product_by_its_size(tiny_model_dir):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        server = LinearServer(load_weights(str(tiny_model_dir)), torch.device("cpu"), torch.float32)
        d_out, d_in = server.shapes[Op.QKV, 0]
        big_rows = -(-THREADED_MACS // (d_out * d_in))
        small = 1 if threaded_macs() else 2  # this host's choice for one-row products
        for rows, threads in ((1, small), (big_rows, 2), (3, small)):
            x = torch.randn(rows, d_in)
            head, frames = server.handle(Incoming([b"peer"], encode_header(Op.QKV, 1, 0, [x]), [tensor_frame(x)]))
            assert torch.get_num_threads() == threads == product_threads(rows * d_out * d_in, 2)
            assert frames[0].nbytes == rows * d_out * 4
    finally:
        torch.set_num_threads(before)
