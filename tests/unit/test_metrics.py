"""The metrics and health endpoint, served on a loopback port."""

import requests

from couchsync.metrics import Metrics, serve


def test_metrics_and_health_are_served_and_health_follows_the_consumer():
    metrics = Metrics()
    metrics.events.labels("b2b.group.created", "applied").inc(3)
    metrics.fanout_seconds.labels("b2b.group.created").observe(0.2)
    state: dict[str, str | None] = {"problem": "not consuming"}
    server = serve(metrics, "127.0.0.1", 0, lambda: state["problem"])
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        text = requests.get(base + "/metrics", timeout=5).text
        assert 'couchsync_events_total{outcome="applied",routing_key="b2b.group.created"} 3.0' in text
        assert 'couchsync_fanout_seconds_count{routing_key="b2b.group.created"} 1.0' in text
        assert requests.get(base + "/healthz", timeout=5).status_code == 503
        state["problem"] = "paused: credentials"
        answer = requests.get(base + "/healthz", timeout=5)
        assert (answer.status_code, answer.text) == (503, "paused: credentials\n")
        state["problem"] = None
        assert requests.get(base + "/healthz", timeout=5).status_code == 200
        assert requests.get(base + "/nope", timeout=5).status_code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_three_hundred_distinct_routing_keys_make_a_bounded_number_of_series():
    metrics = Metrics()
    for i in range(300):
        metrics.count_event(f"b2b.group.k{i}", "dead_lettered")
        metrics.observe_fanout(f"b2b.group.k{i}", 0.1)
    metrics.count_event("b2b.group.created", "applied")
    text = metrics.exposition().decode()
    series = [line for line in text.splitlines() if line.startswith("couchsync_events_total")]
    assert sorted(series) == ['couchsync_events_total{outcome="applied",routing_key="b2b.group.created"} 1.0',
                              'couchsync_events_total{outcome="dead_lettered",routing_key="other"} 300.0']
    assert 'couchsync_fanout_seconds_count{routing_key="other"} 300.0' in text
    assert "k299" not in text


def test_the_paused_gauge_is_one_for_the_reason_and_zero_for_the_others_from_the_start():
    metrics = Metrics()
    text = metrics.exposition().decode()
    assert 'couchsync_paused{reason="couchdb"} 0.0' in text and 'couchsync_paused{reason="credentials"} 0.0' in text
    metrics.set_paused("credentials")
    text = metrics.exposition().decode()
    assert 'couchsync_paused{reason="couchdb"} 0.0' in text and 'couchsync_paused{reason="credentials"} 1.0' in text
    metrics.set_paused(None)
    assert 'couchsync_paused{reason="credentials"} 0.0' in metrics.exposition().decode()
