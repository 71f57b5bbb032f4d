"""The metrics and health endpoint, served on a loopback port."""

import requests

from couchsync.metrics import Metrics, serve


def test_metrics_and_health_are_served_and_health_follows_the_consumer():
    metrics = Metrics()
    metrics.events.labels("b2b.group.created", "applied").inc(3)
    metrics.fanout_seconds.labels("b2b.group.created").observe(0.2)
    state = {"consuming": False}
    server = serve(metrics, "127.0.0.1", 0, lambda: state["consuming"])
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        text = requests.get(base + "/metrics", timeout=5).text
        assert 'couchsync_events_total{outcome="applied",routing_key="b2b.group.created"} 3.0' in text
        assert 'couchsync_fanout_seconds_count{routing_key="b2b.group.created"} 1.0' in text
        assert requests.get(base + "/healthz", timeout=5).status_code == 503
        state["consuming"] = True
        assert requests.get(base + "/healthz", timeout=5).status_code == 200
        assert requests.get(base + "/nope", timeout=5).status_code == 404
    finally:
        server.shutdown()
        server.server_close()
