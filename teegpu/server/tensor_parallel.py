"""Tensor parallelism for the GPU server: N ranks, each holding a column slice of every served weight.

Every linear's output goes back to the trusted side, so one request needs one collective. Rank 0
hands the input to the other ranks (fan-out: a shared-memory region when every rank is on this
host, else a torch.distributed broadcast), every rank multiplies it by its rows of the weight with
the kernel and threads the whole product would use, so its columns are the single server's bit for
bit, and rank 0 gathers the columns (torch.distributed gather: gloo on cpu, NCCL on cuda) and
replies. The collective only concatenates: bf16 results are not re-rounded and the otp ring
products need no sum in int64, which neither NCCL nor gloo has for uint64.

Ranks come from torchrun (RANK, WORLD_SIZE, MASTER_ADDR/PORT), or rank 0 starts the others on
this host. A rank that fails takes the group down: every collective has a deadline
(`ServerConfig.tp_timeout_s`; rank 0 sends a heartbeat while idle, so waiting for the next request
never reaches it), the other ranks exit when rank 0 is gone, and rank 0 stops serving at once.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from teegpu.config import ServerConfig
from teegpu.errors import ConfigError, TeegpuError
from teegpu.model.weights import column_slice
from teegpu.protocol import DATA_START, Op
from teegpu.telemetry.memory import peak_rss
from teegpu.transport import ShmRegion

STOP, IDLE, PRODUCT, REGION = range(4)  # the commands rank 0 sends
HEARTBEAT_S = 1.0  # rank 0 sends IDLE after this long without a collective
SPAWNED = "TEEGPU_TP_STORE"  # HOST:PORT of rank 0's store, in the environment of the ranks it started
START_TIMEOUT_S = 1800  # collectives while the ranks load their slices (a large model's take minutes)


class GroupDown(TeegpuError):
    """A rank of the tensor-parallel group failed or timed out: rank 0 stops serving."""


@dataclasses.dataclass(frozen=True, slots=True)
class Place:
    """Where this process stands in the group."""

    rank: int
    ranks: int
    one_host: bool  # every rank on this host (the shared-memory fan-out works)

    @property
    def part(self) -> tuple[int, int]:
        return self.rank, self.ranks


def place(config: ServerConfig) -> Place | None:
    """This process's place from torchrun's (or rank 0's) environment; None for a single server."""
    if "RANK" not in os.environ:
        return None if config.tensor_parallel == 1 else Place(0, config.tensor_parallel, True)
    ranks = int(os.environ["WORLD_SIZE"])
    if ranks != config.tensor_parallel:
        raise ConfigError(f"--tensor-parallel {config.tensor_parallel}, but torchrun started {ranks} ranks")
    return Place(int(os.environ["RANK"]), ranks, int(os.environ.get("LOCAL_WORLD_SIZE", ranks)) == ranks)


def start_ranks(config: ServerConfig, where: Place) -> tuple[dist.Store | None, list[subprocess.Popen]]:
    """Rank 0 without torchrun: a store on a free port and the other ranks, started on this host
    with this server's configuration; under torchrun (or in a started rank) nothing to start."""
    if where.rank != 0 or "RANK" in os.environ:
        return None, []
    store = dist.TCPStore("127.0.0.1", 0, where.ranks, is_master=True, timeout=timedelta(seconds=START_TIMEOUT_S),
                          wait_for_workers=False)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every rank here: loopback, whatever the hostname resolves to
    child = dataclasses.replace(config, parent_pid=os.getpid())
    cmd = [sys.executable, "-m", "teegpu.cli", "serve", *child.to_argv()]
    procs = []
    for rank in range(1, where.ranks):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(where.ranks),
                   LOCAL_WORLD_SIZE=str(where.ranks), **{SPAWNED: f"127.0.0.1:{store.port}"})
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL))
    return store, procs


def join(where: Place, device: torch.device, store: dist.Store | None) -> None:
    """Join the process group (gloo on cpu, NCCL on cuda) under the start-up deadline."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", where.rank)))
    timeout = timedelta(seconds=START_TIMEOUT_S)
    if store is None and SPAWNED in os.environ:  # a rank started by rank 0: its store, not torchrun's env://
        host, port = os.environ[SPAWNED].rsplit(":", 1)
        store = dist.TCPStore(host, int(port), where.ranks, is_master=False, timeout=timeout)
    if store is not None:
        dist.init_process_group(backend, store=store, rank=where.rank, world_size=where.ranks, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method="env://", timeout=timeout)


def rank_report(server) -> dict:
    """What a rank tells rank 0 once loaded: its pid, host, the bytes of weight it holds, its peak
    RSS and on cuda its peak GPU memory (the memory per rank that HELLO and `bench seed` report)."""
    report = {"rank": server.part[0], "pid": os.getpid(), "host": socket.gethostname(),
              "weight_bytes": server.weight_bytes,
              "peak_rss_bytes": peak_rss()}
    if server.device.type == "cuda":
        report["gpu_peak_bytes"] = torch.cuda.max_memory_allocated(server.device)
    return report


class TensorGroup:
    """The collectives of one rank: rank 0 calls `product`, `heartbeat` and `stop`; the others `follow`."""

    def __init__(self, where: Place, device: torch.device, fan_out: str, timeout_s: float):
        if fan_out == "shm" and not where.one_host:
            raise ConfigError("--tp-fan-out shm needs every rank on one host; use broadcast")
        self.where, self.device = where, device
        shm = fan_out == "shm" or (fan_out == "auto" and where.one_host and device.type == "cpu")
        self.fan_out = "shm" if shm else "broadcast"
        self.group = dist.new_group(list(range(where.ranks)), timeout=timedelta(seconds=timeout_s))
        # command, op, layer, rows (on the device for NCCL, which takes device tensors only)
        self.command = torch.zeros(4, dtype=torch.int64, device=device if device.type == "cuda" else "cpu")
        self.region: ShmRegion | None = None
        self.scratch = torch.empty(0, dtype=torch.uint8, device=device)  # the gather's slices (_parts)
        self.last_s = time.monotonic()

    def collect(self, report: dict, digests: dict | None) -> list[dict] | None:
        """Rank 0 gets every rank's report and row digests (otp); the others send theirs."""
        everything = [None] * self.where.ranks if self.where.rank == 0 else None
        dist.gather_object((report, digests), everything, dst=0)
        return everything

    # ---- rank 0 ----

    def product(self, server, op: Op, layer: int, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x times the whole weight of (op, layer): every rank's columns, gathered and concatenated
        (into `out` when given on this device). Whatever fails before the command goes out (the
        buffers of a huge request) fails this request alone; once it is out, rank 0 takes part in
        the gather even if its own product failed, so the group stays in step."""
        d_out = server.shapes[op, layer][0]
        parts = self._parts(x.shape[0], d_out, server.dtype)
        failed = None
        try:
            x = self._fan_out(op, layer, x)
            try:
                mine = server.columns(op, layer, x, parts[-1])
            except Exception as e:  # the others still send their columns
                failed, mine = e, parts[-1]
            dist.gather(self._bytes(mine), [self._bytes(p) for p in parts[:-1]], dst=0, group=self.group)
        except RuntimeError as e:  # gloo and NCCL raise RuntimeError (DistBackendError) for a lost rank
            raise GroupDown(f"tensor-parallel rank lost during {op.name} layer {layer}: {reason(e)}") from e
        if failed is not None:
            raise failed
        result = out if out is not None and out.device == mine.device else mine.new_empty(x.shape[0], d_out)
        for rank, part in enumerate(parts[:-1]):
            start, end = column_slice(d_out, rank, self.where.ranks)
            result[:, start:end] = part[:, :end - start]
        return result

    def _send(self, command: int, op: int = 0, layer: int = 0, rows: int = 0) -> None:
        self.command.copy_(torch.tensor((command, op, layer, rows)))
        dist.broadcast(self.command, 0, group=self.group)
        self.last_s = time.monotonic()

    def _fan_out(self, op: Op, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Send the command and hand x to every rank; x as this rank multiplies it."""
        if self.fan_out == "broadcast":
            x = x.to(self.device).contiguous()
            self._send(PRODUCT, op, layer, x.shape[0])
            dist.broadcast(self._bytes(x), 0, group=self.group)
            return x
        view = self._region(x.numel() * x.element_size()).tensor(DATA_START, x.dtype, tuple(x.shape))
        view.copy_(x)  # before the command: a rank reads the region once the command arrives
        self._send(PRODUCT, op, layer, x.shape[0])
        return view

    def _region(self, size: int) -> ShmRegion:
        """The fan-out region, made larger (and its name sent to the ranks) when a request needs it."""
        if self.region is None or DATA_START + size > self.region.size:
            old, self.region = self.region, ShmRegion.create(max(2 * (DATA_START + size), 1 << 20))
            self._send(REGION)  # the ranks read the name next, then map it
            dist.broadcast_object_list([self.region.name], 0, group=self.group)
            dist.barrier(group=self.group)
            self.region.unlink()  # every rank has mapped it: nothing stays in /dev/shm
            if old is not None:
                old.close()
        return self.region

    def _parts(self, rows: int, d_out: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """Rank 0's gather list (one padded slice per rank) and, last, the slice rank 0 computes into;
        on another rank its one padded slice. Views of one scratch buffer that grows to the largest
        request, so that a prefill's gather does not allocate (and fault in) its own every time."""
        columns = column_slice(d_out, 0, self.where.ranks)[1]  # the largest slice
        count = self.where.ranks + 1 if self.where.rank == 0 else 1
        size = -(-rows * columns * dtype.itemsize // 64) * 64  # each part 64-byte aligned
        if self.scratch.numel() < count * size:
            self.scratch = torch.empty(count * size, dtype=torch.uint8, device=self.device)
        return [self.scratch[i * size:i * size + rows * columns * dtype.itemsize].view(dtype).view(rows, columns)
                for i in range(count)]

    def heartbeat(self) -> None:
        """While idle: tell the ranks we are alive before their collective deadline passes."""
        if time.monotonic() - self.last_s >= HEARTBEAT_S:
            try:
                self._send(IDLE)
            except RuntimeError as e:
                raise GroupDown(f"tensor-parallel rank lost while idle: {reason(e)}") from e

    def stop(self) -> None:
        """Tell the other ranks to exit (best effort: one may be gone already)."""
        try:
            self._send(STOP)
        except RuntimeError:
            pass

    # ---- ranks 1..N-1 ----

    def follow(self, server) -> None:
        """Compute this rank's columns of every request rank 0 sends, until STOP."""
        while True:
            dist.broadcast(self.command, 0, group=self.group)
            command, op, layer, rows = self.command.tolist()
            if command == STOP:
                return
            if command == REGION:
                self._map_region()
            elif command == PRODUCT:
                self._follow_product(server, Op(op), layer, rows)

    def _follow_product(self, server, op: Op, layer: int, rows: int) -> None:
        d_out, d_in = server.shapes[op, layer]
        if self.fan_out == "shm":
            x = self.region.tensor(DATA_START, server.dtype, (rows, d_in))
        else:
            x = torch.empty(rows, d_in, dtype=server.dtype, device=self.device)
            dist.broadcast(self._bytes(x), 0, group=self.group)
        padded = self._parts(rows, d_out, server.dtype)[0]
        start, end = column_slice(d_out, self.where.rank, self.where.ranks)
        mine = server.columns(op, layer, x, padded if end - start == padded.shape[1] else None)
        if mine.data_ptr() != padded.data_ptr():
            padded[:, :end - start] = mine
        dist.gather(self._bytes(padded), None, dst=0, group=self.group)

    def _map_region(self) -> None:
        name = [None]
        dist.broadcast_object_list(name, 0, group=self.group)
        if self.region is not None:
            self.region.close()
        self.region = ShmRegion.attach(name[0])
        dist.barrier(group=self.group)

    @staticmethod
    def _bytes(t: torch.Tensor) -> torch.Tensor:
        """The tensor's bytes: the collectives move bytes, never add or round them, in any dtype."""
        return t.view(torch.uint8)


def reason(error: Exception) -> str:
    """A collective's error in one line, without gloo's advice and sign-off."""
    return str(error).split(" This is typically")[0].strip()


def watch_ranks(procs: list[subprocess.Popen], stop: threading.Event, down: list, serving: threading.Event) -> None:
    """Rank 0: once a rank it started exits, note why and stop serving (a collective would fail too,
    but only when the next request comes). Before serving, rank 0 waits in the group's start-up
    collectives, which would wait for the lost rank until their deadline: it exits at once."""
    while not stop.wait(0.2):
        for rank, proc in enumerate(procs, start=1):
            if proc.poll() is None:
                continue
            down.append(f"tensor-parallel rank {rank} exited with code {proc.returncode}")
            if not serving.is_set():
                print(f"teegpu: error: {down[0]} while the group started", file=sys.stderr, flush=True)
                for other in procs:
                    other.kill()
                os._exit(2)
            stop.set()
            return


def end_ranks(procs: list[subprocess.Popen], timeout_s: float = 10.0) -> None:
    """Wait for the ranks rank 0 started (they got STOP, or the group broke), then kill stragglers."""
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def exit_when_gone(pid: int) -> None:
    """A rank started by rank 0: exit at once when rank 0 is gone, even while blocked in a collective."""
    while True:
        time.sleep(0.5)
        if os.getppid() != pid:
            print(f"teegpu tensor-parallel rank: rank 0 (process {pid}) is gone, exiting", file=sys.stderr, flush=True)
            os._exit(1)
