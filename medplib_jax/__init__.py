"""MedPLIB-JAX: a biomedical multimodal LLM with pixel-level understanding, in JAX/Flax."""

__version__ = "0.1.0"


def __getattr__(name):
  # `from medplib_jax import MedPLIB` loads JAX and the model code only when asked for.
  if name == "MedPLIB":
    from medplib_jax.infer.api import MedPLIB
    return MedPLIB
  raise AttributeError(f"module 'medplib_jax' has no attribute {name!r}")
