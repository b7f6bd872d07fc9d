"""A host without an instruction a kernel wants gets another kernel, never an internal error:
bfloat16 under ONEDNN_MAX_CPU_ISA=AVX2 (no AVX-512, no AVX-NE-CONVERT: oneDNN cannot pack bf16
weights) runs `--local` and split, and both give the same tokens (docs/fidelity.md)."""
import json
import os
import subprocess
import sys

AVX2_HOST = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def generate(*flags: str) -> dict:
    env = {**os.environ, **AVX2_HOST}
    proc = subprocess.run([sys.executable, "-m", "teegpu.cli", "generate", "The capital of France is", "--json",
                           "--dtype", "bfloat16", "--max-new-tokens", "6", "--no-stop-at-eos", *flags],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_bfloat16_runs_local_and_split_on_an_avx2_host(smollm2):
    local, split = generate("--local"), generate()
    assert local["kernels"]["trusted"]["isa"] == "avx2" and split["kernels"]["server"]["isa"] == "avx2"
    assert local["kernels"]["trusted"]["bfloat16"] == "aten"  # not oneDNN's packed path
    assert local["token_ids"] == split["token_ids"] and len(local["token_ids"]) == 6
