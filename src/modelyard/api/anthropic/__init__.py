"""Anthropic's Messages API (`/v1/messages`), served on the same endpoints, pipeline and ledger as
the OpenAI-compatible data plane, in Anthropic's shapes (its error object included)."""
