"""The Grafana dashboard and Prometheus config read the metrics serving really exports (names cannot drift)."""

import json
import re
from pathlib import Path

import pytest

prometheus_client = pytest.importorskip("prometheus_client")

from braintumor.serving.errors import BadInput  # noqa: E402
from braintumor.serving.metrics import Metrics  # noqa: E402

MONITORING = Path(__file__).resolve().parents[2] / "serving" / "monitoring"


def _exported_names(registry) -> set[str]:
    names = set()
    for family in registry.collect():
        for sample in family.samples:
            names.add(sample.name)
    return names


def test_dashboard_uses_exported_metric_names():
    registry = prometheus_client.CollectorRegistry()
    metrics = Metrics(prometheus_client, "grpc", registry=registry)
    metrics.observe_request("Analyze", "OK", 0.01)
    metrics.observe_explanation("lime", 1.0, cached=False)
    metrics.observe_error(BadInput("x"))
    metrics.predictions.labels("grpc", "glioma").inc()
    metrics.referrals.labels("grpc").inc()
    metrics.analysed.labels("grpc").inc()
    exported = _exported_names(registry)

    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\b(braintumor_[a-z_]+)", e)}
    assert used, "the dashboard should chart braintumor_* metrics"
    # Counters export `_total`; histograms `_bucket`, `_sum`, `_count`.
    assert used <= exported, f"dashboard metrics not exported: {sorted(used - exported)}"
    for family in ("braintumor_predictions_total", "braintumor_referrals_total", "braintumor_images_total"):
        assert family in used


def test_prometheus_config_scrapes_all_three_servers():
    text = (MONITORING / "prometheus.yml").read_text()
    for port in ("3000", "50052", "8002"):
        assert f":{port}" in text
