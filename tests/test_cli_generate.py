"""The one-command demo: `teegpu generate` starts its own server and answers from the real model."""
import json
import subprocess
import sys

from teegpu.options import rpcs_per_forward

CLI = [sys.executable, "-m", "teegpu.cli"]


def test_generate_json_answers_from_two_processes():
    out = subprocess.run(CLI + ["generate", "--chat", "What is the capital of France?", "--max-new-tokens", "20",
                                "--json"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert "Paris" in result["text"]
    assert 0 < len(result["token_ids"]) <= 20 and result["prompt_tokens"] > 10
    assert set(result["timings"]) == {"load_s", "prefill_ms", "decode_ms_per_token", "trusted_ms", "prefill_cpu_ms",
                                      "decode_cpu_ms_per_token"}
    assert result["timings"]["prefill_cpu_ms"] > 0 and result["timings"]["decode_cpu_ms_per_token"] > 0
    forwards = len(result["token_ids"]) + (result["finish_reason"] == "stop")
    assert result["rpc"]["calls"] == rpcs_per_forward(30) * forwards  # 4 x 30 layers + LM head, per forward
    assert "teegpu server stopped" in out.stderr  # the private server was started and stopped
    otp = subprocess.run(CLI + ["generate", "--chat", "What is the capital of France?", "--max-new-tokens", "20",
                                "--json", "--privacy", "otp"], capture_output=True, text=True, timeout=600)
    assert otp.returncode == 0, otp.stderr
    padded = json.loads(otp.stdout)
    assert padded["token_ids"] == result["token_ids"]  # the same greedy answer through one-time pads
    assert padded["timings"]["offline_ms_per_token"] > 0
    assert "mask pool" not in otp.stderr  # its progress bar is for terminals; a log gets no bar lines
    assert padded["rpc"]["calls"] == result["rpc"]["calls"]


def test_streams_text_to_the_terminal():
    out = subprocess.run(CLI + ["generate", "--local", "The capital of France is", "--max-new-tokens", "6"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout and "6 tokens" in out.stderr


def test_prompt_longer_than_context_is_a_clear_error():
    out = subprocess.run(CLI + ["generate", "--local", "word " * 9000, "--max-new-tokens", "4"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 2
    assert "context window of 8192" in out.stderr and "Traceback" not in out.stderr


def test_bad_option_values_are_clear_errors():
    out = subprocess.run(CLI + ["generate", "--local", "hi", "--top-p", "0"], capture_output=True, text=True)
    assert out.returncode == 2 and "top_p" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run(CLI + ["generate", "hi", "--server", "http://x"], capture_output=True, text=True)
    assert out.returncode == 2 and "endpoint" in out.stderr and "Traceback" not in out.stderr
