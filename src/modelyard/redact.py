"""Secrets out of whatever leaves the process: URL credentials (scheme://user:password@host)
are masked in responses (errors.ModelyardError.body, endpoint descriptions) and in every log
line (RedactingFilter on the root handlers, installed by `serve`)."""

from __future__ import annotations

import logging
import re

# Userinfo: what lies between a '://' and the next '@' with no '/' or space between. Linear in
# the text's length whatever it holds, because a run of [^/\s@] from one '://' ends at or before
# the next '://' (its '/'). Error messages echo client input (a model name, a URL), and the
# pattern this replaced (a word-boundary scheme, `\b[a-z][a-z0-9+.-]*://`) backtracked
# quadratically on `a.a.a.…`: a 40 kB model name held the event loop for seconds. It also let
# `x_http://user:pw@h` through; this masks whatever precedes the '://'.
_USERINFO = re.compile(r"://[^/\s@]*@")


def redact(text: str) -> str:
    """`text` with the userinfo of every URL in it replaced by `***`."""
    return _USERINFO.sub("://***@", text)


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
