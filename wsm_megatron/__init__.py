"""wsm-megatron: Warmup-Stable and Merge (arXiv 2507.17634) for Megatron-Core."""

__version__ = "0.1.0"
