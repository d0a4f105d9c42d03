"""``GET /metrics``: the numbers an operator watches to size the KV pool, the prefix cache, the session
directory and the queue of a serving engine.

Gauges (running and waiting sequences, KV pool bytes, prefix-cache checkpoints and bytes, session-directory
bytes) and the engine's own cumulative counters (prefix-cache evictions, session-directory hits) are read
from the engine's stats at scrape time, so they are never stale; the other counters and the latency
histograms are updated as the HTTP layer consumes deltas. Each server has its own registry, so several
servers (tests) can live in one process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dsv4.server.engine_client import EngineClient

# From a few ms (a tiny model on an accelerator) to minutes (a long prefill behind a busy queue).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5, 5, 10)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640, 1280)


class _EngineCollector(Collector):
    def __init__(self, engine: EngineClient) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        stats = self._engine.stats()
        prefix = stats.prefix
        for name, doc, value in (
            ("dsv4_requests_running", "Sequences the engine is running (holding a cache slot)", stats.running),
            ("dsv4_requests_waiting", "Sequences queued for admission to the engine", stats.waiting),
            (
                "dsv4_kv_cache_used_bytes",
                "KV pool bytes held by running sequences (blocks and state slots)",
                stats.kv_used_bytes,
            ),
            (
                "dsv4_kv_cache_free_bytes",
                "KV pool bytes free for new sequences (what only the prefix cache holds included: it is evicted first)",
                stats.kv_free_bytes,
            ),
            ("dsv4_prefix_cache_checkpoints", "Prefix-cache checkpoints held in memory", prefix.checkpoints),
            (
                "dsv4_prefix_cache_bytes",
                "KV pool bytes held only by the prefix cache (checkpoint slots, blocks no sequence uses)",
                prefix.cached_bytes,
            ),
            ("dsv4_session_disk_checkpoints", "Checkpoints stored in the session directory", prefix.disk_checkpoints),
            ("dsv4_session_disk_bytes", "Bytes stored in the session directory", prefix.disk_bytes),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        # the engine keeps these totals itself, so they are exposed as counters read at scrape time
        for name, doc, value in (
            (
                "dsv4_prefix_cache_evictions",
                "Prefix-cache checkpoints evicted from memory to make room",
                prefix.evictions,
            ),
            (
                "dsv4_session_disk_hits",
                "Requests whose prefix was restored from the session directory",
                prefix.disk_hits,
            ),
            (
                "dsv4_prompt_tokens_computed",
                "Prompt tokens computed (prefix-cache hits excluded)",
                prefix.computed_tokens,
            ),
        ):
            yield CounterMetricFamily(name, doc, value=value)


class ServerMetrics:
    def __init__(self, engine: EngineClient) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter("dsv4_prompt_tokens", "Prompt tokens of submitted sequences", registry=r)
        self.generation_tokens = Counter("dsv4_generation_tokens", "Tokens generated", registry=r)
        self.prefix_cache_hit_tokens = Counter(
            "dsv4_prefix_cache_hit_tokens", "Prompt tokens whose KV came from the prefix cache", registry=r
        )
        self.sequences_finished = Counter(
            "dsv4_sequences_finished", "Finished sequences by finish reason", ["finish_reason"], registry=r
        )
        self.http_requests = Counter(
            "dsv4_http_requests", "HTTP requests by route and status code", ["route", "status"], registry=r
        )
        self.time_to_first_token = Histogram(
            "dsv4_time_to_first_token_seconds",
            "From the request's arrival to its first generated token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "dsv4_time_per_output_token_seconds",
            "Between consecutive generated tokens of a sequence",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.request_latency = Histogram(
            "dsv4_request_latency_seconds",
            "From a generation request's arrival to its last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_EngineCollector(engine))

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class SequenceClock:
    """Latency bookkeeping of one sequence: time to its first token, then time per token (tokens that
    arrive together share the wait evenly)."""

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self._metrics = metrics
        self._arrival = arrival
        self._last: float | None = None

    def tokens(self, count: int) -> None:
        if count == 0:
            return
        now = time.monotonic()
        if self._last is None:
            self._metrics.time_to_first_token.observe(now - self._arrival)
        else:
            per_token = (now - self._last) / count
            for _ in range(count):
                self._metrics.time_per_output_token.observe(per_token)
        self._last = now
