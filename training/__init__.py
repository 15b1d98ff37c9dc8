"""Training entry points (fine-tuning on labelled pairs); run them through ``scripts/``."""
