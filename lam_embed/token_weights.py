"""Pooling weights per token id from a corpus (``LAMConfig.token_weights_min_tokens``).

SIF weights (Arora et al., 2017, "A Simple but Tough-to-Beat Baseline for Sentence
Embeddings"): ``smoothing / (smoothing + p(id))``, p the id's share of the corpus' tokens, so
that the ids every text uses weigh little and rare ones close to 1. In the mean pooling of
a long document they let the few tokens that set it apart (a name, a number, an invented
fact) weigh more against thousands of ordinary ones; ``docs/long-documents.md``, "Weighting
tokens by rarity", has the measurements that chose them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

import numpy as np
import torch

from .configuration_lam import LAMConfig


def corpus_token_counts(tokenizer, texts: Iterable[str], vocab_size: int, batch_size: int = 10_000) -> np.ndarray:
    """How often each token id occurs in ``texts`` (special tokens not added), int64 (vocab_size,)."""
    counts = np.zeros(vocab_size, dtype=np.int64)
    texts = iter(texts)
    while batch := list(itertools.islice(texts, batch_size)):
        ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        found = np.bincount(np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64), minlength=vocab_size)
        if len(found) > vocab_size:
            raise ValueError(f"the tokenizer gives id {len(found) - 1}, past the vocabulary of {vocab_size}")
        counts += found
    return counts


def sif_weights(counts: np.ndarray, smoothing: float) -> torch.Tensor:
    """smoothing / (smoothing + p), p = (count + 1) / (total + ids): float32 (ids,), in (0, 1)."""
    if not smoothing > 0:
        raise ValueError(f"smoothing must be positive, got {smoothing!r}")
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError("counts must be a vector of non-negative counts")
    share = (counts + 1.0) / (counts.sum() + len(counts))
    return torch.from_numpy(smoothing / (smoothing + share)).float()


def set_token_weights(lam, weights: torch.Tensor, min_tokens: int) -> None:
    """Give the LAMModel ``lam`` the pooling weights ``weights`` (vocab_size,) for samples of
    more than ``min_tokens`` valid tokens (config.token_weights_min_tokens)."""
    if weights.shape != (lam.config.vocab_size,):
        raise ValueError(f"weights must have shape ({lam.config.vocab_size},), got {tuple(weights.shape)}")
    if not torch.isfinite(weights).all() or (weights <= 0).any():
        raise ValueError("weights must be finite and positive")
    LAMConfig(token_weights_min_tokens=min_tokens)  # the config's own check of the value
    weights = weights.to(device=next(lam.parameters()).device, dtype=torch.float32)
    if getattr(lam, "token_weights", None) is None:
        lam.register_buffer("token_weights", weights.clone())
    else:
        lam.token_weights.copy_(weights)
    lam.config.token_weights_min_tokens = min_tokens


def remove_token_weights(lam) -> None:
    """Take the pooling weights out of the LAMModel ``lam``: it pools as it did without them
    (and saves without them)."""
    lam.config.token_weights_min_tokens = None
    lam._buffers.pop("token_weights", None)


def main(argv=None) -> None:
    import argparse
    import logging
    from pathlib import Path

    from sentence_transformers import SentenceTransformer

    from .cli import DefaultsHelpFormatter
    from .data import read_text_lines

    p = argparse.ArgumentParser(
        prog="lam-token-weights", formatter_class=DefaultsHelpFormatter,
        description="Write a copy of a LAM sentence-transformers folder whose mean pooling weighs each token "
                    "id of a long input by its SIF weight from a corpus (LAMConfig.token_weights_min_tokens). "
                    "Inputs of at most --min-tokens tokens are encoded as before.")
    p.add_argument("model", help="LAM sentence-transformers folder (scripts/assemble_lam.py writes 'lam')")
    p.add_argument("--sentences", required=True,
                   help="corpus of one text a line (.txt or .txt.gz) whose token frequencies give the weights; "
                        "training data only, never evaluation text")
    p.add_argument("--limit", type=int, default=300_000, help="lines of the corpus read (0: all)")
    p.add_argument("--smoothing", type=float, default=1e-3,
                   help="a in a / (a + p(id)): smaller weighs frequent ids down more")
    p.add_argument("--min-tokens", type=int, default=512,
                   help="inputs with more valid tokens than this (special tokens included) are weighted, "
                        "in full from 4 times this on")
    p.add_argument("--output", required=True, help="folder to write")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.limit < 0:
        p.error(f"--limit must be >= 0, got {args.limit}")
    if not args.smoothing > 0:
        p.error(f"--smoothing must be positive, got {args.smoothing}")
    if args.min_tokens < 0:
        p.error(f"--min-tokens must be >= 0, got {args.min_tokens}")
    if not Path(args.sentences).is_file():
        p.error(f"--sentences: no file {args.sentences}")
    model = SentenceTransformer(args.model, device="cpu")
    lam = model[0].auto_model
    if getattr(lam.config, "model_type", None) != "lam":
        p.error(f"{args.model} is not a LAM model")
    texts = read_text_lines(args.sentences, limit=args.limit or None)
    counts = corpus_token_counts(model.tokenizer, texts, lam.config.vocab_size)
    set_token_weights(lam, sif_weights(counts, args.smoothing), args.min_tokens)
    model.save(args.output)
    logging.getLogger(__name__).info("wrote %s: %d corpus texts, %d tokens, weights %.4f-%.4f", args.output,
                                     len(texts), int(counts.sum()), float(lam.token_weights.min()),
                                     float(lam.token_weights.max()))
