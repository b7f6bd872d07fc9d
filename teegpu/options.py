"""The vocabularies and defaults of the options both sides share. Holds no secrets and imports
nothing of either side, so the server, the trusted engine and the CLI all take them from here."""
from __future__ import annotations

import os
import sys

DEVICES = ("auto", "cpu", "cuda")  # where the server computes
PRIVACY_MODES = ("plain", "otp")  # what the server sees: activations, or one-time-padded integers
PAD_MODES = ("server", "local", "server-or-local")  # otp: who computes the pads' products R*W^T
DATA_PLANES = ("socket", "shm")  # where tensors travel: in the messages, or through /dev/shm
CONTROL_PLANES = ("doorbell", "socket")  # with shm, how requests are announced: polled words, or messages
TP_FAN_OUTS = ("auto", "shm", "broadcast")  # how a tensor-parallel server hands each input to its ranks
DTYPES = ("float32", "bfloat16", "float16")  # of the weights, the wire and the trusted activations

DEFAULT_TIMEOUT_MS = 60_000  # deadline of one request to the server
ATTESTATION_KINDS = ("auto", "gramine", "tdx", "none")
DEFAULT_MASK_POOL_ROWS = 32  # otp: pads kept ready per weight
DEFAULT_SPIN_MAX_US = 2_000  # longest a side polls the doorbell before it sleeps on its socket


OPENMP_WAIT_POLICY = "OMP_WAIT_POLICY"


def under_gramine() -> bool:
    """True inside a Gramine enclave: our manifest sets TEEGPU_GRAMINE=1, and Gramine itself
    provides /dev/attestation (gramine-sgx and gramine-direct alike)."""
    return os.environ.get("TEEGPU_GRAMINE") == "1" or os.path.exists("/dev/attestation/attestation_type")


def let_idle_workers_sleep() -> None:
    """Ask OpenMP to put a parallel region's idle workers to sleep at once (OMP_WAIT_POLICY=PASSIVE)
    unless the user chose a policy. The two sides of the split take turns on the same cores, and
    libgomp's default keeps finished workers spinning for milliseconds on the cores the other
    side is about to compute on (BENCHMARKS.md). libgomp reads the policy once, when torch loads
    it: this must run before torch is imported, and does nothing after."""
    if "torch" not in sys.modules:
        os.environ.setdefault(OPENMP_WAIT_POLICY, "PASSIVE")


def idle_workers_sleep() -> bool:
    """Whether the environment asks OpenMP for sleeping idle workers (then both sides of the split
    can use every core: each computes while the other waits)."""
    return os.environ.get(OPENMP_WAIT_POLICY, "").strip().upper() == "PASSIVE"


THREADED_MACS = 1 << 24  # where one thread is best for decode-sized products: smaller ones run on one


def threads_for(macs: int, cores: int, threaded_macs: int = THREADED_MACS) -> int:
    """Threads for a product of `macs` multiply-adds: on hosts where waking a sleeping OpenMP worker
    costs more than a second thread saves on a decode-sized product (40 us on an AMD EPYC VM),
    only products of `threaded_macs` or more run on every core; products.threaded_macs measures
    which kind of host this is (BENCHMARKS.md, the thread choice)."""
    return cores if macs >= threaded_macs else 1


def rpcs_per_forward(num_layers: int) -> int:
    """Round trips of one forward pass: q|k|v, o, gate|up and down per layer, plus the LM head."""
    return 4 * num_layers + 1
