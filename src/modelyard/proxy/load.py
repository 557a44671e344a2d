"""What a replica's engine says of its load: its Prometheus `/metrics` text → requests running
plus waiting there, from every client (other gateways included). None when it serves none of
the series below; the pool then counts its own requests in flight (proxy/replicas)."""

from __future__ import annotations

from urllib.parse import urlsplit

from prometheus_client.parser import text_string_to_metric_families

MAX_METRICS_BYTES = 2_000_000       # a scrape larger than this is not read (vLLM's is ~100 kB)
# Per engine: the gauges whose sum is its load (running + waiting). Samples are summed over their
# labels (a vLLM serving several models, a modelyard serving several endpoints).
LOAD_SERIES = {
    "vllm": ("vllm:num_requests_running", "vllm:num_requests_waiting"),
    "sglang": ("sglang:num_running_reqs", "sglang:num_queue_reqs"),
    "llama-server": ("llamacpp:requests_processing", "llamacpp:requests_deferred"),
    "modelyard": ("modelyard_in_flight",),     # admitted: running and queued (metrics.py)
}
_NAMES = {name for names in LOAD_SERIES.values() for name in names}


def metrics_url(base: str) -> str:
    """A replica's OpenAI base URL (http://host:8000/v1) → its engine's /metrics at the root."""
    parts = urlsplit(base)
    return f"{parts.scheme}://{parts.netloc}/metrics"


def engine_load(text: str) -> float | None:
    """Running + waiting requests from an exposition text, or None if it has no known series."""
    total, found = 0.0, False
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in _NAMES:
                total += sample.value
                found = True
    return total if found else None
