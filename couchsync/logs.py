"""Logging set-up for the command line, with a filter that masks passwords in URLs."""

from __future__ import annotations

import logging
import re
import sys

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


def setup(level: str = "INFO") -> None:
    """Log to standard error at `level`, passwords masked (only the CLI calls this)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("urllib3", "ibm_cloud_sdk_core", "pika"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
