"""Training entry points (distillation, fine-tuning); run them through ``scripts/``."""
