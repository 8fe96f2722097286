"""The serving metrics (``METRICS``): per-domain requests by status, latency, tokens, model
load time, cache hits and misses, queue depth. Each is recorded twice, in the replica's own
Prometheus registry (``GET /metrics``) and through ``ray.serve.metrics`` to Ray's metrics
export (``registry_metrics``). Apart from ``serving.server``: the metrics' names and their
two sinks, not the replica that records to them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)

METRICS = {
    # key: (kind, name, description, label names)
    "requests": ("counter", "slmfactory_requests", "requests per domain, route and status",
                 ("domain", "route", "status")),
    "latency": ("histogram", "slmfactory_latency_seconds", "request latency per domain and route",
                ("domain", "route")),
    "tokens": ("counter", "slmfactory_tokens", "tokens scored or generated per domain", ("domain", "route")),
    "load": ("gauge", "slmfactory_model_load_seconds", "seconds the domain's model took to load", ("domain",)),
    "cache": ("counter", "slmfactory_model_cache", "model cache lookups per domain (hit or miss)",
              ("domain", "result")),
    "queue": ("gauge", "slmfactory_queue_depth", "requests in flight in this replica, and domain builds and "
              "fine-tunes queued or running", ("kind",)),
}
"""The serving metrics. Each is recorded twice: in the replica's own Prometheus registry
(``GET /metrics``, this replica's alone) and through ``ray.serve.metrics`` (Ray's metrics
export on each node, tagged with application, deployment and replica: one scrape of the
cluster sees every replica; Ray prefixes the names with ``ray_``)."""


class _Metric:
    """One metric in both places; ``labels(...)`` then ``inc``/``set``/``observe``, as
    ``prometheus_client``'s."""

    __slots__ = ("own", "ray", "keys", "kind")

    def __init__(self, own, ray_metric, keys: tuple[str, ...], kind: str):
        self.own, self.ray, self.keys, self.kind = own, ray_metric, keys, kind

    def labels(self, *values) -> "_Bound":
        return _Bound(self, values)


class _Bound:
    __slots__ = ("metric", "values")

    def __init__(self, metric: _Metric, values: tuple):
        self.metric, self.values = metric, values

    def _tags(self) -> dict[str, str]:
        return {k: str(v) for k, v in zip(self.metric.keys, self.values)}

    def inc(self, amount: float = 1) -> None:
        self.metric.own.labels(*self.values).inc(amount)
        if self.metric.ray is not None:
            self.metric.ray.inc(amount, tags=self._tags())

    def set(self, value: float) -> None:
        self.metric.own.labels(*self.values).set(value)
        if self.metric.ray is not None:
            self.metric.ray.set(value, tags=self._tags())

    def observe(self, value: float) -> None:
        self.metric.own.labels(*self.values).observe(value)
        if self.metric.ray is not None:
            self.metric.ray.observe(value, tags=self._tags())


def registry_metrics(cluster: bool = True):
    """The replica's metrics (``METRICS``): its own Prometheus registry (``GET /metrics``)
    and the metrics dict the replica records to; ``cluster``: through ``ray.serve.metrics``
    too (in a Serve replica)."""
    reg = CollectorRegistry()
    if cluster:
        from ray.serve import metrics as ray_metrics
    m = {}
    for key, (kind, name, doc, keys) in METRICS.items():
        if kind == "counter":
            own = Counter(name, doc, keys, registry=reg)
            theirs = ray_metrics.Counter(name, doc, tag_keys=keys) if cluster else None
        elif kind == "gauge":
            own = Gauge(name, doc, keys, registry=reg)
            theirs = ray_metrics.Gauge(name, doc, tag_keys=keys) if cluster else None
        else:
            own = Histogram(name, doc, keys, registry=reg, buckets=LATENCY_BUCKETS)
            theirs = ray_metrics.Histogram(name, doc, boundaries=list(LATENCY_BUCKETS), tag_keys=keys) \
                if cluster else None
        m[key] = _Metric(own, theirs, keys, kind)
    return reg, m
