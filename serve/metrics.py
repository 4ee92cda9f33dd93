"""Prometheus metrics of the server: latencies as they happen, engine state at scrape time (vLLM's names, `fireflyer:` prefix)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from serve.async_llm import AsyncLLM


class Metrics:
  """The app's Prometheus metrics, in a registry of its own; also `AsyncLLM`'s observer.

  Latencies are observed as they happen (on the engine thread; prometheus_client is
  thread-safe). Engine gauges and counters are read from `AsyncLLM`'s stats snapshot at scrape
  time, so a scrape never waits for or touches the engine.
  """

  def __init__(self):
    self.registry = CollectorRegistry()
    self._ttft = Histogram("fireflyer:time_to_first_token_seconds", "Time from request arrival to its first token.",
                           buckets=_LATENCY_BUCKETS, registry=self.registry)
    self._itl = Histogram("fireflyer:inter_token_latency_seconds", "Time between consecutive generated tokens.",
                          buckets=_LATENCY_BUCKETS, registry=self.registry)
    self._finished = Counter("fireflyer:request_success",
                             "Finished requests, by finish reason (abort: the client left; error: the engine failed).", ["finished_reason"],
                             registry=self.registry)

  def watch(self, llm: AsyncLLM) -> None:
    """Exports `llm`'s engine stats and generation throughput from now on."""
    self.registry.register(_EngineCollector(llm))

  def render(self) -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return generate_latest(self.registry), CONTENT_TYPE_LATEST

  def first_token(self, seconds: float) -> None:
    self._ttft.observe(seconds)

  def inter_token(self, seconds: float) -> None:
    self._itl.observe(seconds)

  def finished(self, reason: str) -> None:
    self._finished.labels(finished_reason=reason).inc()


_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0,
                    10.0, 20.0, 40.0, 80.0)


class _EngineCollector:
  """Yields the engine's state from `AsyncLLM.stats()` on every scrape."""

  def __init__(self, llm: AsyncLLM):
    self._llm = llm

  def collect(self):
    stats = self._llm.stats()
    yield GaugeMetricFamily("fireflyer:num_requests_running", "Requests in the running batch.", value=stats.running)
    yield GaugeMetricFamily("fireflyer:num_requests_waiting", "Requests waiting to be scheduled.", value=stats.waiting)
    yield GaugeMetricFamily("fireflyer:kv_cache_usage_perc", "Fraction of KV-cache pages in use (1 = all).",
                            value=stats.kv_cache_usage)
    yield GaugeMetricFamily("fireflyer:generation_throughput_toks_per_s",
                            "Generated tokens per second over the recent window.",
                            value=self._llm.generation_throughput())
    yield CounterMetricFamily("fireflyer:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                              value=stats.prefix_cache_query_tokens)
    yield CounterMetricFamily("fireflyer:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                              value=stats.prefix_cache_hit_tokens)
    yield CounterMetricFamily("fireflyer:prompt_tokens", "Prompt tokens processed.", value=stats.prompt_tokens)
    yield CounterMetricFamily("fireflyer:generation_tokens", "Tokens generated.", value=stats.generation_tokens)
    yield CounterMetricFamily("fireflyer:spec_decode_num_draft_tokens", "MTP draft tokens verified.",
                              value=stats.spec_draft_tokens)
    yield CounterMetricFamily("fireflyer:spec_decode_num_accepted_tokens", "MTP draft tokens accepted.",
                              value=stats.spec_accepted_tokens)
    if stats.kv_store_spills:
      spills = CounterMetricFamily("fireflyer:kv_store_spilled_pages",
                                   "Pages spilled to the KV-cache store, by outcome (written, not_stored: the store "
                                   "declined, dropped: the queue was full, failed).", labels=["outcome"])
      for outcome, count in sorted(stats.kv_store_spills.items()):
        spills.add_metric([outcome], count)
      yield spills
