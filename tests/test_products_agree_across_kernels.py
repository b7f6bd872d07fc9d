"""Every x W^T of the plain modes goes through teegpu.model.products.linear (server and
TEE-only alike): large float32 products through oneDNN, the rest through torch.mm. Whichever
kernel runs, the result is the product up to float32 rounding, lands in `out` when given,
and reduced precision is exactly torch's own product."""
import os
import subprocess
import sys

import pytest
import torch

from teegpu.model import products
from teegpu.model.products import ONEDNN_MACS, linear
from teegpu.options import THREADED_MACS

SHAPES = [(1, 64, 64), (1, 576, 1536), (8, 3072, 576), (2, 49152, 64), (300, 576, 1536)]


@pytest.mark.parametrize("rows, d_out, d_in", SHAPES)
def test_float32_products_are_exact_up_to_rounding(rows, d_out, d_in):
    x, w = torch.randn(rows, d_in), torch.randn(d_out, d_in)
    got = linear(x, w).double()
    want = x.double() @ w.double().T
    bound = 2.0 ** -24 * d_in * (x.double().abs() @ w.double().abs().T)  # the classic dot-product bound
    assert ((got - want).abs() <= bound).all()


@pytest.mark.parametrize("small_on", ["torch.mm", "oneDNN"])
def test_large_products_take_onednn_and_small_ones_the_hosts_choice(monkeypatch, small_on):
    """Both choices of onednn_macs (a host measures one): small products on torch.mm, or on oneDNN."""
    monkeypatch.setattr(products, "onednn_macs", lambda: ONEDNN_MACS if small_on == "torch.mm" else 0)
    small, large = (torch.randn(1, 64), torch.randn(64, 64)), (torch.randn(8, 576), torch.randn(3072, 576))
    assert 8 * 3072 * 576 >= ONEDNN_MACS > 64 * 64
    if products._ONEDNN is None:
        assert torch.equal(linear(*small), torch.mm(small[0], small[1].t()))
        pytest.skip("torch built without oneDNN: every product is torch.mm")
    on_onednn = lambda x, w: products._ONEDNN(x, w, None, "none", [], "")  # noqa: E731
    assert torch.equal(linear(*small), torch.mm(small[0], small[1].t()) if small_on == "torch.mm" else on_onednn(*small))
    assert torch.equal(linear(*large), on_onednn(*large))


def test_the_product_lands_in_out():
    x, w = torch.randn(8, 576), torch.randn(3072, 576)
    out = torch.full((8, 3072), float("nan"))
    assert linear(x, w, out=out).data_ptr() == out.data_ptr()
    assert torch.equal(out, linear(x, w))


@pytest.mark.parametrize("rows", [1, 8, 300])
def test_bfloat16_products_packed_or_not_are_the_product_up_to_bfloat16_rounding(rows):
    """Packed (oneDNN's blocked layout) or not, a bf16 product is the exact one up to bf16 rounding
    of the result; the two kernels may differ in the last bit (AMX blocks a 300-row product
    otherwise than torch.mm does), which is why the split and in-process sides share `pack`."""
    x, w = torch.randn(rows, 576, dtype=torch.bfloat16), torch.randn(3072, 576, dtype=torch.bfloat16)
    want = x.double() @ w.double().T
    bound = 2.0 ** -8 * (x.double().abs() @ w.double().abs().T) + 1e-30
    for weight in (w, products.pack(w)):
        assert ((linear(x, weight).double() - want).abs() <= bound).all()
    assert products.pack(torch.randn(4, 4)).is_mkldnn is False  # float32 weights stay as they are


def test_a_host_that_cannot_pack_bfloat16_keeps_the_weight(monkeypatch):
    monkeypatch.setattr(products, "packs_bfloat16", lambda: False)
    w = torch.randn(64, 32, dtype=torch.bfloat16)
    assert products.pack(w) is w


@pytest.mark.parametrize("rows", [1, 6, 40])
def test_a_product_has_the_same_bits_in_every_process(rows):
    """Threads are part of a product's bits; every process takes product_threads for its size,
    measured once per host: the in-process engine and the server agree."""
    x, w = torch.randn(rows, 576), torch.randn(576, 576)
    threads = products.product_threads(rows * 576 * 576, 2)
    assert threads in (1, 2) and threads == products.product_threads(rows * 576 * 576, 2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        first = linear(x, w)
        assert torch.equal(first, linear(x, w))
    finally:
        torch.set_num_threads(before)


def test_every_wait_policy_reads_the_same_thread_threshold(tmp_path):
    """The server runs with OMP_WAIT_POLICY=PASSIVE, a test or a library user often without: both
    must size a product's threads and choose its kernel alike, from one measurement per host
    (made first by either)."""
    code = ("from teegpu.model.products import onednn_macs, threaded_macs, threads_file; "
            "print(threads_file()[0], threaded_macs(), onednn_macs())")
    answers = []
    for policy in ("ACTIVE", "PASSIVE", None):
        env = {k: v for k, v in os.environ.items()
               if k not in ("OMP_WAIT_POLICY", "TEEGPU_THREADED_MACS", "TEEGPU_ONEDNN_MACS")}
        env.update(TEEGPU_CACHE_DIR=str(tmp_path), OMP_NUM_THREADS="2", **({"OMP_WAIT_POLICY": policy} if policy else {}))
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        answers.append(done.stdout.split())
    assert answers[0] == answers[1] == answers[2]
    assert int(answers[0][1]) in (0, THREADED_MACS) and int(answers[0][2]) in (0, ONEDNN_MACS)


def test_the_isa_comes_from_the_flags_and_the_cap():
    amx = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16",
           "amx_tile", "amx_int8", "amx_bf16"}
    assert products.cpu_isa(amx, "") == "avx512_core_amx"
    assert products.cpu_isa(amx - {"amx_tile"}, "") == "avx512_core_bf16"
    assert products.cpu_isa(amx, "AVX2") == "avx2"
    assert products.cpu_isa(amx, "avx512_core_bf16") == "avx512_core_bf16"
    assert products.cpu_isa(amx, "ALL") == "avx512_core_amx"
    assert products.cpu_isa({"avx2", "fma"}, "AVX512_CORE_AMX") == "avx2"  # a cap never adds what the CPU lacks
    assert products.cpu_isa(set(), "") == "sse41"


def test_the_kernel_report_names_what_ran():
    report = products.kernels()
    assert report.isa == products.cpu_isa()
    if products._ONEDNN is not None:
        assert "matmul" in report.float32_large or "inner_product" in report.float32_large
    assert report.float32_small.startswith("torch.mm") == (products.onednn_macs() > 8 * 64 * 64)
    assert report.threaded_macs == products.threaded_macs() and report.onednn_macs == products.onednn_macs()
