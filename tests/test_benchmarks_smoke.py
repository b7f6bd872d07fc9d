"""The benchmarks run end to end on a tiny model, so they cannot rot. Timings are not asserted."""
from bench import rpc_log_overhead, rpc_round_trip


def test_rpc_round_trip_bench_runs(tiny_model_dir):
    res = rpc_round_trip.measure(calls=5, transport="tcp", model=str(tiny_model_dir))
    assert set(res["median"]) == {"QKV", "O", "GATE_UP", "DOWN", "LM_HEAD"}
    assert all(r["round_trip_ms"] >= r["server_compute_ms"] > 0 for r in res["median"].values())


def test_rpc_log_overhead_bench_runs(tiny_model_dir):
    res = rpc_log_overhead.measure(tokens=4, repeats=2, model=str(tiny_model_dir))
    assert set(res["decode_ms_per_token"]) == {"off", "on"}
    assert res["median_ratio_on_off"] > 0
