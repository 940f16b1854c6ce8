"""The one error the benchmark raises for a run it cannot do as asked."""


class BenchmarkError(ValueError):
    """A benchmark cannot run as asked (unknown method or model, no CUDA for the gpu suite, ...)."""
