"""MedPLIB-JAX: a biomedical multimodal LLM with pixel-level understanding, in JAX/Flax."""

__version__ = "0.1.0"
