"""Adapters: payload formats, checking and loading them onto a base model (the mapping and the
LoRA rewrite live in the engine), the local store, the shared store, residency and uploads."""
