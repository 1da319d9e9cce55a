"""The engine role: scheduler, logical KV cache (block pool, prefix cache), engine loop and Engine service."""
