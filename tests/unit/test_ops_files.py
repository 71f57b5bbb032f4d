"""The operations files (issue 17): the reconcile timer and service, the Prometheus rules and the Grafana
dashboard, checked by systemd's and Prometheus' own tools where the machine has them."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from couchsync.metrics import Metrics, ReconcileMetrics

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
RULES = SCRIPTS / "prometheus" / "couchsync.rules.yml"
DASHBOARD = SCRIPTS / "grafana" / "couchsync.json"
METRIC = re.compile(r"\bcouchsync_[a-z_]+")
# Under CI (scripts/setup installs it) a missing promtool fails the test instead of skipping it.
needs_promtool = pytest.mark.skipif(not shutil.which("promtool") and not os.environ.get("CI"),
                                    reason="promtool is not on this machine (scripts/setup installs Debian's "
                                    "prometheus package)")


def exposed_names() -> set[str]:
    """Every sample name couchsync's metrics can have (a counter's `_total`, a histogram's `_bucket`...)."""
    names = set()
    for registry in (Metrics().registry, ReconcileMetrics().registry):
        for family in registry.collect():
            names |= {family.name} | {family.name + suffix for suffix in ("_total", "_bucket", "_sum", "_count")}
    return names


@needs_promtool
def test_promtool_checks_the_rules_and_each_alert_fires_on_its_series_only():
    check = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 8 rules found" in check.stdout
    test = subprocess.run(["promtool", "test", "rules", "couchsync.rules.test.yml"], cwd=RULES.parent,
                          capture_output=True, text=True, timeout=60)
    assert test.returncode == 0, test.stdout + test.stderr


def test_the_rules_cover_the_eight_alerts_and_name_only_metrics_couchsync_exposes():
    text = RULES.read_text()
    alerts = re.findall(r"alert: (\w+)", text)
    assert alerts == ["CouchsyncWorkerDown", "CouchsyncDeadLettersGrowing", "CouchsyncQueueStale",
                      "CouchsyncReconcileStale", "CouchsyncProtectionRestored", "CouchsyncPaused",
                      "CouchsyncRemovalsHeld", "CouchsyncStateSeeded"]
    assert set(METRIC.findall(text)) <= exposed_names()


def test_the_dashboard_is_grafana_json_over_metrics_couchsync_exposes():
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in expressions for name in METRIC.findall(expr)}
    assert used <= exposed_names(), used - exposed_names()
    for wanted in ("couchsync_queue_messages", "couchsync_oldest_message_age_seconds", "couchsync_events_total",
                   "couchsync_protection_restored_total", "couchsync_reconcile_last_success_timestamp_seconds"):
        assert wanted in used
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not on this machine")
def test_systemd_verifies_the_reconcile_timer_and_service(tmp_path):
    # verify needs the ExecStart binary to exist: the same unit, started with /usr/bin/true.
    service = tmp_path / "couchsync-reconcile.service"
    unit = (SCRIPTS / "couchsync-reconcile.service").read_text()
    service.write_text(unit.replace("/opt/couchsync/bin/couchsync", "/usr/bin/true"))
    timer = tmp_path / "couchsync-reconcile.timer"
    timer.write_text((SCRIPTS / "couchsync-reconcile.timer").read_text())
    verify = subprocess.run(["systemd-analyze", "verify", str(service), str(timer)], capture_output=True, text=True,
                            timeout=60)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=30", str(service)],
                              capture_output=True, text=True, timeout=60)
    assert security.returncode == 0, security.stdout[-2000:]


def test_the_timer_runs_the_reconcile_hourly_and_the_service_writes_the_textfile():
    timer = (SCRIPTS / "couchsync-reconcile.timer").read_text()
    assert re.search(r"^OnCalendar=hourly$", timer, re.MULTILINE)
    assert re.search(r"^Unit=couchsync-reconcile.service$", timer, re.MULTILINE)
    service = (SCRIPTS / "couchsync-reconcile.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", service, re.MULTILINE)
    assert exec_start and "reconcile --all --textfile /var/lib/prometheus/node-exporter/" in exec_start.group(1)
    assert re.search(r"^Type=oneshot$", service, re.MULTILINE)
    assert "PASSWORD=" not in service.replace("PASSWORD_FILE=", "")
