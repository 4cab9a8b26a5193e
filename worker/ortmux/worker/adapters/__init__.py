"""Adapters: formats, mapping to base weights, the LoRA graph rewrite, storage, residency."""
