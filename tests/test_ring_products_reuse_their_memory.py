"""A ring product touches no fresh memory for its weight blocks and partial sums: every process that
loads a model fixes glibc's mmap threshold at 1 MB (tensor_files), so a fresh 2 MB buffer per call is
a fresh mapping, and its page faults once doubled the float64 kernel's time for a decode step."""
import subprocess
import sys

import pytest

CALLS = 20
CODE = f"""
import resource, sys, torch
from teegpu.model.tensor_files import MMAP_THRESHOLD, return_large_frees_to_the_os
from teegpu.ring import WIDE_BLOCK, RingWeight, ring_matmul
return_large_frees_to_the_os()
assert WIDE_BLOCK * 8 > MMAP_THRESHOLD  # the kernel's block is one such buffer
rows, d_out, d_in = map(int, sys.argv[1:])
w = RingWeight.of(torch.randint(-32000, 32000, (d_out, d_in), dtype=torch.int16), "float64")
x, out = torch.randint(-2**62, 2**62, (rows, d_in)), torch.empty(rows, d_out, dtype=torch.int64)
ring_matmul(x, w, out)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({CALLS}):
    ring_matmul(x, w, out)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


# a decode step's (the 2 MB weight block was 512 faults a call) and a prefill's (3 MB of float64
# partial sums, and as much again for their int64 copy: 1536 faults a call)
@pytest.mark.parametrize("shape", [(1, 576, 1536), (32, 3072, 576)])
def test_float64_ring_products_take_no_page_faults(shape):
    proc = subprocess.run([sys.executable, "-c", CODE, *map(str, shape)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    faults = int(proc.stdout.split()[-1])
    # the digits (under 1 MB) come from the heap, whose top glibc trims and maps again: a few strays a call
    assert faults < CALLS * 64, f"{faults} page faults in {CALLS} products of shape {shape}"
