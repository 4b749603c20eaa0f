"""Benchmarks: steps per second of the engine against eager PyTorch, as a waterfall."""
