"""The OpenAI-compatible data plane: completions, chat, embeddings, the models list, vLLM's
tokenizer routes; their request and response bodies, the one pipeline they share, streaming and
structured output. What a client with an inference key calls."""
