"""Prometheus metrics of the API, in a registry of its own (GET /metrics)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ApiMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("teegpu_requests", "HTTP requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("teegpu_prompt_tokens", "prompt tokens of accepted requests", registry=r)
        self.completion_tokens = Counter("teegpu_completion_tokens", "tokens generated", registry=r)
        self.running = Gauge("teegpu_sequences_running", "sequences in the batch", registry=r)
        self.waiting = Gauge("teegpu_sequences_waiting", "requests waiting for a place", registry=r)
        self.ttft = Histogram("teegpu_time_to_first_token_seconds", "request received to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("teegpu_inter_token_latency_seconds", "between two streamed deltas of a request",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.step = Histogram("teegpu_step_seconds", "one batched step (4L+1 RPCs)", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.step_rows = Histogram("teegpu_step_rows", "rows packed into one step",
                                   buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.rpc = Histogram("teegpu_rpc_seconds_per_step", "time in RPCs during one step", buckets=LATENCY_BUCKETS,
                             registry=r)
        self.server_compute = Histogram("teegpu_server_compute_seconds_per_step",
                                        "the GPU server's compute during one step", buckets=LATENCY_BUCKETS,
                                        registry=r)
        self.pads = Gauge("teegpu_pads", "otp: 1 for where the pads' products come from now (server, local, "
                          "local-fallback: every pad server is down)", ["source"], registry=r)
        self.pad_rows = Gauge("teegpu_pad_rows", "otp: pad rows made, by where their products were computed",
                              ["source"], registry=r)
        self.pad_outages = Gauge("teegpu_pad_server_outages", "otp: times every pad server was found down",
                                 registry=r)
        self.prefix_tokens = Gauge("teegpu_prefix_cache_tokens", "prompt tokens looked up in the prefix cache, "
                                   "and those found", ["kind"], registry=r)
        self.prefix_hit_rate = Gauge("teegpu_prefix_cache_hit_rate", "prompt tokens found / looked up", registry=r)
        self.prefix_bytes = Gauge("teegpu_prefix_cache_bytes", "KV bytes the prefix cache holds (in the KV budget)",
                                  registry=r)
        self.speculation = Gauge("teegpu_speculative_tokens", "speculative decoding: tokens drafted, and those "
                                 "the model kept", ["kind"], registry=r)
        self.acceptance = Gauge("teegpu_speculative_acceptance_rate", "drafted tokens kept / drafted", registry=r)
        self.tokens_per_step = Gauge("teegpu_speculative_tokens_per_step", "tokens a sequence's decode step gave "
                                     "when it carried drafts", registry=r)
        self.integrity_failures = Counter("teegpu_integrity_failures", "products that failed verification",
                                          registry=r)

    def render(self, running: int, waiting: int, pool: dict | None = None, prefix=None,
               speculation: dict | None = None) -> bytes:
        """The exposition; `pool`: the mask pool's stats (otp); `prefix`: the prefix cache's PrefixStats;
        `speculation`: SpeculationStats.as_dict()."""
        if speculation is not None:
            self.speculation.labels("drafted").set(speculation["drafted"])
            self.speculation.labels("accepted").set(speculation["accepted"])
            self.acceptance.set(speculation["acceptance_rate"])
            self.tokens_per_step.set(speculation["tokens_per_step"])
        self.running.set(running)
        self.waiting.set(waiting)
        if prefix is not None:
            self.prefix_tokens.labels("queried").set(prefix.queried_tokens)
            self.prefix_tokens.labels("hit").set(prefix.hit_tokens)
            self.prefix_hit_rate.set(prefix.hit_tokens / max(prefix.queried_tokens, 1))
            self.prefix_bytes.set(prefix.bytes)
        if pool is not None:
            for source in ("server", "local", "local-fallback"):
                self.pads.labels(source).set(1 if pool["pads"] == source else 0)
            self.pad_rows.labels("server").set(pool["server_rows"])
            self.pad_rows.labels("local").set(pool["rows_filled"] if pool["pads"] == "local" else pool["fallback_rows"])
            self.pad_outages.set(pool["pad_outages"])
        return generate_latest(self.registry)
