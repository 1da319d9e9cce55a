"""The worker role: model, physical KV tensors, attention backends, sampler, checkpoint loading, the Worker service."""
