"""Evaluation of sentence-embedding models."""
