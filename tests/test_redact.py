"""URL credentials never reach a log line, whichever module logs them (the filter `serve` puts
on the root handlers)."""

from __future__ import annotations

import io
import logging

from modelyard.redact import RedactingFilter, mask_url_credentials


def test_redact_masks_url_credentials_only():
    assert mask_url_credentials("upstream http://alice:pw@10.0.0.1:8000/v1 failed") == "upstream http://***@10.0.0.1:8000/v1 failed"
    assert mask_url_credentials("see https://host/a@b and mail x@y.z") == "see https://host/a@b and mail x@y.z"


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


def test_redact_masks_userinfo_whatever_precedes_the_separator():
    # the old pattern wanted a word boundary before the scheme: `x_http` (no boundary) leaked
    assert mask_url_credentials("proxy x_http://u:p@h/v1 down") == "proxy x_http://***@h/v1 down"
    assert mask_url_credentials("a://b://c@d") == "a://b://***@d"
    assert mask_url_credentials("http://@h") == "http://***@h"


def test_redact_leaves_hostile_text_without_credentials_as_it_is():
    # shapes that made the old pattern backtrack quadratically (a.a.a.…) or that chain '://'s
    for text in ("a." * 200_000, "a:/" * 100_000, "a://" * 100_000, "x" * 1_000_000):
        assert mask_url_credentials(text) == text
    assert mask_url_credentials("a://" * 100_000 + "u@h") == "a://" * 100_000 + "***@h"
