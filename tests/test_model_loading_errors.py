"""Anything that is not a LLaMA model gets a clear ModelLoadError naming the problem."""
import hashlib
import json
import subprocess
import sys

import pytest

from teegpu.errors import ConfigError, ModelLoadError
from teegpu.model.loading import default_model_path, load_weights, verify_model_sha256


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_weights(tmp_path / "nope.gguf")


def test_wrong_file_type(tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="expected a .gguf file"):
        load_weights(f)


def test_corrupt_gguf(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\x03\0\0\0" + b"\xff" * 64)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_weights(f)


def test_truncated_real_gguf(tmp_path):
    f = tmp_path / "half.gguf"
    f.write_bytes(default_model_path().read_bytes()[: 5_000_000])
    with pytest.raises(ModelLoadError):
        load_weights(f)


def test_other_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(ModelLoadError, match="gpt2"):
        load_weights(tmp_path)


def test_directory_without_weights(tmp_path, tiny_model_dir):
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_weights(tmp_path)


def test_corrupt_safetensors(tmp_path, tiny_model_dir):
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json}")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_weights(tmp_path)


def test_model_sha256_pin_accepts_the_right_file_in_any_case():
    path = default_model_path()
    verify_model_sha256(None, hashlib.sha256(path.read_bytes()).hexdigest().upper())


@pytest.mark.parametrize("pin,error,text", [("0" * 64, ModelLoadError, "expected"),
                                            ("abc", ConfigError, "64 hex digits")])
def test_model_sha256_pin_refuses(pin, error, text):
    with pytest.raises(error, match=text):
        verify_model_sha256(None, pin)


def test_model_sha256_pin_refuses_a_directory(tiny_model_dir):
    with pytest.raises(ConfigError, match="directory"):
        verify_model_sha256(str(tiny_model_dir), "0" * 64)


def test_model_sha256_pin_stops_the_cli():
    out = subprocess.run([sys.executable, "-m", "teegpu.cli", "generate", "--local", "hi", "--model-sha256",
                          "1" * 64], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "refusing a different model file" in out.stderr
