"""Prometheus metrics of one server, in a registry of its own (several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..engine.client import EngineClient

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class Metrics:
    def __init__(self, engine: EngineClient):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dgemma_requests", "Finished requests by finish reason", ["finish_reason"],
                                registry=r)
        self.prompt_tokens = Counter("dgemma_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("dgemma_generation_tokens", "Generated tokens of finished requests",
                                         registry=r)
        self.denoising_steps = Counter("dgemma_denoising_steps", "Decoder passes, summed over requests", registry=r)
        Gauge("dgemma_requests_waiting", "Requests in the waiting queue", registry=r).set_function(
            lambda: engine.num_waiting)
        Gauge("dgemma_requests_running", "Requests holding a KV-cache row", registry=r).set_function(
            lambda: engine.num_running)
        Gauge("dgemma_engine_steps", "Batched denoising steps run by the engine", registry=r).set_function(
            lambda: engine.num_steps)
        if hasattr(engine, "kv_stats"):  # an engine with a paged KV cache (Engine.kv_stats)
            self._kv_gauges(engine.kv_stats)
        self.ttft = Histogram("dgemma_time_to_first_token_seconds", "Arrival to the first output token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("dgemma_e2e_request_latency_seconds", "Arrival to the end of the request",
                             buckets=LATENCY_BUCKETS, registry=r)

    def _kv_gauges(self, stats) -> None:
        r = self.registry
        for name, what, read in (
                ("kv_blocks_total", "Blocks in the paged KV cache", lambda s: s.num_blocks),
                ("kv_blocks_used", "KV blocks held by requests", lambda s: s.used_blocks),
                ("kv_blocks_peak", "The most KV blocks held by requests at once", lambda s: s.peak_used_blocks),
                ("kv_blocks_cached", "Free KV blocks holding a cached prefix (evictable)", lambda s: s.cached_blocks),
                ("kv_blocks_usage", "Fraction of the KV blocks held by requests", lambda s: s.usage),
                ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache", lambda s: s.query_tokens),
                ("prefix_cache_hits", "Prompt tokens found in the prefix cache", lambda s: s.hit_tokens),
                ("prefix_cache_hit_rate", "Fraction of prompt tokens found in the prefix cache", lambda s: s.hit_rate),
                ("kv_blocks_evicted", "Cached KV blocks evicted to make room", lambda s: s.evictions)):
            Gauge(f"dgemma_{name}", what, registry=r).set_function(lambda read=read: read(stats()))

    def observe(self, finish_reason: str, prompt_tokens: int, completion_tokens: int, denoising_steps: int,
                ttft: float | None, e2e: float) -> None:
        self.requests.labels(finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.denoising_steps.inc(denoising_steps)
        if ttft is not None:
            self.ttft.observe(ttft)
        if e2e is not None:
            self.e2e.observe(e2e)

    def render(self) -> bytes:
        return generate_latest(self.registry)
