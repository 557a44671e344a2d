"""OpenAI's Batch API's work: the runner every gateway runs (batch/runner)."""
