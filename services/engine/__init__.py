"""The engine role (scheduler, logical KV cache) and the worker role (model, physical KV, sampler)."""
