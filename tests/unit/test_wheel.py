"""The built wheel holds every file couchsync reads at run time.

What the code reads is not listed by hand: a child process records, with an audit hook, every file
opened while it loads the design documents and every event schema, and each of those must be in the
wheel. `python -m build` makes the sdist, then the wheel from the sdist, so a file the sdist leaves
out is missing from the wheel too. scripts/installed.py then runs the commands from that wheel.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Runs in a child process: its audit hook cannot be removed, and must see only these reads.
RECORD_READS = """
import importlib, json, os, sys
from importlib import resources
from couchsync import design_docs, events

importlib.import_module(design_docs.PACKAGE)  # its code is no run-time file: imported before the recording
opened = []
sys.addaudithook(lambda event, args: opened.append(os.fspath(args[0]))
                 if event == "open" and isinstance(args[0], (str, os.PathLike)) else None)
design_docs.load()
for key in [*events.ROUTING_KEYS, events.USER_CREATED]:
    events._validator(key)
# Where each package's files are, wherever it is installed from, and its path inside a wheel.
roots = {str(resources.files(name)): name.replace(".", "/") for name in ("couchsync", design_docs.PACKAGE)}
read = set()
for path in opened:
    # The longest root first: couchsync.design_sources may lie inside couchsync's folder (a wheel).
    for root in sorted(roots, key=len, reverse=True):
        if path.startswith(root + os.sep):
            read.add(roots[root] + "/" + os.path.relpath(path, root).replace(os.sep, "/"))
            break
print(json.dumps(sorted(read)))
"""


def files_read_at_run_time() -> list[str]:
    done = subprocess.run([sys.executable, "-c", RECORD_READS], capture_output=True, text=True, timeout=120,
                          check=True, cwd="/")
    return list(json.loads(done.stdout))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)], capture_output=True,
                   text=True, timeout=600, check=True)
    [built] = out.glob("couchsync-*.whl")
    return built


def test_what_the_code_reads_at_run_time_is_recorded():
    read = files_read_at_run_time()
    # The recording itself works: the protection, the lookup view and a schema are among the reads.
    assert {"couchsync/design_sources/protection.validate.js", "couchsync/design_sources/contacts-lookup.map.js",
            "couchsync/schemas/user.created.schema.json"} <= set(read), read


def test_every_file_read_at_run_time_is_in_the_wheel(wheel: Path):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    missing = [path for path in files_read_at_run_time() if path not in names]
    assert not missing, f"read at run time but not in {wheel.name}: {missing}"
    assert "couchsync/py.typed" in names
