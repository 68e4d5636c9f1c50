"""A synthetic training job (no torch) for the detector's tests, benchmarks and load tests."""
