"""The Engine protocol: what the registry starts and stops, and the API calls."""

from __future__ import annotations

from typing import Any, AsyncIterator, Protocol

from .types import EmbeddingRequest, EmbeddingResult, EngineOutput, EngineRequest, ModelType


class Engine(Protocol):
    model_type: ModelType     # COMPLETIONS engines implement generate, EMBEDDINGS engines embed
    model_engine: str         # the platform's `model_engine`: "LLAMA_CPP", "OPENAI_PROXY"

    async def start(self) -> None:
        """Load or connect; raise (any ModelyardError) to mark the endpoint failed."""

    async def stop(self) -> None:
        """Release everything; requests in flight end with an error."""

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        """ChoiceDelta events, then exactly one Usage. Closing the iterator early aborts the
        request and frees what it held; errors are raised as ModelyardError."""

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """One vector per input (EMBEDDINGS engines); errors are raised as ModelyardError."""

    def ready_reason(self) -> str | None:
        """None when able to serve now, else why not (e.g. 'no replica answers')."""

    def status(self) -> dict[str, Any]:
        """Figures for /api/v1/endpoints: in flight, queue depth, slots..."""
