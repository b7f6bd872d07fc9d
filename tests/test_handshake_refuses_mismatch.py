"""A server holding other weights is refused at connect, never used."""
import pytest

from conftest import save_tiny_llama
from teegpu.errors import HandshakeError
from teegpu.config import EngineConfig, GenerationConfig
from teegpu.options import rpcs_per_forward
from teegpu.tee.engine import Engine


def test_fingerprint_mismatch_is_refused(tiny_server, tmp_path):
    save_tiny_llama(tmp_path, seed=2)  # same shapes as the served model, other weights
    with pytest.raises(HandshakeError, match="fingerprint"):
        Engine.open(EngineConfig(model=str(tmp_path), server=tiny_server.endpoint, timeout_ms=5_000))


def test_same_model_is_accepted(tiny_server, tiny_model_dir):
    with Engine.open(EngineConfig(model=str(tiny_model_dir), server=tiny_server.endpoint)) as engine:
        assert engine.hello.fingerprint == engine.weights.fingerprint
        result = engine.generate([1, 2, 3], GenerationConfig(max_new_tokens=5, stop_at_eos=False))
        assert len(result.token_ids) == 5 and result.rpc["calls"] == 5 * rpcs_per_forward(3)
