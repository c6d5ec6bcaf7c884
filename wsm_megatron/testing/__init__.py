"""Test helpers: multi-process gloo runs and small real Megatron-Core models."""
