"""Prometheus metrics for the engine, on a registry of its own (no process-wide globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_TOKEN_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0)


class Metrics:
    """Counters and histograms the worker updates; `render()` is the /metrics body."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.images_encoded = Counter("vlchat_images_encoded", "Vision-encoder runs, counted per image.", registry=r)
        self.prompt_tokens = Counter("vlchat_prompt_tokens", "Prompt tokens of all requests.", registry=r)
        self.cached_prompt_tokens = Counter(
            "vlchat_cached_prompt_tokens", "Prompt tokens reused from the prefix cache (prefix-cache hits).",
            registry=r,
        )
        self.generated_tokens = Counter("vlchat_generated_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("vlchat_requests", "Finished requests by outcome.", ["outcome"], registry=r)
        self.waiting = Gauge("vlchat_requests_waiting", "Requests waiting to join the running batch.", registry=r)
        self.running = Gauge("vlchat_requests_running", "Requests in the running batch.", registry=r)
        self.batch_tokens = Histogram(
            "vlchat_batch_tokens", "Tokens in each step's packed batch.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192), registry=r,
        )
        self.kv_blocks_used = Gauge("vlchat_kv_blocks_used", "KV blocks held by running requests.", registry=r)
        self.kv_blocks_total = Gauge("vlchat_kv_blocks_total", "KV blocks in the pool.", registry=r)
        self.kv_blocks_cached = Gauge(
            "vlchat_kv_blocks_cached", "KV blocks kept for prefix reuse with no request using them.", registry=r
        )
        self.preemptions = Counter(
            "vlchat_preemptions", "Requests preempted for lack of KV blocks (recomputed later).", registry=r
        )
        self.ttft = Histogram(
            "vlchat_time_to_first_token_seconds", "From submission to the first token.", buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "vlchat_queue_wait_seconds", "Time a request waited in the queue.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.token_latency = Histogram(
            "vlchat_time_per_output_token_seconds", "Decode time per generated token.", buckets=_TOKEN_BUCKETS,
            registry=r,
        )

        self.decode_rate = Histogram(
            "vlchat_decode_tokens_per_second", "Decode speed of each finished request (tokens after the first).",
            buckets=(5, 10, 20, 40, 60, 80, 100, 120, 150, 200, 300), registry=r,
        )

    def render(self) -> bytes:
        """Prometheus text exposition."""
        return generate_latest(self.registry)

    def finished(self, outcome: str, prompt: int, cached: int, generated: int, decode_seconds: float) -> None:
        """One request ended (`outcome`: its finish reason, or 'error'): its tokens and decode rate."""
        self.requests.labels(outcome).inc()
        self.prompt_tokens.inc(prompt)
        self.cached_prompt_tokens.inc(max(cached, 0))
        self.generated_tokens.inc(generated)
        if generated > 1 and decode_seconds > 0:
            self.decode_rate.observe((generated - 1) / decode_seconds)
