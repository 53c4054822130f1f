"""Prometheus metrics of the server, under the names DESIGN.md defines.

Engine-side values (KV, queue, policy counters) are read at scrape time from the
``EngineSnapshot`` the engine thread publishes, through a custom collector: the scrape
never touches the engine itself. Latency histograms are observed by the engine thread
when a request finishes (prometheus_client's metrics are thread-safe). Each app gets its
own ``CollectorRegistry`` so several servers in one process (tests) do not collide.

Next to the ``odma_*`` names, the vLLM names that existing Grafana dashboards and
autoscalers read are exported where the meaning is the same (``VLLM_NAMES``; all carry a
``model_name`` label as vLLM's do). ``vllm:kv_cache_usage_perc`` is the share of KV capacity
held by the policy (reserved slots, the analogue of vLLM's allocated blocks), as a 0-1
fraction like vLLM's.
"""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from odma_mlu.server.async_engine import EngineSnapshot

PREFIX = "odma"
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

VLLM_NAMES: dict[str, str] = {
    "vllm:num_requests_running": "odma_requests_running",
    "vllm:num_requests_waiting": "odma_requests_waiting",
    "vllm:kv_cache_usage_perc": "odma_kv_reserved_tokens / odma_kv_capacity_tokens",
    "vllm:num_preemptions_total": "odma_preemptions_total",
    "vllm:prompt_tokens_total": "odma_prompt_tokens_total",
    "vllm:generation_tokens_total": "odma_generation_tokens_total",
    "vllm:request_success_total": "odma_requests_total (finished_reason stop/length)",
    "vllm:time_to_first_token_seconds": "odma_time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds": "(per token gap; odma has the per-request mean)",
    "vllm:time_per_output_token_seconds": "vllm:inter_token_latency_seconds (older vLLM name)",
    "vllm:e2e_request_latency_seconds": "odma_e2e_request_latency_seconds",
}
"""vLLM metric name -> the odma metric it mirrors (docs/serving.md)."""


class _EngineCollector(Collector):
    def __init__(self, snapshot: Callable[[], EngineSnapshot], policy: str, model_name: str = "") -> None:
        self._snapshot = snapshot
        self._policy = policy
        self._model = model_name

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        yield gauge("requests_running", "Requests holding KV and decoding", s.running)
        yield gauge("requests_waiting", "Requests queued in the engine for KV", s.waiting)
        yield gauge("kv_capacity_tokens", "KV cache capacity (tokens)", s.capacity_tokens)
        yield gauge("kv_live_tokens", "KV tokens written by running requests, now", s.live_kv_tokens)
        yield gauge("kv_reserved_tokens", "KV tokens reserved by the policy, now", s.reserved_tokens)
        yield gauge("kv_live_reservations", "Requests holding a KV reservation, now", s.live_requests)
        yield gauge("kv_utilization", "Live KV tokens / KV capacity, now", s.kv_utilization_now)
        yield gauge("kv_utilization_saturated_mean",
                    "DESIGN kv_utilization: mean live/capacity over steps with a request waiting",
                    s.sum_util_saturated / s.saturated_steps if s.saturated_steps else 0.0)
        yield gauge("kv_utilization_all_mean", "DESIGN kv_utilization_all: mean live/capacity over all steps",
                    s.sum_util_all / s.steps if s.steps else 0.0)
        yield gauge("reservation_efficiency", "Sum of live KV tokens / sum of reserved tokens, over steps",
                    s.reservation_efficiency)
        yield gauge("safety_pool_tokens", "ODMA safety pool capacity (tokens)", s.safety_pool_tokens)
        yield gauge("safety_pool_used_tokens", "ODMA safety pool tokens in use", s.safety_pool_used_tokens)
        yield gauge("hold_ahead_tokens", "ODMA room held ahead of the last growing request (the economic run "
                    "length where a device profile prices runs)", s.hold_ahead_tokens)
        yield counter("engine_steps", "Engine steps run", s.steps)
        yield counter("generation_tokens", "Tokens generated", s.generated_tokens)
        yield counter("overflows", "Requests that outgrew their first reservation", s.overflows)
        yield counter("migrations", "KV copies: a request moved into one run, or another's run moved out of "
                      "its way", s.migrations)
        yield counter("migrated_tokens", "KV tokens copied by migrations", s.migrated_tokens)
        yield counter("moved_runs", "Runs ODMA moved out of a growing request's way (where the device "
                      "profile says that pays)", s.moved_runs)
        yield counter("preemptions", "Requests preempted (KV swapped to host memory, or dropped and recomputed)",
                      s.preemptions)
        yield counter("swapped_preemptions", "Preemptions that swapped the KV to host memory instead of recomputing",
                      s.swapped_preemptions)
        yield counter("swapped_tokens", "KV arena slots (tokens, and a ring's rows) moved to or from host memory by swapped preemptions",
                      s.swapped_tokens)
        yield gauge("swap_used_tokens", "KV tokens of preempted requests held in host memory, now", s.swap_used_tokens)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache", s.prefix_cache_query_tokens)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache (not prefilled)",
                      s.prefix_cache_hit_tokens)
        yield gauge("prefix_cache_blocks", "Cached prefix blocks, now", s.prefix_cache_blocks)
        edges = GaugeMetricFamily(f"{PREFIX}_bucket_boundary_tokens",
                                  "Current KV bucket boundaries of the policy (tokens)", labels=["index", "policy"])
        for i, e in enumerate(s.bucket_edges_tokens):
            edges.add_metric([str(i), self._policy], float(e))
        yield edges

        def vgauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([self._model], value)
            return g

        yield vgauge("vllm:num_requests_running", "Number of requests in model execution batches.", s.running)
        yield vgauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", s.waiting)
        yield vgauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                     s.reserved_tokens / s.capacity_tokens if s.capacity_tokens else 0.0)
        pre = CounterMetricFamily("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                                  labels=["model_name"])
        pre.add_metric([self._model], s.preemptions)
        yield pre
        gen = CounterMetricFamily("vllm:generation_tokens", "Number of generation tokens processed.",
                                  labels=["model_name"])
        gen.add_metric([self._model], s.generated_tokens)
        yield gen
        for vname, doc, value in (("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried tokens.",
                                   s.prefix_cache_query_tokens),
                                  ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.",
                                   s.prefix_cache_hit_tokens)):
            c = CounterMetricFamily(vname, doc, labels=["model_name"])
            c.add_metric([self._model], value)
            yield c


class ServerMetrics:
    """The registry of one server: engine collector, request counters, latency histograms."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot], policy: str, model_name: str = "") -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(snapshot, policy, model_name))
        r = self.registry
        self.model_name = model_name
        lbl = ["model_name"]
        self.v_prompt = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", lbl, registry=r)
        self.v_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                 lbl + ["finished_reason"], registry=r)
        self.v_ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                                lbl, buckets=TTFT_BUCKETS, registry=r)
        self.v_itl = Histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                               lbl, buckets=ITL_BUCKETS, registry=r)
        self.v_tpot = Histogram("vllm:time_per_output_token_seconds",
                                "Histogram of time per output token in seconds (older name of inter-token latency).",
                                lbl, buckets=ITL_BUCKETS, registry=r)
        self.v_e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                               lbl, buckets=E2E_BUCKETS, registry=r)
        self.requests = Counter(f"{PREFIX}_requests", "Finished requests by finish reason", ["finish_reason"],
                                registry=r)
        self.http_errors = Counter(f"{PREFIX}_http_errors", "Requests answered with an error, by status",
                                   ["status"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram(f"{PREFIX}_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request", buckets=TPOT_BUCKETS,
                              registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=E2E_BUCKETS, registry=r)

    def on_finish(self, reason: str | None, e2e_s: float, ttft_s: float | None, tpot_s: float | None,
                  tokens: int) -> None:
        """Called by the engine thread when a request ends (``reason`` "abort": client gone)."""
        self.requests.labels(reason or "unknown").inc()
        if reason in ("abort", "error"):
            return
        m = self.model_name
        self.v_success.labels(m, reason or "unknown").inc()
        self.e2e.observe(e2e_s)
        self.v_e2e.labels(m).observe(e2e_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
            self.v_ttft.labels(m).observe(ttft_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)

    def on_token_gap(self, gap_s: float) -> None:
        """Called by the engine thread for each token after a request's first."""
        self.v_itl.labels(self.model_name).observe(gap_s)
        self.v_tpot.labels(self.model_name).observe(gap_s)

    def on_prompt(self, tokens: int) -> None:
        self.prompt_tokens.inc(tokens)
        self.v_prompt.labels(self.model_name).inc(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def parse_metrics(text: str) -> dict[str, float]:
    """``name{labels} value`` lines to a dict (tests and tools/load_test.py read /metrics)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out
