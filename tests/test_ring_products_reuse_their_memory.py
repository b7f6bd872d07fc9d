"""A ring product touches no fresh memory for its weight blocks and partial sums, on either kernel:
every process that loads a model fixes glibc's mmap threshold at 1 MB (tensor_files), so a fresh 2 MB
buffer per call is a fresh mapping, and its page faults once doubled the float64 kernel's time for a
decode step (and cost the int8 kernel 2300 faults for one row of SmolLM2's LM head)."""
import subprocess
import sys
import threading

import pytest
import torch

from teegpu.model.products import int8_gemm_exact
from teegpu.ring import RingWeight, ring_matmul

CALLS = 20
CODE = f"""
import resource, sys, torch
from teegpu.model.tensor_files import MMAP_THRESHOLD, return_large_frees_to_the_os
from teegpu.ring import WIDE_BLOCK, RingWeight, ring_matmul
return_large_frees_to_the_os()
assert WIDE_BLOCK * 8 > MMAP_THRESHOLD  # the kernel's block is one such buffer
kernel, (rows, d_out, d_in) = sys.argv[1], map(int, sys.argv[2:])
w = RingWeight.of(torch.randint(-32000, 32000, (d_out, d_in), dtype=torch.int16), kernel)
x, out = torch.randint(-2**62, 2**62, (rows, d_in)), torch.empty(rows, d_out, dtype=torch.int64)
ring_matmul(x, w, out)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({CALLS}):
    ring_matmul(x, w, out)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


# float64: a decode step's (the 2 MB weight block was 512 faults a call) and a prefill's (3 MB of
# float64 partial sums, and as much again for their int64 copy: 1536 faults a call); int8 (forced
# where the host's kernel is the other: the same integers, slower): a wide weight's one row (1 MB of
# int32 sums and 2 MB as int64: 768 faults a call) and eight rows (4 + 8 MB)
@pytest.mark.parametrize("kernel, shape", [("float64", (1, 576, 1536)), ("float64", (32, 3072, 576)),
                                           ("int8", (1, 16384, 64)), ("int8", (8, 8192, 64))])
def test_ring_products_take_no_page_faults(kernel, shape):
    proc = subprocess.run([sys.executable, "-c", CODE, kernel, *map(str, shape)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    faults = int(proc.stdout.split()[-1])
    # the digits (under 1 MB) come from the heap, whose top glibc trims and maps again: a few strays a call
    assert faults < CALLS * 64, f"{faults} page faults in {CALLS} {kernel} products of shape {shape}"


@pytest.mark.parametrize("kernel", ["float64", "int8"])
def test_kept_buffers_serve_products_inside_and_outside_inference_mode(kernel):
    """A thread's kept buffers were made by whichever product came first: made inside inference mode
    (a forward), they once failed the next product outside it (an otp engine's first mask-pool fill)."""
    torch.manual_seed(0)
    q = torch.randint(-32000, 32000, (3072, 576), dtype=torch.int16)
    w = RingWeight.of(q, kernel)
    x = torch.randint(-2**62, 2**62, (2, 576))
    results, errors = [], []

    def inside_then_outside():  # a fresh thread: its buffers are made by the first product below
        try:
            with torch.inference_mode():
                results.append(ring_matmul(x, w).clone())
            results.append(ring_matmul(x, w))
            with torch.inference_mode():
                results.append(ring_matmul(x, w).clone())
        except RuntimeError as e:
            errors.append(e)

    worker = threading.Thread(target=inside_then_outside)
    worker.start()
    worker.join()
    assert not errors, errors[0]
    if kernel == "int8" and not int8_gemm_exact():
        return  # forced where oneDNN's int8 GEMM saturates: the buffers are this test's subject, not the sums
    expected = ring_matmul(x, RingWeight.of(q, "float64"))
    assert all(torch.equal(r, expected) for r in results)
