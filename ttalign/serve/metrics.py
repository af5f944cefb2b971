"""Prometheus metrics of the server, on a registry of its own (one per app)."""

from __future__ import annotations


class ServerMetrics:
    """Queue depth, request latency, images, denoiser evaluations, rewards, merged batches, pipeline calls, and
    refused, cancelled and failed requests by reason."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu seconds, ...
        self.queue_depth = Gauge("ttalign_queue_depth", "Requests waiting for the pipeline.", registry=self.registry)
        self.latency = Histogram(
            "ttalign_request_latency_seconds",
            "Time from a request's arrival to its answer.",
            ["status"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, float("inf")),
            registry=self.registry,
        )
        self.requests = Counter("ttalign_requests", "Answered requests.", ["status"], registry=self.registry)
        self.rejected = Counter(
            "ttalign_rejected_requests",
            "Requests refused before they were queued (invalid, "
            "over_budget, unauthorized, queue_full, invalid_host, forbidden_origin, "
            "unsupported_media_type, body_too_large, worker_dead).",
            ["reason"],
            registry=self.registry,
        )
        self.cancelled = Counter(
            "ttalign_cancelled_requests",
            "Requests dropped from the queue or stopped while running (disconnected, timeout).",
            ["reason"],
            registry=self.registry,
        )
        self.failed = Counter(
            "ttalign_failed_requests",
            "Accepted requests that failed, by error code "
            "(method_failed, invalid_value, out_of_memory, worker_dead, ...).",
            ["reason"],
            registry=self.registry,
        )
        self.calls = Counter(
            "ttalign_pipeline_calls",
            "Pipeline calls by outcome (ok, failed, out_of_memory, cancelled).",
            ["outcome"],
            registry=self.registry,
        )
        self.cached_methods = Gauge(
            "ttalign_cached_methods",
            "Method objects built for requests' settings and kept (one per canonical setting).",
            registry=self.registry,
        )
        self.images = Counter("ttalign_images", "Images returned.", registry=self.registry)
        self.nfe = Counter("ttalign_nfe", "Denoiser evaluations (per latent) spent.", registry=self.registry)
        self.reward = Histogram(
            "ttalign_request_reward",
            "Mean reward of a request's images, when a method scored them.",
            buckets=(-10, -1, 0, 0.25, 0.5, 0.75, 1, 2, 10, 100, float("inf")),
            registry=self.registry,
        )
        self.batch_requests = Histogram(
            "ttalign_batch_requests",
            "Requests merged into one pipeline call.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64, float("inf")),
            registry=self.registry,
        )
        self.batch_images = Histogram(
            "ttalign_batch_images",
            "Images per pipeline call.",
            buckets=(1, 2, 4, 8, 16, 32, 64, float("inf")),
            registry=self.registry,
        )

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
