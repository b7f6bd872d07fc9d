"""Per-RPC records: complete on a real run, exact statistics on a known log, robust input."""
import json
import subprocess
import sys
import threading
import time
from io import StringIO

import pytest

from conftest import connect_engine
from teegpu.telemetry import SCHEMA_VERSION
from teegpu.telemetry.analyze import LogError, analyze, follow, percentile, read_log
from teegpu.tee.engine import GenerationConfig
from teegpu.options import rpcs_per_forward

CLI = [sys.executable, "-m", "teegpu.cli"]
RUN = {"type": "run", "schema_version": SCHEMA_VERSION, "transport": "tcp", "num_layers": 1, "model": "m"}


def synthetic_record(seq, op, phase, token, total, compute, sent, received):
    return {"seq": seq, "op": op, "layer": 0, "phase": phase, "token": token, "transport": "tcp",
            "start_ms": seq * 10.0, "serialize_ms": 0.1, "send_ms": 0.2, "wait_ms": total - 0.6,
            "server_compute_ms": compute, "server_overhead_ms": 0.05, "recv_ms": 0.1, "deserialize_ms": 0.2,
            "total_ms": total, "bytes_sent": sent, "bytes_received": received, "throughput_mb_s": 0.0}


def write_log(path, records, run=RUN, tail=""):
    path.write_text("\n".join(json.dumps(x) for x in [run, *records]) + "\n" + tail)


def test_synthetic_log_gives_exact_statistics(tmp_path):
    recs = [synthetic_record(i + 1, "QKV" if i % 2 == 0 else "LM_HEAD", "prefill" if i < 2 else "decode",
                             0 if i < 2 else i // 2, total=float(i + 1), compute=0.5, sent=100, received=300)
            for i in range(10)]
    write_log(tmp_path / "log.jsonl", recs)
    rep = analyze(read_log(tmp_path / "log.jsonl"), top=3)
    assert rep["calls"] == 10
    assert rep["total_ms"] == pytest.approx(55.0)
    assert rep["mean_ms"] == pytest.approx(5.5)
    assert rep["forward_passes"] == 5  # prefill + decode tokens 1..4
    assert rep["calls_per_token"] == pytest.approx(2.0)
    assert rep["bytes_moved"] == 4000
    assert rep["shares"]["serialize_ms"] == pytest.approx(1.0 / 55)
    assert rep["shares"]["server_compute_ms"] == pytest.approx(5.0 / 55)
    qkv = rep["per_op"]["QKV"]  # totals 1, 3, 5, 7, 9
    assert (qkv["calls"], qkv["mean_ms"], qkv["p50_ms"], qkv["p95_ms"], qkv["max_ms"]) == (5, 5.0, 5.0, 9.0, 9.0)
    assert rep["per_phase"]["prefill"]["calls"] == 2
    assert [r["seq"] for r in rep["slowest"]] == [10, 9, 8]
    assert rep["retries"] == 0 and rep["per_path"] == {"tcp": 10}
    assert any("tcp" in f for f in rep["findings"])  # all messages < 1 KB over tcp
    assert any("per-call overhead" in f for f in rep["findings"])


def test_percentile_nearest_rank():
    assert percentile([5, 1, 3], 50) == 3
    assert percentile(list(range(1, 101)), 95) == 95


def test_real_run_records_every_rpc(tmp_path, smollm2, smollm2_servers):
    weights, tok = smollm2
    engine = connect_engine(weights, tok, smollm2_servers, "tcp")
    log = tmp_path / "rpc.jsonl"
    engine.telemetry.open(str(log), {"model": "smollm2", "transport": "tcp", "num_layers": 30})
    calls_before = engine.client.stats.calls
    result = engine.generate("Count to five:", GenerationConfig(max_new_tokens=6, stop_at_eos=False))
    engine.close()
    data = read_log(log)
    assert len(data.records) == engine.client.stats.calls - calls_before == result.rpc["calls"] == 6 * rpcs_per_forward(30)
    assert [r["seq"] for r in data.records] == list(range(1, 6 * rpcs_per_forward(30) + 1))
    for r in data.records:
        assert 0 < r["server_compute_ms"] <= r["total_ms"]
        assert r["bytes_sent"] > 0 and r["bytes_received"] > 0
        parts = sum(r[k] for k in ("serialize_ms", "send_ms", "wait_ms", "recv_ms", "deserialize_ms"))
        assert parts == pytest.approx(r["total_ms"], abs=1e-3)
    assert {r["phase"] for r in data.records} == {"prefill", "decode"}
    assert sorted({r["token"] for r in data.records if r["phase"] == "decode"}) == [1, 2, 3, 4, 5]
    breakdown = result.rpc["breakdown_ms"]
    assert breakdown["total_ms"] == pytest.approx(sum(r["total_ms"] for r in data.records), rel=1e-3)
    rep = analyze(data)
    assert rep["calls_per_token"] == 121
    (gen,) = data.generations  # the time split of the generation, after its RPC lines
    split = gen["time_split_ms"]
    assert gen["tokens"] == 6 and split["offline"] == 0  # plain mode: no pads
    assert split["transfer"] + split["server_compute"] == pytest.approx(breakdown["total_ms"], rel=1e-3)
    assert split["trusted_compute"] > 0


def test_plot_is_a_readable_png(tmp_path, smollm2, smollm2_servers):
    from PIL import Image

    weights, tok = smollm2
    engine = connect_engine(weights, tok, smollm2_servers, "ipc")
    log = tmp_path / "rpc.jsonl"
    engine.telemetry.open(str(log), {"model": "smollm2", "transport": "ipc", "num_layers": 30})
    engine.generate("Hi", GenerationConfig(max_new_tokens=4, stop_at_eos=False))
    engine.close()
    out = subprocess.run(CLI + ["analyze", str(log), "--plot", str(tmp_path / "rpc.png")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "calls/token 121.0" in out.stdout and "findings:" in out.stdout
    img = Image.open(tmp_path / "rpc.png")
    assert img.format == "PNG" and img.size[0] >= 800 and img.size[1] >= 600
    assert 20_000 < (tmp_path / "rpc.png").stat().st_size < 2_000_000


def run_analyze(path):
    out = subprocess.run(CLI + ["analyze", str(path)], capture_output=True, text=True, timeout=60)
    assert "Traceback" not in out.stderr
    return out


def test_cut_last_line_is_noted(tmp_path):
    cut = tmp_path / "cut.jsonl"
    write_log(cut, [synthetic_record(1, "QKV", "prefill", 0, 2.0, 1.0, 10, 10)], tail='{"seq": 2, "op": "Q')
    out = run_analyze(cut)
    assert out.returncode == 0 and "last line was cut off" in out.stdout


def test_corrupt_lines_are_skipped_and_counted(tmp_path):
    rec = synthetic_record(1, "QKV", "prefill", 0, 2.0, 1.0, 10, 10)
    corrupt = tmp_path / "corrupt.jsonl"
    corrupt.write_text(json.dumps(RUN) + "\nnot json\n" + json.dumps(rec) + "\n{\"seq\": 1}\n")
    out = run_analyze(corrupt)
    assert out.returncode == 0 and "2 corrupt line(s) skipped" in out.stdout and "calls 1" in out.stdout


def test_empty_log_is_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = run_analyze(empty)
    assert out.returncode == 2 and "no RPC records" in out.stderr
    with pytest.raises(LogError):
        read_log(empty)


def test_unknown_schema_version_is_refused(tmp_path):
    old = tmp_path / "old.jsonl"
    write_log(old, [synthetic_record(1, "QKV", "prefill", 0, 2.0, 1.0, 10, 10)], run={**RUN, "schema_version": 0})
    out = run_analyze(old)
    assert out.returncode == 2 and "schema version 0" in out.stderr


def test_missing_file_is_named(tmp_path):
    out = run_analyze(tmp_path / "missing.jsonl")
    assert out.returncode == 2 and "cannot read" in out.stderr


def test_retries_and_paths_are_counted(tmp_path):
    recs = [synthetic_record(i + 1, "QKV", "decode", i, 1.0, 0.5, 10, 10) for i in range(4)]
    recs[1].update(tries=3, path="doorbell-ring")
    recs[2].update(tries=2, path="doorbell")
    write_log(tmp_path / "log.jsonl", recs)
    rep = analyze(read_log(tmp_path / "log.jsonl"))
    assert rep["retries"] == 3 and rep["per_path"] == {"doorbell": 1, "doorbell-ring": 1, "tcp": 2}
    out = run_analyze(tmp_path / "log.jsonl")
    assert "retries 3" in out.stdout and "doorbell-ring 1" in out.stdout


def test_schema_1_logs_still_read(tmp_path):
    """Version 1 called the server's overhead server_queue_ms; its logs still give the same figures."""
    rec = synthetic_record(1, "QKV", "prefill", 0, 2.0, 1.0, 10, 10)
    rec["server_queue_ms"] = rec.pop("server_overhead_ms")
    write_log(tmp_path / "v1.jsonl", [rec], run={**RUN, "schema_version": 1})
    data = read_log(tmp_path / "v1.jsonl")
    assert len(data.records) == 1 and data.records[0]["server_overhead_ms"] == 0.05
    assert analyze(data)["calls"] == 1


def test_follow_prints_live_summaries(tmp_path):
    log = tmp_path / "live.jsonl"
    log.write_text(json.dumps(RUN) + "\n")

    def writer():
        for i in range(3):
            time.sleep(0.3)
            with open(log, "a") as f:
                f.write(json.dumps(synthetic_record(i + 1, "QKV", "decode", i + 1, 1.0, 0.5, 10, 10)) + "\n")

    t = threading.Thread(target=writer)
    t.start()
    out = StringIO()
    follow(log, interval_s=0.1, idle_exit_s=1.0, out=out)
    t.join()
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("calls 3")
    assert any(line.startswith("calls 1") for line in lines)
