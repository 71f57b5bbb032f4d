import sys
from pathlib import Path

# scripts/localcouch.py is shared by the demo and the tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

import localcouch  # noqa: E402  (found through the path above)


def pytest_report_header(config):
    """The server the integration tests will start or use (its version: in the terminal summary)."""
    kind, where = localcouch.choose()
    if kind == localcouch.EXTERNAL:
        return "couch server: the CouchDB that COUCHSYNC_TEST_COUCH_URL names"
    return f"couch server: {localcouch.KIND_NAMES[kind]}" + (f" from {where}" if where else "")
