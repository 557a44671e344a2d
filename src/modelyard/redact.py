"""Secrets out of whatever leaves the process, by two rules:

- `mask_url_credentials`: URL credentials (scheme://user:password@host) masked in responses
  (errors.ModelyardError.body, endpoint descriptions) and in every log line (RedactingFilter on
  the root handlers, installed by `serve`);
- `upstream_error_text`: an upstream's error text as we pass it on (proxy/errors): the key we
  send it, and anything key-like, out; cut to a bounded length first."""

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


def mask_url_credentials(text: str) -> str:
    """`text` with the userinfo of every URL in it replaced by `***`."""
    return _USERINFO.sub("://***@", text)


# What an upstream may echo of a key: ours verbatim, or a masked one such as OpenAI's
# "Incorrect API key provided: sk-proj-****...1234" (prefix and last digits are still ours).
_KEY_LIKE = re.compile(r"\bsk-[^\s'\",;]*|\bBearer\s+\S+|\S*\*{3,}\S*", re.IGNORECASE)


MAX_UPSTREAM_MESSAGE = 500     # characters of an upstream's error text passed on


def upstream_error_text(message: str, secret: str | None) -> str:
    """An upstream's error text as we pass it on: our key out (first, so that no cut can leave a
    part of it), then cut to MAX_UPSTREAM_MESSAGE before any pattern runs (an upstream, or
    whoever answers in its place, chooses the text: _KEY_LIKE's runs of non-spaces are
    quadratic on one long word), then key-like words out."""
    if secret:
        message = message.replace(secret, "[redacted]")
    if len(message) > MAX_UPSTREAM_MESSAGE:
        message = message[:MAX_UPSTREAM_MESSAGE] + "..."
    return _KEY_LIKE.sub("[redacted]", message)


class RedactingFilter(logging.Filter):
    """Masks URL credentials in a record's formatted message (whichever module logged it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = mask_url_credentials(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install_log_filter() -> None:
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
