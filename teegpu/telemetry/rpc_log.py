"""One record per RPC, always summed, optionally written as JSON Lines.

Each call is split into what the seed measured (serialize, send, receive,
deserialize) plus what it could not separate: the wait for the reply, and within it
the server's own compute and overhead, which the server reports in the reply header.
Records are formatted with a precompiled template (no json.dumps per call) and the
file is flushed after every forward pass, so `tail -f` follows a run.
"""
from __future__ import annotations

import json
import platform
import socket
import time
from dataclasses import dataclass, field

SCHEMA_VERSION = 2  # 2: server_queue_ms renamed server_overhead_ms (the analyzer reads both)
COMPONENTS = ("serialize_ms", "send_ms", "wait_ms", "recv_ms", "deserialize_ms")
SERVER_COMPONENTS = ("server_compute_ms", "server_overhead_ms")

_LINE = ('{"seq":%d,"op":"%s","layer":%d,"phase":"%s","token":%d,"transport":"%s","path":"%s","tries":%d,"start_ms":%.4f,'
         '"serialize_ms":%.4f,"send_ms":%.4f,"wait_ms":%.4f,"server_compute_ms":%.4f,"server_overhead_ms":%.4f,'
         '"recv_ms":%.4f,"deserialize_ms":%.4f,"total_ms":%.4f,"bytes_sent":%d,"bytes_received":%d,'
         '"throughput_mb_s":%.3f}\n')


@dataclass(slots=True)
class RpcTelemetry:
    """Sums of every component; writes a line per RPC when a path is given."""

    transport: str = ""
    phase: str = "prefill"  # set by the engine: prefill or decode
    token: int = 0  # index of the token being produced by the current forward pass
    calls: int = 0
    totals: dict = field(default_factory=lambda: dict.fromkeys(COMPONENTS + SERVER_COMPONENTS + ("total_ms",), 0.0))
    bytes_sent: int = 0
    bytes_received: int = 0
    _file: object = None
    _t0_ns: int = 0

    def open(self, path: str, run_info: dict) -> None:
        """Start a log file; its first record describes the run."""
        self._file = open(path, "w", buffering=1 << 16)
        self._t0_ns = time.perf_counter_ns()
        head = {"type": "run", "schema_version": SCHEMA_VERSION, "host": socket.gethostname(),
                "python": platform.python_version(), "started_unix_s": time.time(), **run_info}
        self._file.write(json.dumps(head) + "\n")
        self._file.flush()

    def record(self, op: str, layer: int, stamps: tuple[int, ...], compute_ns: int, overhead_ns: int,
               sent: int, received: int, path: str = "socket", tries: int = 1) -> None:
        """stamps: perf_counter_ns at start, serialized, sent, reply ready, received, deserialized;
        path: how the call travelled (RpcClient's Reply.path); tries: 2 and more when it was sent again."""
        t0, t1, t2, t3, t4, t5 = stamps
        ser, snd, wait, rcv, des = (t1 - t0) / 1e6, (t2 - t1) / 1e6, (t3 - t2) / 1e6, (t4 - t3) / 1e6, (t5 - t4) / 1e6
        total = (t5 - t0) / 1e6
        comp, overhead = compute_ns / 1e6, overhead_ns / 1e6
        tot = self.totals
        tot["serialize_ms"] += ser
        tot["send_ms"] += snd
        tot["wait_ms"] += wait
        tot["recv_ms"] += rcv
        tot["deserialize_ms"] += des
        tot["server_compute_ms"] += comp
        tot["server_overhead_ms"] += overhead
        tot["total_ms"] += total
        self.calls += 1
        self.bytes_sent += sent
        self.bytes_received += received
        if self._file is not None:
            mb_s = (sent + received) / 1e6 / (total / 1e3) if total > 0 else 0.0
            self._file.write(_LINE % (self.calls, op, layer, self.phase, self.token, self.transport, path, tries,
                                      (t0 - self._t0_ns) / 1e6, ser, snd, wait, comp, overhead, rcv, des, total,
                                      sent, received, mb_s))

    def write_generation(self, record: dict) -> None:
        """A generation's time split (offline, transfer, server, trusted), after its RPC lines."""
        if self._file is not None:
            self._file.write(json.dumps({"type": "generation", **record}) + "\n")
            self._file.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def summary(self) -> dict:
        out = {"calls": self.calls, "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received}
        out["breakdown_ms"] = {k: round(v, 3) for k, v in self.totals.items()}
        return out
