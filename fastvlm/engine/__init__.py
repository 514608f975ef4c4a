"""Generation: KV cache, sampling, reference decode, and the batching engine."""
