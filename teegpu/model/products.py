"""x W^T for whoever holds W (the server, or the TEE-only trusted side), with the CPU kernel the
host supports, chosen by what the CPU has (its ISA) and never by timing, so that two processes
on one host always pick the same kernel for the same product: the split's results are the
in-process engine's bit for bit (docs/fidelity.md).

- float32: products of at least ONEDNN_MACS multiply-adds on oneDNN's matmul (on an AMD EPYC
  MKL's sgemm ran at half its speed); smaller ones on torch.mm (MKL), or on oneDNN too where a
  decode step's one- and two-row products run faster there (`onednn_macs`, measured once per
  host: MKL takes slower paths on CPUs that are not Intel's). Both are float32 sums in some
  order: results differ between the two kernels in the last bits, never more.
- bfloat16: the weight packed once in oneDNN's blocked layout (`pack`), where the host's oneDNN
  can (AVX512-BF16 / AMX, or AVX-512 emulation); elsewhere (an AVX2-only host, or
  ONEDNN_MAX_CPU_ISA=AVX2) as it is, through torch.mm.
- float16: torch.mm (oneDNN with AVX512-FP16 / AMX-FP16, ATen's kernel elsewhere).
- the otp mode's exact ring products (teegpu.ring, `ring_kernel`): int8 GEMMs on byte digits
  (torch._int_mm: oneDNN's s8 GEMM on VNNI or AMX tiles) where the host has them; elsewhere
  float64 GEMMs on 16-bit digits. Without VNNI, oneDNN's s8 GEMM saturates in int16, and on an
  AVX2-only CPU torch._int_mm is ATen's own loop, 50 times slower than the float64 GEMMs.
`kernels()` reports the ISA and the implementation each product ran on (oneDNN's own words).

Threads: a product's thread count is part of its result (MKL sums a few-row float32 product in
another order on two threads than on one), so every process on a host gives a product of a given
size the same count (`product_threads`), from one measurement per host (`threaded_macs`).
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from teegpu.options import THREADED_MACS, threads_for

# the threads torch starts with (OMP_NUM_THREADS, or the host's cores), read at import before
# anything in this process changes them: every process sizes its product threads from this
CORES = torch.get_num_threads()
ONEDNN_MACS = 1 << 22  # float32 products of at least this many multiply-adds go to oneDNN (smaller: onednn_macs)
ONEDNN_GAIN = 1.1  # smaller float32 products go to oneDNN too where it streams decode products this much faster
_ONEDNN = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None
_REORDER = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None) if _ONEDNN is not None else None

# oneDNN's ISA levels, each including the ones before it (the names ONEDNN_MAX_CPU_ISA takes)
ISA_LEVELS = ("sse41", "avx2", "avx512_core", "avx512_core_vnni", "avx512_core_bf16", "avx512_core_amx")
_LEVEL_FLAGS = {  # /proc/cpuinfo flags a level needs
    "avx2": {"avx2", "fma"},
    "avx512_core": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx512_core_vnni": {"avx512_vnni"},
    "avx512_core_bf16": {"avx512_bf16"},
    "avx512_core_amx": {"amx_tile", "amx_int8", "amx_bf16"},
}
_CAP_LEVELS = {  # ONEDNN_MAX_CPU_ISA values (upper case) -> the highest of our levels they allow
    "SSE41": "sse41", "AVX": "sse41", "AVX2": "avx2", "AVX2_VNNI": "avx2", "AVX2_VNNI_2": "avx2",
    "AVX512_CORE": "avx512_core", "AVX512_CORE_VNNI": "avx512_core_vnni",
    "AVX512_CORE_BF16": "avx512_core_bf16", "AVX512_CORE_FP16": "avx512_core_bf16",
    "AVX10_1_512": "avx512_core_bf16",
}


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_isa(flags: set[str] | None = None, cap: str | None = None) -> str:
    """The highest oneDNN ISA level this host lets oneDNN use: what the CPU has, capped by
    ONEDNN_MAX_CPU_ISA as oneDNN caps itself (an unknown cap such as ALL caps nothing)."""
    flags = cpu_flags() if flags is None else flags
    level = "sse41"
    for name in ISA_LEVELS[1:]:
        if not _LEVEL_FLAGS[name] <= flags:
            break
        level = name
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "") if cap is None else cap
    capped = _CAP_LEVELS.get(cap.strip().upper())
    if capped is not None and ISA_LEVELS.index(capped) < ISA_LEVELS.index(level):
        return capped
    return level


@functools.cache
def packs_bfloat16() -> bool:
    """Whether this host's oneDNN takes a bfloat16 weight in its blocked layout: tried once on a
    small weight (the reorder refuses without AVX512-BW/VL/DQ or AVX-NE-CONVERT)."""
    if _REORDER is None:
        return False
    try:
        _ONEDNN(torch.ones(1, 32, dtype=torch.bfloat16), _REORDER(torch.ones(16, 32, dtype=torch.bfloat16), 1),
                None, "none", [], "")
        return True
    except RuntimeError:
        return False


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The weight as `linear` reads it fastest: a bfloat16 weight on the CPU in oneDNN's blocked
    layout where the host supports it (an opaque tensor only `linear` uses), else as it is."""
    if weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and weight.numel() and packs_bfloat16():
        return _REORDER(weight.contiguous(), 1)
    return weight


def linear(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None, macs: int | None = None
           ) -> torch.Tensor:
    """x (T, d_in) @ weight (d_out, d_in)^T, into `out` when given. The kernel is chosen by the
    product's multiply-adds: `macs` of the whole product when `weight` is a tensor-parallel slice,
    so that each slice's columns are the whole product's, bit for bit."""
    macs = x.shape[0] * weight.shape[0] * weight.shape[1] if macs is None else macs
    if weight.is_mkldnn or (_ONEDNN is not None and x.dtype == torch.float32 and x.device.type == "cpu"
                            and macs >= onednn_macs()):
        y = _ONEDNN(x.contiguous(), weight, None, "none", [], "")
        return y if out is None else out.copy_(y)
    return torch.mm(x, weight.t(), out=out)


@functools.cache
def ring_kernel() -> str:
    """How this host computes the otp mode's exact products in Z/2^64 (teegpu.ring): "int8" (byte
    digits times weight halves, torch._int_mm) where oneDNN runs it on VNNI or AMX and it is
    exact, else "float64" (16-bit digits times 16-bit weights: exact sums below 2^53). Both are
    exact, so the choice changes no result, only the speed."""
    vnni = ISA_LEVELS.index(cpu_isa()) >= ISA_LEVELS.index("avx512_core_vnni")
    return "int8" if vnni and int8_gemm_exact() else "float64"


@functools.cache
def int8_gemm_exact() -> bool:
    """Whether this process's int8 GEMM (torch._int_mm on the CPU) gives exact int32 sums: tried
    once on full-range random digits, against a float64 product (exact at this size)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (32, 512), dtype=torch.int8, generator=g)
    b = torch.randint(-128, 128, (512, 64), dtype=torch.int8, generator=g)
    return torch.equal(torch._int_mm(a, b).double(), a.double() @ b.double())


@functools.cache
def threaded_macs() -> int:
    """Products of at least this many multiply-adds run on every core, smaller ones on one.
    Measured once per host (`host_choices`), so that every process on the host (the server, the
    in-process engine) gives a product the same threads and so the same bits, whatever OpenMP
    wait policy each runs under. TEEGPU_THREADED_MACS (set in every process) chooses instead."""
    if os.environ.get("TEEGPU_THREADED_MACS"):
        return int(os.environ["TEEGPU_THREADED_MACS"])
    return host_choices()["threaded_macs"]


@functools.cache
def onednn_macs() -> int:
    """Float32 products of at least this many multiply-adds run on oneDNN, smaller ones on torch.mm
    (MKL): 0 where oneDNN streams a decode step's one- and two-row products at least ONEDNN_GAIN
    times faster than MKL (an AMD EPYC: MKL keeps its fastest paths for Intel's CPUs), else
    ONEDNN_MACS. Measured once per host with threaded_macs; TEEGPU_ONEDNN_MACS chooses instead."""
    if os.environ.get("TEEGPU_ONEDNN_MACS"):
        return int(os.environ["TEEGPU_ONEDNN_MACS"])
    return host_choices()["onednn_macs"] if _ONEDNN is not None else ONEDNN_MACS


@functools.cache
def host_choices() -> dict:
    """This host's measured kernel and thread choices, kept in the teegpu cache under a lock, made
    by the first process that asks (in a child, under one fixed OpenMP wait policy). Delete the
    file to measure again."""
    path, host = threads_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            choices = json.loads(path.read_text())
            if {"threaded_macs", "onednn_macs", "poll_slowdown"} <= choices.keys():
                return choices
        except (OSError, ValueError, AttributeError):
            pass
        choices = {"host": host, **_measure_in_a_child()}
        path.write_text(json.dumps(choices))
        return choices


def threads_file() -> tuple[Path, list]:
    """Where host_choices keeps this host's measurements, and what names the host."""
    from teegpu.model.loading import cache_root

    host = [_cpu_model(), CORES, torch.__version__, cpu_isa(), threads_per_core()]
    return cache_root() / f"threads-{hashlib.sha256(json.dumps(host).encode()).hexdigest()[:16]}.json", host


def _measure_in_a_child() -> dict:
    """_measure_host under one fixed OpenMP wait policy (PASSIVE, the `teegpu` command's), in a
    child: the answer differs between policies (a sleeping worker is slower to wake), and must not
    depend on which process measured first. In this process where no child can start."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(CORES))
    code = "import json; from teegpu.model.products import CORES, _measure_host; print(json.dumps(_measure_host(CORES)))"
    try:
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        return json.loads(done.stdout.splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return _measure_host(CORES)


def _measure_host(cores: int) -> dict:
    """threaded_macs: 0 (every product on every core) where a decode step's one-row products,
    streamed from memory as a step streams the weights, run at least 1.25x faster on every core
    than on one (hosts whose cores each draw little memory bandwidth); else THREADED_MACS (waking
    a sleeping worker costs more than a second core saves: 40 us on an AMD EPYC). onednn_macs: 0
    where oneDNN runs those products (one and two rows, on the threads they get) at least
    ONEDNN_GAIN times faster than torch.mm, else ONEDNN_MACS. poll_slowdown: the one-row products'
    time beside a poller on an SMT sibling over their time alone (1.0 without SMT siblings)."""
    weights = [torch.full((1536, 576), 0.5) for _ in range(32)]  # 113 MB: more than a last-level cache

    def pass_s(threads: int, rows: int, product) -> float:
        torch.set_num_threads(threads)
        x = torch.randn(rows, 576)
        product(x, weights[0])
        start = time.perf_counter()
        for w in weights:
            product(x, w)
        return time.perf_counter() - start

    def best_s(threads: int, rows: int, product) -> float:
        return min(pass_s(threads, rows, product) for _ in range(5))

    mkl = lambda x, w: torch.mm(x, w.t())  # noqa: E731
    try:
        threaded = THREADED_MACS
        if cores > 1 and best_s(cores, 1, mkl) * 1.25 <= best_s(1, 1, mkl):
            threaded = 0
        threads = cores if threaded == 0 else 1
        onednn, chosen = ONEDNN_MACS, mkl
        if _ONEDNN is not None:
            dnnl = lambda x, w: _ONEDNN(x, w, None, "none", [], "")  # noqa: E731
            if sum(best_s(threads, r, dnnl) for r in (1, 2)) * ONEDNN_GAIN <= sum(best_s(threads, r, mkl) for r in (1, 2)):
                onednn, chosen = 0, dnnl
        pair = next(iter(smt_siblings()), None)
        slowdown = 1.0 if pair is None else _slowdown_beside_a_poller(pair[:2], lambda: best_s(1, 1, chosen))
    finally:
        torch.set_num_threads(cores)
    return {"threaded_macs": threaded, "onednn_macs": onednn, "poll_slowdown": round(slowdown, 3)}


# a polling side's loop, as the doorbell's (a look at a word, then sched_yield), in a process of its own
_POLLER = ("import os, sys; os.sched_setaffinity(0, {%d}); word = memoryview(bytearray(8)).cast('Q'); "
           "print('polling', flush=True)\nwhile word[0] == 0: os.sched_yield()")


def _slowdown_beside_a_poller(pair: tuple[int, int], product_s) -> float:
    """How much slower `product_s()` (seconds of a decode step's one-thread products) runs on CPU
    pair[0] while a process polls on pair[1], its SMT sibling: the two share one core's execution
    units, so a poller there takes from the products, where on a core of its own it takes nothing.
    The better of two timings each way: one slow moment of a shared host must not decide. 1.0 (as
    without siblings) where the CPUs cannot be chosen or no poller can start."""
    saved = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {pair[0]})
        alone = min(product_s(), product_s())
        poller = subprocess.Popen([sys.executable, "-c", _POLLER % pair[1]], stdout=subprocess.PIPE, text=True)
        try:
            poller.stdout.readline()
            beside = min(product_s(), product_s())
        finally:
            poller.kill()
            poller.wait()
        return max(1.0, beside / alone)
    except (OSError, subprocess.SubprocessError):
        return 1.0
    finally:
        os.sched_setaffinity(0, saved)


def smt_siblings(root: str = "/sys/devices/system/cpu", cpus: set[int] | None = None) -> list[tuple[int, ...]]:
    """The groups of this process's CPUs (`cpus`: its affinity) that are SMT siblings, hardware
    threads of one physical core, from Linux's topology files (none where they cannot be read, nor
    where the OS has no CPU affinity: not Linux)."""
    if cpus is None:
        if not hasattr(os, "sched_getaffinity"):
            return []
        cpus = os.sched_getaffinity(0)
    cores: dict[str, list[int]] = {}
    for cpu in sorted(cpus):
        try:
            siblings = Path(root, f"cpu{cpu}", "topology", "thread_siblings_list").read_text().strip()
        except OSError:
            continue
        cores.setdefault(siblings, []).append(cpu)
    return [tuple(group) for group in cores.values() if len(group) > 1]


def threads_per_core() -> int:
    """Hardware threads per physical core among this process's CPUs (1 without SMT)."""
    return max((len(group) for group in smt_siblings()), default=1)


@functools.cache
def poll_slowdown() -> float:
    """How much a one-thread decode product slows while another process polls on its core's SMT
    sibling (1.0 where no two of our CPUs share a core): a client whose reply should come within
    microseconds polls only while that costs the server's products less than a futex wake-up
    (rpc_client). Measured once per host with threaded_macs; TEEGPU_POLL_SLOWDOWN chooses instead."""
    if os.environ.get("TEEGPU_POLL_SLOWDOWN"):
        return float(os.environ["TEEGPU_POLL_SLOWDOWN"])
    return host_choices()["poll_slowdown"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def product_threads(macs: int, cores: int = CORES) -> int:
    """Threads for a product of `macs` multiply-adds, the same in every process on this host."""
    return threads_for(macs, cores, threaded_macs())


@dataclass(frozen=True, slots=True)
class Kernels:
    """What this process computes its products with: the ISA level and, per product kind, the
    implementation that ran it (oneDNN's primitive:implementation, or torch's own kernel)."""

    isa: str
    threaded_macs: int  # products this large run on every core (product_threads)
    onednn_macs: int  # float32 products this large run on oneDNN, smaller ones on torch.mm
    threads_per_core: int  # SMT: hardware threads per physical core among this process's CPUs
    poll_slowdown: float  # a decode product's time beside a poller on its SMT sibling, over its time alone
    float32_small: str
    float32_large: str
    bfloat16: str
    float16: str
    int8: str  # the otp mode's ring products (ring_kernel): int8 GEMMs, or float64 ones where those are slow

    def as_dict(self) -> dict:
        return asdict(self)


@functools.cache
def kernels() -> Kernels:
    """Runs one small product of each kind under oneDNN's verbose mode and reads which
    implementation took it (e.g. brg_matmul:avx512_core_amx). Also asks the kernel for the AMX
    tile permission where the CPU has AMX, so that oneDNN may use the tiles."""
    isa = cpu_isa()
    if isa == "avx512_core_amx" and hasattr(torch._C._cpu, "_init_amx"):
        torch._C._cpu._init_amx()
    x, w = torch.randn(8, 64), torch.randn(64, 64)
    big = torch.randn(ONEDNN_MACS // (8 * 64), 64)
    xb, wb = x.bfloat16(), pack(w.bfloat16())
    xi, wi = torch.ones(32, 64, dtype=torch.int8), torch.ones(64, 64, dtype=torch.int8)
    xd, wd = torch.ones(32, 64, dtype=torch.float64), torch.ones(64, 64, dtype=torch.float64)
    runs = {"float32_small": lambda: linear(x, w), "float32_large": lambda: linear(x, big),
            "bfloat16": lambda: linear(xb, wb), "float16": lambda: linear(x.half(), w.half()),
            "int8": lambda: torch._int_mm(xi, wi)}
    fallback = {"float32_small": "torch.mm:mkl" if torch.backends.mkl.is_available() else "torch.mm"}
    if ring_kernel() == "float64":
        runs["int8"] = lambda: torch.mm(xd, wd)
        fallback["int8"] = "float64-words:mkl" if torch.backends.mkl.is_available() else "float64-words"
    return Kernels(isa=isa, threaded_macs=threaded_macs(), onednn_macs=onednn_macs(),
                   threads_per_core=threads_per_core(), poll_slowdown=poll_slowdown(),
                   **{name: _implementation(run, fallback.get(name, "aten")) for name, run in runs.items()})


_EXEC = re.compile(r"onednn_verbose,[^,]*,?primitive,exec,cpu,(\w+),([^,]*),")


def _implementation(run, fallback: str) -> str:
    """oneDNN's name for the implementation that `run` executed (`fallback` if oneDNN ran none)."""
    if not torch.backends.mkldnn.is_available():
        return fallback
    with tempfile.TemporaryFile(prefix="teegpu-onednn-") as log:
        with _stdout_to(log.fileno()), torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
            run()
        log.seek(0)
        found = _EXEC.findall(log.read().decode(errors="replace"))
    return ";".join(f"{kind}:{impl}" if impl else kind for kind, impl in found) or fallback


@contextlib.contextmanager
def _stdout_to(fd: int):
    """C-level stdout (where oneDNN's verbose lines go) into `fd` for a moment."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    libc.fflush(None)
    os.dup2(fd, 1)
    try:
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)
