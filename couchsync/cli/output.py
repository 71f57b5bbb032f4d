"""What the commands print in common: report lines cut and escaped, and the exit code of a partial failure."""

from __future__ import annotations

EXIT_FAILED = 1
REPORT_FIELD_LENGTH = 120   # characters of an id or key printed in a report line
REPORT_REASON_LENGTH = 240  # characters of a reason


def shown(text: str, limit: int = REPORT_FIELD_LENGTH) -> str:
    """Text for a report line: cut to `limit` characters, control characters escaped (no forged lines)."""
    cut = text[:limit]
    escaped = "".join(char if char.isprintable() else repr(char)[1:-1] for char in cut)
    return escaped + (f"…({len(text)} characters)" if len(text) > limit else "")
