"""A ring product of one row (a decode step's) touches no fresh memory: every process that loads a
model fixes glibc's mmap threshold at 1 MB (tensor_files), so a fresh 2 MB buffer per call is a fresh
mapping, and its page faults once doubled the float64 kernel's time."""
import subprocess
import sys

CALLS = 20
CODE = f"""
import resource, torch
from teegpu.model.tensor_files import MMAP_THRESHOLD, return_large_frees_to_the_os
from teegpu.ring import WIDE_BLOCK, RingWeight, ring_matmul
return_large_frees_to_the_os()
assert WIDE_BLOCK * 8 > MMAP_THRESHOLD  # the kernel's block is one such buffer
w = RingWeight.of(torch.randint(-32000, 32000, (576, 1536), dtype=torch.int16), "float64")
x, out = torch.randint(-2**62, 2**62, (1, 1536)), torch.empty(1, 576, dtype=torch.int64)
ring_matmul(x, w, out)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({CALLS}):
    ring_matmul(x, w, out)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_one_row_float64_ring_products_take_no_page_faults():
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    faults = int(proc.stdout.split()[-1])
    # a fresh 2 MB block a call was 512 faults a call; a few stray ones (the interpreter's) are allowed
    assert faults < CALLS * 16, f"{faults} page faults in {CALLS} one-row products"
