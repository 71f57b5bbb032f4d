"""Logging set-up for the command line, with a filter that masks passwords in URLs."""

from __future__ import annotations

import http.client
import logging
import re
import sys

from pythonjsonlogger.json import JsonFormatter

# Libraries whose DEBUG lines carry requests and responses, documents included (names, emails): kept
# at WARNING whatever the level, since debug logs say what happened, never what documents hold. The
# IBM SDK logs as "ibm-cloud-sdk-core" and, when that logger is enabled for DEBUG as its client is built,
# turns on http.client's printing of every request and response.
QUIET = ("urllib3", "requests", "ibm-cloud-sdk-core", "ibm_cloud_sdk_core", "ibmcloudant", "http.client", "pika")
_PASSWORD_IN_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]+):[^@/\s]+@")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RedactingFilter(logging.Filter):
    """Replaces `user:password@` in every formatted message by `user:[secure]@`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = _PASSWORD_IN_URL.sub(r"\g<scheme>\g<user>:[secure]@", message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


def setup(level: str = "INFO", fmt: str = "text") -> None:
    """Log to standard error at `level`, as text or JSON lines, passwords masked (only the CLI calls this).

    In JSON, the worker's per-event fields are an `event` object (python-json-logger), for journald
    and log pipelines to index without parsing the message.
    """
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in QUIET:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    http.client.HTTPConnection.debuglevel = 0
