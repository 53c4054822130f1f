"""odma-mlu: ODMA KV-cache management for LLM serving on accelerators poor at random access."""

__version__ = "0.1.0"
