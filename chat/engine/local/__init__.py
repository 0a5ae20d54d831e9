"""The local engine: one model on one device, served by one thread (continuous batching over a paged KV cache)."""
