"""The benchmarks run end to end on a tiny model, so they cannot rot. Timings are not asserted."""
import statistics

from bench import rpc_log_overhead, rpc_round_trip
from teegpu.options import rpcs_per_forward


def test_rpc_round_trip_bench_runs(tiny_model_dir):
    res = rpc_round_trip.measure(calls=5, transport="tcp", model=str(tiny_model_dir))
    assert set(res["median"]) == {"QKV", "O", "GATE_UP", "DOWN", "LM_HEAD"}
    assert all(r["round_trip_ms"] >= r["server_compute_ms"] > 0 for r in res["median"].values())


def test_rpc_log_overhead_bench_runs(tiny_model_dir):
    res = rpc_log_overhead.measure(tokens=4, repeats=2, model=str(tiny_model_dir))
    assert set(res["decode_ms_per_token"]) == {"off", "on"}
    times = res["times_ms_per_token"]
    assert len(times["off"]) == len(times["on"]) == 2 and all(t > 0 for t in times["off"] + times["on"])
    pairs = [on / off for on, off in zip(times["on"], times["off"])]
    assert res["median_ratio_on_off"] == statistics.median(pairs)  # the ratio is of the pairs measured


def test_side_by_side_bench_runs_every_column(tiny_model_dir):
    from bench import suite

    res = suite.measure(model=str(tiny_model_dir), tokens=3, prefill=(8, 16), repeats=1,
                        dtypes=("float32", "bfloat16"), planes=("doorbell",),
                        transfer_mb=0.5,
                        progress=False)
    cols = res["columns"]
    splits = [f"split doorbell {d}" for d in ("float32", "bfloat16")]
    private = ["split verify doorbell", "otp doorbell", "otp verify doorbell"]
    assert set(cols) == {"hf float32", "hf bfloat16", "tee-only float32", "tee-only bfloat16", "limits", *splits,
                         *private}
    for name in private:
        assert cols[name]["rpcs_per_token"]["median"] == 13 and cols[name]["decode_ms_per_token"]["min"] > 0
    assert cols["otp doorbell"]["offline_ms_per_token"]["min"] > 0
    for name in splits:
        c = cols[name]
        assert c["rpcs_per_token"]["median"] == res["expected_rpcs_per_token"] == rpcs_per_forward(3)
        assert c["bytes_per_token"]["median"] > 0
        assert all(c[k]["min"] > 0 for k in ("prefill_8_ms", "prefill_16_ms", "decode_ms_per_token",
                                             "rpc_overhead_us", "transfer_ms", "server_ms_per_token",
                                             "transfer_ms_per_token"))
        assert 0 < c["trusted_ms_per_token"]["min"] < c["decode_ms_per_token"]["min"]
    assert cols["limits"]["memcpy_ms"]["min"] > 0 and cols["limits"]["rpc_overhead_us"]["min"] > 0
    assert 0 < cols["limits"]["spin_floor_us"]["min"] < cols["limits"]["rpc_overhead_us"]["min"]
    table = suite.format_table(res)
    assert all(name in table for name in cols) and "x memcpy" in table
    lines = suite.targets(res)
    assert sum(": decode " in line for line in lines) == len(splits) + 1  # and the cost of plain --verify
    assert sum("online decode" in line for line in lines) == 2


def test_serving_bench_runs_through_the_api(tiny_model_dir):
    from bench import serve

    res = serve.measure([1, 2], tokens=4, rounds=1, model=str(tiny_model_dir))
    one, two = res["levels"][1], res["levels"][2]
    assert one["tokens"] == 4 and two["tokens"] == 8  # ignore_eos: every stream has exactly its tokens
    assert one["ratio_tokens_per_s"] == 1.0 and two["ratio_tokens_per_s"] == two["tokens_per_s"] / one["tokens_per_s"]
    assert "target" in serve.format_table(res)


def test_seed_workload_bench_runs_every_mode(tiny_model_dir):
    """`python -m bench seed` on the tiny model: each mode in its own process, RSS and splits reported (its
    otp mode differs from otp+pad-server only in where the pads are made)."""
    import argparse

    from bench import seed

    args = argparse.Namespace(model=str(tiny_model_dir), prefill=24, tokens=2, device="cpu", threads=None,
                              modes=["float32", "otp+pad-server"], tensor_parallel=[1])
    res = seed.measure(args)
    args.modes, args.tensor_parallel = ["float32"], [2]
    modes = res["modes"] | {name: m for name, m in seed.measure(args)["modes"].items() if "tp2" in name}
    assert set(modes) == {"hf float32", "split float32", "split otp+pad-server", "split float32 tp2"}
    m = modes["split float32 tp2"]  # each rank's memory, from its own process
    assert len(m["peak_rss_ranks"]) == 2 and all(rss > 0 for rss in m["peak_rss_ranks"])
    assert 0 < m["weight_bytes_ranks"][1] <= m["weight_bytes_ranks"][0]
    for name in ("split float32", "split otp+pad-server", "split float32 tp2"):
        m = modes[name]
        assert m["rpcs_per_forward"] == res["expected_rpcs"] == rpcs_per_forward(3)
        assert m["peak_rss_trusted"] > 0 and m["peak_rss_server"] > 0 and m["prefill_ms"] > 0
        assert m["prefill_cpu_ms"] > 0 and m["decode_cpu_ms_per_token"] > 0
        assert abs(sum(m["split_ms"].values()) - m["prefill_ms"]) < 1e-6 * m["prefill_ms"] + 1e-3
    assert modes["split otp+pad-server"]["bytes_per_forward"] > modes["split float32"]["bytes_per_forward"]  # int64
    assert modes["split otp+pad-server"]["peak_rss_pad_server"] > 0
    table = seed.format_table(res)
    assert "split otp+pad-server" in table and "CPU time" in table and f"expected RPCs here {rpcs_per_forward(3)}" in table


def test_contention_bench_measures_both_loads(tiny_model_dir):
    from bench import contention

    res = contention.measure(str(tiny_model_dir), "float32", tokens=3, repeats=1)
    assert set(res["figures"]) == {"idle", "one core busy"}
    for f in res["figures"].values():
        assert f["split"] > 0 and f["in-process"] > 0 and f["ratio"] == f["split"] / f["in-process"]
    assert res["kernels"]["isa"]


def test_chat_bench_compares_with_and_without_the_prefix_cache(tiny_model_dir):
    from bench import chat

    res = chat.conversation("plain", turns=2, chars=300, answer=2, model=str(tiny_model_dir))
    first, second = res["turns"]
    assert first["cached_cached_tokens"] == 0 and second["cached_cached_tokens"] > 0  # turn 2 re-sends turn 1
    assert first["uncached_cached_tokens"] == second["uncached_cached_tokens"] == 0  # --no-prefix-cache
    assert second["prompt_tokens"] > first["prompt_tokens"] and res["last_turn_ratio"] == second["ratio"]
    assert "target <= 0.25x" in chat.format_table([res])


def test_speculative_bench_runs_every_case(tiny_model_dir):
    from bench import speculative

    res = speculative.measure(str(tiny_model_dir), tokens=8, repeats=1, k=2, text_chars=200)
    assert set(res["cases"]) == {"grounded", "chat", "batch of 8"}  # each asserted the same greedy tokens
    for row in res["cases"].values():
        assert row["plain_tokens_per_s"] > 0 and row["ratio"] == row["ngram_tokens_per_s"] / row["plain_tokens_per_s"]
    assert "tokens per step" in speculative.format_table(res)


def test_proxy_bench_compares_direct_and_proxied_chat(tiny_model_dir):
    from bench import proxy

    res = proxy.measure([2], requests=1, tokens=4, model=str(tiny_model_dir))  # asserts the same answers
    row = res["levels"][2]
    assert row["direct_ttft_ms"] > 0 and row["ratio_total"] == row["proxy_total_ms"] / row["direct_total_ms"]
    assert "TTFT proxy ms" in proxy.format_table(res)


def test_ring_bench_runs_every_kernel_the_host_has(tiny_model_dir):
    from bench import ring
    from teegpu.model.products import ring_kernel

    res = ring.measure(rows=[1, 3], repeats=2, model=str(tiny_model_dir))
    assert list(res["kernels"]) == ["float64"] + (["int8"] if ring_kernel() == "int8" else [])
    for by_rows in res["kernels"].values():
        assert list(by_rows) == [1, 3]
        assert all(r["pass_ms"] > 0 and r["lm_head_ms"] > 0 and r["faults_per_pass"] >= 0 for r in by_rows.values())
    assert "| float64 | 3 |" in ring.format_table(res)
