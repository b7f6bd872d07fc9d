"""CURVE: only listed clients get in, the client talks only to the pinned server, and what
crosses the wire is not the tensors' bytes. Two real processes over tcp on loopback."""
import os
import socket
import stat
import subprocess
import sys
import threading

import pytest
import torch

from teegpu.errors import ServerUnavailable
from teegpu.options import rpcs_per_forward
from teegpu.model.loading import load_weights
from teegpu.model.tokenizer import load_tokenizer
from teegpu.protocol import Op, tensor_frame
from teegpu.config import ServerConfig
from teegpu.server_process import ServerProcess
from teegpu.tee.engine import Engine, GenerationConfig
from teegpu.transport import ClientCurve, RpcClient, generate_keys


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    allowed = root / "allowed"
    server = generate_keys(root / "server", "server")
    client = generate_keys(allowed, "client")
    stranger = generate_keys(root / "stranger", "stranger")
    impostor = generate_keys(root / "impostor", "impostor")
    return {"root": root, "allowed": allowed, "server": server, "client": client, "stranger": stranger,
            "impostor": impostor}


@pytest.fixture(scope="module")
def curve_server(tiny_model_dir, keys):
    config = ServerConfig(model=str(tiny_model_dir), endpoint="tcp://127.0.0.1:*",
                          curve_secret=str(keys["server"][1]), curve_allow=str(keys["allowed"]))
    with ServerProcess(config) as proc:
        yield proc.wait_ready()


def test_keys_command_writes_a_pair(tmp_path):
    out = subprocess.run([sys.executable, "-m", "teegpu.cli", "keys", str(tmp_path), "--name", "node"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    public, secret = tmp_path / "node.key", tmp_path / "node.key_secret"
    assert "public-key" in public.read_text() and "secret-key" in secret.read_text()
    assert "secret-key" not in public.read_text()
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600


def test_listed_client_generates_over_curve(curve_server, keys, tiny_model_dir):
    weights, tok = load_weights(tiny_model_dir), load_tokenizer(tiny_model_dir)
    curve = ClientCurve(str(keys["client"][1]), str(keys["server"][0]))
    with Engine.connect(weights, tok, curve_server, timeout_ms=10_000, curve=curve) as engine:
        result = engine.generate("Hello", GenerationConfig(max_new_tokens=4, stop_at_eos=False))
    assert len(result.token_ids) == 4 and result.rpc["calls"] == 4 * rpcs_per_forward(3)


def test_unknown_client_is_refused(curve_server, keys):
    curve = ClientCurve(str(keys["stranger"][1]), str(keys["server"][0]))
    with RpcClient(curve_server, timeout_ms=1500, curve=curve) as client:
        with pytest.raises(ServerUnavailable, match="allow list"):
            client.call(Op.HELLO, 0)


def test_client_pinning_another_server_key_cannot_connect(curve_server, keys):
    curve = ClientCurve(str(keys["client"][1]), str(keys["impostor"][0]))
    with RpcClient(curve_server, timeout_ms=1500, curve=curve) as client:
        with pytest.raises(ServerUnavailable):
            client.call(Op.HELLO, 0)


class WireTap:
    """A TCP forwarder that keeps a copy of every byte in both directions."""

    def __init__(self, target_port: int):
        self.captured = bytearray()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target_port = target_port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src, dst):
        while data := src.recv(65536):
            self.captured += data
            dst.sendall(data)

    def close(self):
        self.listener.close()


def tapped_call(server_url: str, curve):
    port = int(server_url.rsplit(":", 1)[1])
    tap = WireTap(port)
    x = torch.full((1, 64), 1234.5678)  # a recognisable activation
    with RpcClient(f"tcp://127.0.0.1:{tap.port}", timeout_ms=10_000, curve=curve) as client:
        y = client.call(Op.QKV, 0, [x]).tensors[0]
        reply = bytes(tensor_frame(y))
    tap.close()
    return bytes(tap.captured), bytes(tensor_frame(x)), reply


def test_wire_carries_no_plaintext_tensors(curve_server, keys, tiny_model_dir):
    curve = ClientCurve(str(keys["client"][1]), str(keys["server"][0]))
    wire, request, reply = tapped_call(curve_server, curve)
    assert len(wire) > len(request) + len(reply)  # the traffic went through the tap
    assert request[:64] not in wire and reply[:64] not in wire
    # the control: the same call without CURVE shows both tensors on the wire
    with ServerProcess(ServerConfig(model=str(tiny_model_dir), endpoint="tcp://127.0.0.1:*")) as plain:
        wire, request, reply = tapped_call(plain.wait_ready(), None)
    assert request[:64] in wire and reply[:64] in wire
