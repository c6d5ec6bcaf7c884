"""Bundled training configs, installed as the package ``wsm_megatron.configs``."""
