"""cwa: critical weight analysis for causal language models."""

__version__ = "0.1.0"
