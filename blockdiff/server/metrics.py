"""Prometheus metrics, named as vLLM names them (with a `blockdiff:` prefix) plus NFE and
TPF per mode. The engine thread calls `observe` after every update it delivers.

- time_to_first_token_seconds: arrival -> first committed token (queue time included).
- inter_token_latency_seconds: time between two updates of a request that commit tokens;
  a block commits several tokens at once, so this is per commit, not per token.
- spec_decode_*: counted when a request finishes; mean acceptance length =
  1 + accepted_tokens / drafts (SGLang's avg_spec_accept_length).
"""
from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from blockdiff.decoding.metrics import Metrics
from blockdiff.engine.request import Request, Update

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)
TPF_BUCKETS = (0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 32)


class ServerMetrics:
    def __init__(self, model_name: str, engine):
        self.registry = CollectorRegistry()  # one per app: tests start several servers
        self.model_name = model_name
        r, m = self.registry, ["model_name"]
        mm = ["model_name", "mode"]

        def hist(name, doc, buckets=LATENCY_BUCKETS):
            return Histogram(f"blockdiff:{name}", doc, mm, buckets=buckets, registry=r)

        self.ttft = hist("time_to_first_token_seconds", "Time to first token")
        self.itl = hist("inter_token_latency_seconds", "Time between commits of one request")
        self.e2e = hist("e2e_request_latency_seconds", "End-to-end request latency")
        self.queue = hist("request_queue_time_seconds", "Time spent waiting for a slot")
        self.tpf = hist("tokens_per_forward", "Generated tokens per decode forward, per request", TPF_BUCKETS)
        self.prompt_tokens = Counter("blockdiff:prompt_tokens", "Prefill tokens", mm, registry=r)
        self.generation_tokens = Counter("blockdiff:generation_tokens", "Generated tokens", mm, registry=r)
        self.nfe = Counter("blockdiff:nfe", "Decode forward passes (NFE), prefill excluded", mm, registry=r)
        self.drafts = Counter("blockdiff:spec_decode_num_drafts", "Verification steps", mm, registry=r)
        self.draft_tokens = Counter("blockdiff:spec_decode_num_draft_tokens", "Draft tokens", mm, registry=r)
        self.accepted = Counter("blockdiff:spec_decode_num_accepted_tokens", "Accepted draft tokens", mm, registry=r)
        self.success = Counter("blockdiff:request_success", "Finished requests", m + ["finished_reason"], registry=r)
        running = Gauge("blockdiff:num_requests_running", "Requests being decoded", m, registry=r)
        waiting = Gauge("blockdiff:num_requests_waiting", "Requests waiting for a slot", m, registry=r)
        running.labels(model_name).set_function(lambda: engine.num_running)
        waiting.labels(model_name).set_function(lambda: engine.num_waiting)
        self._lock = threading.Lock()
        self.total_drafts = 0
        self.total_accepted = 0
        self.started = time.time()
        self.finished_requests = 0
        self.generated_tokens = 0

    def observe(self, request: Request, update: Update) -> None:
        labels = (self.model_name, request.mode)
        if update.new_tokens:
            self.generation_tokens.labels(*labels).inc(update.new_tokens)
            if update.since_previous is None:  # the first tokens of this request
                self.ttft.labels(*labels).observe(update.time - request.arrival)
            else:
                self.itl.labels(*labels).observe(update.since_previous)
        if update.finish_reason is None:
            return
        self.success.labels(self.model_name, update.finish_reason).inc()
        self.e2e.labels(*labels).observe(update.time - request.arrival)
        if request.scheduled is not None:
            self.queue.labels(*labels).observe(request.scheduled - request.arrival)
        m = update.metrics or Metrics()
        self.prompt_tokens.labels(*labels).inc(m.prompt_tokens)
        self.nfe.labels(*labels).inc(m.nfe)
        if m.nfe:
            self.tpf.labels(*labels).observe(m.tpf)
        if m.verify_steps:
            self.drafts.labels(*labels).inc(m.verify_steps)
            self.draft_tokens.labels(*labels).inc(m.drafted_tokens)
            self.accepted.labels(*labels).inc(m.accepted_tokens)
        with self._lock:
            self.total_drafts += m.verify_steps
            self.total_accepted += m.accepted_tokens if m.verify_steps else 0
            self.finished_requests += 1
            self.generated_tokens += m.generated_tokens

    @property
    def avg_spec_accept_length(self) -> float | None:
        with self._lock:
            return 1.0 + self.total_accepted / self.total_drafts if self.total_drafts else None
