"""Weight import/export: PyTorch / Hugging Face checkpoints <-> our parameter pytrees."""
