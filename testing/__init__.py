"""Helpers for tests and benchmarks: tiny random-weight pipelines, the real CLIP tokenizer built offline."""
