"""Prometheus metrics shared by both front doors, defined once.

Both build them on ``prometheus_client``: the HTTP gateway inside each BentoML worker, after BentoML has set the
multiprocess directory, so BentoML's own ``/metrics`` exports them (``bentoml.metrics`` is deprecated in 1.4); the
gRPC server serves them on its metrics port. Names
and labels are the same, so one dashboard reads both (label ``frontend`` = ``http`` or ``grpc``).
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import ServingError

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, prom, frontend: str, registry=None) -> None:
        """``prom`` is the ``prometheus_client`` module (or anything with its Counter/Histogram/Gauge API)."""
        self.frontend = frontend
        kw = {"registry": registry} if registry is not None else {}
        self.requests = prom.Counter(
            "braintumor_requests_total", "Requests by endpoint/method and outcome status",
            ["frontend", "endpoint", "status"], **kw)
        self.latency = prom.Histogram(
            "braintumor_request_seconds", "Request latency by endpoint/method",
            ["frontend", "endpoint"], buckets=LATENCY_BUCKETS, **kw)
        self.explain_latency = prom.Histogram(
            "braintumor_explanation_seconds", "Explanation latency by method (cache hits included)",
            ["frontend", "method", "cached"], buckets=LATENCY_BUCKETS, **kw)
        self.predictions = prom.Counter(
            "braintumor_predictions_total", "Predicted class per analysed image", ["frontend", "label"], **kw)
        self.referrals = prom.Counter(
            "braintumor_referrals_total", "Analysed images flagged for human review (refer = true)",
            ["frontend"], **kw)
        self.analysed = prom.Counter(
            "braintumor_images_total", "Analysed images (denominator of the refer rate)", ["frontend"], **kw)
        self.errors = prom.Counter(
            "braintumor_errors_total", "Pipeline failures by kind (triton unavailable, bad input, ...)",
            ["frontend", "kind"], **kw)

    def observe_request(self, endpoint: str, status: str, seconds: float) -> None:
        self.requests.labels(self.frontend, endpoint, status).inc()
        self.latency.labels(self.frontend, endpoint).observe(seconds)

    def observe_error(self, error: ServingError) -> None:
        self.errors.labels(self.frontend, error.kind).inc()

    def observe_results(self, results: Sequence) -> None:
        for result in results:
            if isinstance(result, ServingError):
                self.observe_error(result)
                continue
            self.analysed.labels(self.frontend).inc()
            self.predictions.labels(self.frontend, result.label).inc()
            if result.refer:
                self.referrals.labels(self.frontend).inc()

    def observe_explanation(self, method: str, seconds: float, cached: bool) -> None:
        self.explain_latency.labels(self.frontend, method, str(bool(cached)).lower()).observe(seconds)
