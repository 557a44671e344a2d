"""URL credentials never reach a log line, whichever module logs them (the filter `serve` puts
on the root handlers)."""

from __future__ import annotations

import io
import logging

from modelyard.redact import RedactingFilter, redact


def test_redact_masks_url_credentials_only():
    assert redact("upstream http://alice:pw@10.0.0.1:8000/v1 failed") == "upstream http://***@10.0.0.1:8000/v1 failed"
    assert redact("see https://host/a@b and mail x@y.z") == "see https://host/a@b and mail x@y.z"


def test_log_lines_are_redacted():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("test.redact")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("replica %s is down: %s", "http://bob:s3cret@h:1/v1", "refused")
        log.warning("plain %d", 3)
    finally:
        log.removeHandler(handler)
    assert out.getvalue() == "replica http://***@h:1/v1 is down: refused\nplain 3\n"
