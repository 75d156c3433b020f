"""Measuring scripts (benchmarks, profilers, GPU checks and experiments), beside the results they write."""
