"""OpenAI-compatible HTTP API and Prometheus metrics."""
