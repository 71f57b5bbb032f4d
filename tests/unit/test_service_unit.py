"""scripts/couchsync.service, checked by systemd's own tools where the machine has them."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "scripts" / "couchsync.service"


def test_the_unit_is_notify_restarts_on_failure_but_not_on_a_configuration_error():
    text = UNIT.read_text()
    for line in ("Type=notify", "WatchdogSec=60", "Restart=on-failure", "RestartPreventExitStatus=78",
                 "NoNewPrivileges=yes", "ProtectSystem=strict", "DynamicUser=yes", "EnvironmentFile="):
        assert re.search(rf"^{re.escape(line)}", text, re.MULTILINE), line
    assert "PASSWORD=" not in text.replace("PASSWORD_FILE=", "")  # passwords come as credentials files


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is not on this machine")
def test_systemd_verifies_the_unit_and_rates_its_exposure_low(tmp_path):
    # verify needs the ExecStart binary to exist: the same unit, started with /usr/bin/true.
    unit = tmp_path / "couchsync.service"
    unit.write_text(UNIT.read_text().replace("/opt/couchsync/bin/couchsync", "/usr/bin/true"))
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=30", str(unit)],
                              capture_output=True, text=True, timeout=60)
    assert security.returncode == 0, security.stdout[-2000:]


def test_the_units_run_the_couchsync_the_readme_installs():
    readme = (UNIT.parents[1] / "README.md").read_text()
    install = readme.split("\n## Install\n", 1)[1].split("\n## ", 1)[0]
    link = re.search(r"^ln -sfn /opt/couchsync-[\w.]+ (\S+)$", install, re.MULTILINE)
    assert link, "the Install section links the venv in service"
    venv = re.search(r"^python3 -m venv (/opt/couchsync-[\w.]+)$", install, re.MULTILINE)
    assert venv and venv.group(1) in link.group(0)
    for name in ("couchsync.service", "couchsync-reconcile.service"):
        [start] = re.findall(r"^ExecStart=(\S+)", (UNIT.parent / name).read_text(), re.MULTILINE)
        assert start == f"{link.group(1)}/bin/couchsync", (name, start)
