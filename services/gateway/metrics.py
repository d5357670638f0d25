"""Prometheus metrics of the gateway and its engine, served as text over HTTP."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class GatewayMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("longbow_requests", "RPCs by method and status code", ["method", "code"], registry=r)
        self.ttft = Histogram("longbow_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("longbow_time_per_output_token_seconds", "Time between output tokens", buckets=_LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("longbow_inflight_requests", "Generation calls in progress", registry=r)
        self.queue_depth = Gauge("longbow_queue_depth", "Requests waiting in the engine", registry=r)
        self.kv_usage = Gauge("longbow_kv_cache_usage_ratio", "Fraction of KV blocks in use", registry=r)
        self.preemptions = Gauge("longbow_preemptions", "Preemptions since start", registry=r)
        self.tokens = Counter("longbow_generated_tokens", "Generated tokens", registry=r)
        shard = ["shard"]
        self.shard_steps = Gauge("longbow_shard_steps", "Steps run by each shard", shard, registry=r)
        self.shard_step_seconds = Gauge("longbow_shard_step_seconds", "Time in steps per shard", shard, registry=r)
        self.shard_bytes = Gauge("longbow_shard_bytes_sent", "Attention bytes sent per shard", shard, registry=r)
        self.shard_rss = Gauge("longbow_shard_peak_rss_bytes", "Peak resident memory per shard", shard, registry=r)
        self.shard_schedules = Gauge("longbow_shard_schedule_choices", "Attention schedule choices per shard",
                                     ["shard", "schedule"], registry=r)

        self.sessions_open = Gauge("longbow_sessions_open", "Edit sessions holding KV", registry=r)
        self.session_reencodes = Counter("longbow_session_reencodes", "Drift re-encodes of edit sessions", registry=r)
        self.session_update_seconds = Histogram("longbow_session_update_seconds", "KV update time of one ApplyEdits",
                                                buckets=_LATENCY_BUCKETS, registry=r)

    def record_status(self, method: str, code: grpc.StatusCode) -> None:
        self.requests.labels(method=method, code=code.name).inc()

    def record_engine(self, stats: dict) -> None:
        self.queue_depth.set(stats["waiting"])
        self.kv_usage.set(stats["kv_blocks_used"] / max(1, stats["kv_blocks_total"]))
        self.preemptions.set(stats["preemptions"])
        for shard in stats.get("executor", {}).get("shards", []):
            rank = str(shard["rank"])
            self.shard_steps.labels(rank).set(shard["steps"])
            self.shard_step_seconds.labels(rank).set(shard["step_seconds"])
            self.shard_bytes.labels(rank).set(shard["bytes_sent"])
            self.shard_rss.labels(rank).set(shard["peak_rss_bytes"])
            for schedule, count in shard["schedules"].items():
                self.shard_schedules.labels(rank, schedule).set(count)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port
