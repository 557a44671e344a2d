"""Secrets out of whatever leaves the process: URL credentials (scheme://user:password@host)
are masked in responses (errors.ModelyardError.body, endpoint descriptions) and in every log
line (RedactingFilter on the root handlers, installed by `serve`)."""

from __future__ import annotations

import logging
import re

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]*@")


def redact(text: str) -> str:
    """`text` with the userinfo of every URL in it replaced by `***`."""
    return _USERINFO.sub(r"\1***@", text)


class RedactingFilter(logging.Filter):
    """Masks URL credentials in a record's formatted message (whichever module logged it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install_log_filter() -> None:
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
