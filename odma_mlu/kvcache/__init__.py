"""KV-cache memory: the arena (physical store), the extent allocator (mechanism) and policies."""
