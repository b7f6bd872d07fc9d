"""A host without an instruction a kernel wants gets another kernel, never an internal error:
bfloat16 under ONEDNN_MAX_CPU_ISA=AVX2 (no AVX-512, no AVX-NE-CONVERT: oneDNN cannot pack bf16
weights) runs `--local` and split, and both give the same tokens (docs/fidelity.md)."""
import json
import os
import subprocess
import sys

from teegpu.model import products

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


def test_the_otp_products_take_int8_gemms_only_where_onednn_runs_them():
    """int8 GEMMs where oneDNN runs them on VNNI or AMX (exact and fast); elsewhere, and under the
    AVX2 cap, the float64 kernel: never ATen's own int8 loop (an AVX2-only CPU's torch._int_mm,
    50 times slower) nor oneDNN's saturating one (docs/fidelity.md)."""
    report = products.kernels()
    if products.ring_kernel() == "int8":
        assert report.int8 != "aten" and products.int8_gemm_exact()
    else:
        assert report.int8.startswith("float64-words")
    code = "from teegpu.model.products import kernels, ring_kernel; print(ring_kernel(), kernels().int8)"
    capped = subprocess.run([sys.executable, "-c", code], env={**os.environ, **AVX2_HOST},
                            capture_output=True, text=True, timeout=300)
    assert capped.returncode == 0, capped.stderr[-2000:]
    kernel, implementation = capped.stdout.split()[-2:]
    assert kernel == "float64" and implementation.startswith("float64-words")
