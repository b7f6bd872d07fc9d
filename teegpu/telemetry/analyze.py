"""`teegpu analyze`: statistics, bottleneck findings and charts from an RPC log."""
from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from teegpu.errors import TeegpuError
from teegpu.options import rpcs_per_forward
from teegpu.telemetry.rpc_log import COMPONENTS, SCHEMA_VERSION, SERVER_COMPONENTS

READABLE_VERSIONS = (1, SCHEMA_VERSION)
REQUIRED = ("seq", "op", "phase", "token", "total_ms", "bytes_sent", "bytes_received", *COMPONENTS,
            *SERVER_COMPONENTS)
SMALL_BYTES = 64 * 1024
MEMORY_BANDWIDTH_MB_S = 5_000  # a conservative memcpy rate; shm should approach it


class LogError(TeegpuError):
    """The log cannot be analysed (empty, unreadable, or of another schema)."""


@dataclass(slots=True)
class RpcLogData:
    run: dict
    records: list[dict]
    corrupt_lines: int = 0
    truncated_last_line: bool = False
    notes: list[str] = field(default_factory=list)
    generations: list[dict] = field(default_factory=list)  # one time-split record per generation


def read_log(path: str | Path) -> RpcLogData:
    """Parse a log; corrupt lines are skipped and counted, a cut last line is noted."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise LogError(f"cannot read {path}: {e.strerror}") from e
    lines = text.split("\n")
    truncated = bool(lines[-1].strip())  # a complete file ends with a newline
    if truncated:
        lines.pop()
    run, records, generations, corrupt = None, [], [], 0
    for line in filter(str.strip, lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            corrupt += 1
            continue
        if isinstance(rec, dict) and rec.get("type") == "run" and run is None:
            run = rec
        elif isinstance(rec, dict) and rec.get("type") == "generation":
            generations.append(rec)
        elif isinstance(rec, dict) and all(k in _renamed(rec) for k in REQUIRED):
            records.append(rec)
        else:
            corrupt += 1
    if run is None and not records:
        raise LogError(f"{path} holds no RPC records" + (f" ({corrupt} corrupt lines)" if corrupt else ""))
    if run is None:
        raise LogError(f"{path} has no run record: not a teegpu RPC log, or its head was cut")
    version = run.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise LogError(f"{path} was written with log schema version {version}; this analyzer reads versions "
                       f"{', '.join(map(str, READABLE_VERSIONS))}. Re-record it with this teegpu version.")
    data = RpcLogData(run, records, corrupt, truncated, generations=generations)
    if corrupt:
        data.notes.append(f"{corrupt} corrupt line(s) skipped")
    if truncated:
        data.notes.append("the last line was cut off (run still writing or killed); it is ignored")
    return data


def _renamed(rec: dict) -> dict:
    """A record in this schema's names: schema 1 called server_overhead_ms server_queue_ms."""
    if "server_queue_ms" in rec and "server_overhead_ms" not in rec:
        rec["server_overhead_ms"] = rec.pop("server_queue_ms")
    return rec


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def _group_stats(records: list[dict]) -> dict:
    ms = [r["total_ms"] for r in records]
    return {"calls": len(ms), "mean_ms": sum(ms) / len(ms), "p50_ms": percentile(ms, 50),
            "p95_ms": percentile(ms, 95), "max_ms": max(ms),
            "bytes": sum(r["bytes_sent"] + r["bytes_received"] for r in records)}


def analyze(data: RpcLogData, top: int = 5) -> dict:
    recs = data.records
    if not recs:
        return {"run": data.run, "calls": 0, "notes": data.notes + ["the log holds no RPC records yet"]}
    total = sum(r["total_ms"] for r in recs)
    shares = {k: sum(r[k] for r in recs) / total if total else 0.0 for k in COMPONENTS + SERVER_COMPONENTS}
    forwards = {(r["phase"], r["token"]) for r in recs}
    moved = sum(r["bytes_sent"] + r["bytes_received"] for r in recs)
    by_op, by_phase = defaultdict(list), defaultdict(list)
    for r in recs:
        by_op[r["op"]].append(r)
        by_phase[r["phase"]].append(r)
    report = {
        "run": data.run,
        "calls": len(recs),
        "total_ms": total,
        "mean_ms": total / len(recs),
        "shares": shares,
        "forward_passes": len(forwards),
        "calls_per_token": len(recs) / len(forwards),
        "bytes_moved": moved,
        "effective_mb_s": moved / 1e6 / (total / 1e3) if total else 0.0,
        "per_op": {op: _group_stats(rs) for op, rs in sorted(by_op.items())},
        "per_phase": {ph: _group_stats(rs) for ph, rs in sorted(by_phase.items())},
        "retries": sum(r.get("tries", 1) - 1 for r in recs),
        "per_path": dict(sorted(Counter(r.get("path", r.get("transport", "?")) for r in recs).items())),
        "slowest": sorted(recs, key=lambda r: -r["total_ms"])[:top],
        "largest": sorted(recs, key=lambda r: -(r["bytes_sent"] + r["bytes_received"]))[:top],
        "notes": data.notes,
        "generations": data.generations,
    }
    report["findings"] = findings(report, recs)
    return report


def findings(rep: dict, recs: list[dict]) -> list[str]:
    """Bottlenecks with a recommendation each, driven by the numbers."""
    out, sh = [], rep["shares"]
    layers = rep["run"].get("num_layers")
    serial = sh["serialize_ms"] + sh["deserialize_ms"]
    if serial > 0.15:
        out.append(f"serialisation takes {serial:.0%} of RPC time: keep tensors contiguous in the wire dtype "
                   "and avoid casts on the hot path")
    if layers and rep["calls_per_token"] > rpcs_per_forward(layers) + 1e-9 and rep["run"].get("offload_attention"):
        # (otp's long prefills add calls too: products larger than the shared region go in pieces)
        out.append(f"{rep['calls_per_token']:.1f} RPCs per forward pass, the minimum is {rpcs_per_forward(layers)}: "
                   "drop --offload-attention (it also ships the whole KV prefix every call)")
    small = [r for r in recs if r["bytes_sent"] + r["bytes_received"] < SMALL_BYTES]
    if small:
        overhead = [r["total_ms"] - r["server_compute_ms"] for r in small]
        small_total = sum(r["total_ms"] for r in small)
        share = sum(overhead) / small_total if small_total else 0.0
        if share > 0.5:
            out.append(f"fixed per-call overhead dominates small messages: {percentile(overhead, 50):.3f} ms "
                       f"median outside server compute, {share:.0%} of their time; fewer round trips "
                       "(fusion) or a cheaper wake-up path (shared memory, busy polling) pays most")
    large = [r for r in recs if r["bytes_sent"] + r["bytes_received"] >= 1 << 20]
    if large:
        mb_s = sum(r["bytes_sent"] + r["bytes_received"] for r in large) / 1e6 / (
            sum(r["total_ms"] - r["server_compute_ms"] for r in large) / 1e3 or 1e-9)
        if mb_s < MEMORY_BANDWIDTH_MB_S / 5:
            out.append(f"large transfers move {mb_s:.0f} MB/s outside compute, far below memory bandwidth "
                       f"(~{MEMORY_BANDWIDTH_MB_S} MB/s): use the shared-memory data plane or bfloat16 on the wire")
    if sh["server_compute_ms"] > 0.6:
        out.append(f"server compute is {sh['server_compute_ms']:.0%} of RPC time: the transport is not the "
                   "bottleneck; a GPU (--device cuda) or bfloat16 weights (--dtype bfloat16) help most")
    transport = rep["run"].get("transport")
    tiny = [r for r in recs if r["bytes_sent"] < 1024]
    if transport == "tcp" and len(tiny) > len(recs) / 2:
        out.append("most requests are under 1 KB and go over tcp: ipc:// (same host) is cheaper for small "
                   "messages; above ~10 MB the two differ by under 2%")
    if not out:
        out.append("no dominant bottleneck: time is spread across components")
    return out


def format_report(rep: dict) -> str:
    if not rep["calls"]:
        return "\n".join(["no RPC records yet", *rep["notes"]])
    run = rep["run"]
    lines = [f"run: {Path(str(run.get('model', '?'))).name}  transport {run.get('transport')}  dtype "
             f"{run.get('dtype')}  device {run.get('device')}  privacy {run.get('privacy')}",
             f"calls {rep['calls']}  total {rep['total_ms']:.1f} ms  mean {rep['mean_ms']:.3f} ms/call  "
             f"forward passes {rep['forward_passes']}  calls/token {rep['calls_per_token']:.1f}",
             f"bytes moved {rep['bytes_moved'] / 1e6:.2f} MB  effective {rep['effective_mb_s']:.1f} MB/s",
             "time share: " + "  ".join(f"{k.removesuffix('_ms')} {v:.1%}" for k, v in rep["shares"].items()),
             "paths: " + "  ".join(f"{path} {n}" for path, n in rep["per_path"].items())
             + f"  retries {rep['retries']}",
             "", f"{'per op':<14}{'calls':>7}{'mean ms':>10}{'p50':>9}{'p95':>9}{'max':>9}{'MB':>9}"]
    for title, table in (("per op", rep["per_op"]), ("per phase", rep["per_phase"])):
        if title == "per phase":
            lines += ["", f"{'per phase':<14}{'calls':>7}{'mean ms':>10}{'p50':>9}{'p95':>9}{'max':>9}{'MB':>9}"]
        for name, s in table.items():
            lines.append(f"{name:<14}{s['calls']:>7}{s['mean_ms']:>10.3f}{s['p50_ms']:>9.3f}{s['p95_ms']:>9.3f}"
                         f"{s['max_ms']:>9.3f}{s['bytes'] / 1e6:>9.2f}")
    for title, key, fmt in (("slowest calls", "slowest", lambda r: f"{r['total_ms']:.3f} ms"),
                            ("largest transfers", "largest",
                             lambda r: f"{(r['bytes_sent'] + r['bytes_received']) / 1e6:.3f} MB")):
        lines += ["", title + ":"]
        lines += [f"  #{r['seq']} {r['op']} layer {r.get('layer')} {r['phase']} token {r['token']}: {fmt(r)}"
                  for r in rep[key]]
    if rep.get("generations"):
        lines += ["", "time split per generation (offline / transfer / server compute / trusted compute, ms):"]
        for g in rep["generations"]:
            split = g["time_split_ms"]
            lines.append(f"  {g['tokens']} tokens: offline {split['offline']:.1f} / transfer {split['transfer']:.1f} / "
                         f"server {split['server_compute']:.1f} / trusted {split['trusted_compute']:.1f}")
    lines += ["", "findings:", *(f"  - {f}" for f in rep["findings"])]
    lines += [f"note: {n}" for n in rep["notes"]]
    return "\n".join(lines)


def to_json(rep: dict) -> str:
    return json.dumps(rep, indent=1, default=str)


def follow(path: str | Path, interval_s: float = 1.0, idle_exit_s: float | None = None, out=None) -> None:
    """Print a one-line summary whenever the log grows, until Ctrl-C or idle_exit_s without growth."""
    import sys
    import time

    out = out or sys.stdout
    last_size, idle_since = -1, time.monotonic()
    try:
        while True:
            size = Path(path).stat().st_size if Path(path).exists() else 0
            if size != last_size:
                last_size, idle_since = size, time.monotonic()
                try:
                    rep = analyze(read_log(path))
                except LogError as e:
                    print(f"waiting: {e}", file=out, flush=True)
                else:
                    if rep["calls"]:
                        sh = rep["shares"]
                        print(f"calls {rep['calls']}  forwards {rep['forward_passes']}  mean {rep['mean_ms']:.3f} ms"
                              f"  wait {sh['wait_ms']:.0%} (server compute {sh['server_compute_ms']:.0%})"
                              f"  serialize {sh['serialize_ms'] + sh['deserialize_ms']:.0%}"
                              f"  {rep['bytes_moved'] / 1e6:.1f} MB", file=out, flush=True)
            elif idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                return
            time.sleep(interval_s)
    except KeyboardInterrupt:
        return
