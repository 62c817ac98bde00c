"""The HTTP server (OpenAI-compatible API)."""
