"""Long-document stage: teach a LAM sentence-transformer (the released model) to embed a
whole document in one pass so that any one of its sentences finds it.

Each training example comes from a long text (Wikipedia articles, SQuALITY train stories):
a window of consecutive sentences of a random length (log-uniform between
``--min-tokens`` and ``--max-tokens``) is the document, one of its sentences, drawn
uniformly from the whole window, is the query, and the same window without that sentence
is its hard negative. In-batch the other documents are negatives too
(sentence-transformers' MultipleNegativesRankingLoss). The hard negative differs from the
positive by one sentence only, as a passkey or needle document differs from the others by
one line: the document embedding has to keep every sentence, wherever it is, instead of
averaging it away. Nothing favours the start of a document.

To keep short texts as they were, every step also matches LAM's embeddings of a batch of
corpus sentences to the teacher's (MSELoss with the teacher's embeddings as labels; with
``--stsb-train-fraction`` a share of the batch are STS-B train sentences, never their scores,
as in the distillation), and, with ``--passage-batch-size``, of a batch of corpus passages (up
to 512 tokens, the teacher's limit; the held-out end of the file is never read) in a second
term of the same kind: the teacher's plain mean over a passage is what users of short inputs
compare with. With ``--short-text-tail-steps``, the stage ends with steps of the sentence
term alone. With ``--long-input-min-tokens``, the stage trains a second set of layers that
reads only inputs longer than that, and short texts keep the loaded model's embeddings.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from lam_embed.backends import BACKEND_NAMES
from lam_embed.cli import DefaultsHelpFormatter, non_negative_int
from lam_embed.configuration_lam import POSITION_OVERFLOW
from lam_embed.data import default_data_dir, read_text_lines, stsb_train_sentences
from lam_embed.sentence_transformer import POOLING_MODES

from . import set_dropout
from .longdoc_examples import DocumentQueryExamples, load_or_mine_pairs, paraphrase_pairs, read_long_texts

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# training


def stage_loss(ranking, keep_short, triples: list[dict] | None, short: list[tuple[dict, object]],
               short_text_weight: float):
    """The loss of a step: ``ranking`` (MultipleNegativesRankingLoss) of the queries against
    the documents and the hard negatives (``triples``: their tokenised features; None in the
    short-text tail, which has no ranking term), plus ``short_text_weight`` times the sum of
    ``keep_short`` (MSELoss) over ``short``, pairs of (tokenised short texts, the teacher's
    embeddings of them): sentences, and passages when they are trained. Returns (loss, ranking
    term or None, [each short-text term])."""
    rank_loss = None if triples is None else ranking(triples, None)
    short_losses = [keep_short([features], target) for features, target in short]
    short_loss = short_text_weight * sum(short_losses)
    return (short_loss if rank_loss is None else rank_loss + short_loss), rank_loss, short_losses


def build_parser() -> argparse.ArgumentParser:
    data = default_data_dir()
    longdoc = data / "longdoc" if data else None
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", default="lam", help="LAM sentence-transformers folder to start from "
                   "(python scripts/assemble_lam.py builds the released one as 'lam')")
    p.add_argument("--teacher", default=None, help="teacher folder or hub name for the short-text term "
                   "(default: all-MiniLM-L6-v2, the offline copy when the hub is unreachable)")
    p.add_argument("--articles", default=str(longdoc / "wiki_articles.jsonl.gz") if longdoc else None,
                   help="long training texts, JSON lines with a \"text\" field (default: $LAM_DATA_DIR/longdoc)")
    p.add_argument("--squality", default=str(longdoc / "squality.jsonl.gz") if longdoc else None,
                   help="SQuALITY stories; only the train split is read. '' to leave them out")
    p.add_argument("--sentences", default=str(data / "corpus" / "sentences.txt.gz") if data else None,
                   help="short texts for the term that keeps LAM close to the teacher on them (with "
                        "--long-input-min-tokens, which leaves that term out, read only by --paraphrase-queries)")
    p.add_argument("--max-sentences", type=_positive, default=200_000, help="sentences read from --sentences")
    p.add_argument("--stsb", default=str(data / "stsb") if data else None,
                   help="folder of the STS-B csv files; only the sentences of sts-train.csv are read, with "
                        "--stsb-train-fraction (default: $LAM_DATA_DIR/stsb)")
    p.add_argument("--stsb-train-fraction", type=float, default=0.0,
                   help="fraction of each batch of the short-text term drawn from the STS-B train sentences (as "
                        "in the distillation), the rest from --sentences")
    p.add_argument("--passages", default=str(data / "corpus" / "passages.txt.gz") if data else None,
                   help="passages for a second short-text term (read only with --passage-batch-size)")
    p.add_argument("--passage-holdout", type=int, default=1000,
                   help="passages at the end of --passages that are never read (the held-out evaluation set)")
    p.add_argument("--passage-batch-size", type=int, default=0,
                   help="passages a step in the second short-text term, at most 512 tokens each (0: no such term)")
    p.add_argument("--output-dir", required=True, help="folder for the checkpoint, the model and the release")
    p.add_argument("--steps", type=_positive, default=2000, help="optimizer steps")
    p.add_argument("--batch-size", type=_positive, default=16, help="(query, document, negative) triples a step")
    p.add_argument("--sentence-batch-size", type=_positive, default=64, help="short texts a step")
    p.add_argument("--mini-batch-size", type=_positive, default=None, metavar="N",
                   help="embed the ranking term's queries, documents and negatives N at a time with gradient "
                        "caching (sentence-transformers' CachedMultipleNegativesRankingLoss), so that --batch-size, "
                        "the documents each query is ranked against, can grow past what fits in memory at once; "
                        "the loss and its gradients stay those of the whole batch (default: the whole batch in "
                        "one pass)")
    p.add_argument("--min-tokens", type=_positive, default=256, help="shortest document, in tokens")
    p.add_argument("--max-tokens", type=_positive, default=4096, help="longest document, in tokens")
    p.add_argument("--inserted-share", type=float, default=0.0,
                   help="share of the examples whose query is a sentence of another text inserted into the "
                        "document, against a window of the same text from elsewhere with another inserted "
                        "sentence (the rest: a sentence of the document, against the document without it)")
    p.add_argument("--paraphrase-queries", type=non_negative_int, default=0, metavar="N",
                   help="with --inserted-share: draw N query-length sentences of --sentences, pair those the "
                        "teacher finds related (--paraphrase-similarity; sentence-transformers' paraphrase "
                        "mining), and let each inserted example insert one sentence of a pair and query with the "
                        "other, so that a query is related to the line it finds instead of a copy of it (0: the "
                        "query is the inserted sentence itself)")
    p.add_argument("--paraphrase-similarity", type=float, nargs=2, default=(0.6, 0.9), metavar=("LOW", "HIGH"),
                   help="teacher cosine of a pair of --paraphrase-queries: at least LOW and below HIGH (near-copies "
                        "left out)")
    p.add_argument("--lr", type=float, default=2e-5,
                   help="peak learning rate (AdamW, linear warm-up, cosine decay); 0 with --pooling-gate: the gate "
                        "alone trains, the layers stay as loaded")
    p.add_argument("--warmup", type=float, default=0.05, help="share of the steps spent warming up")
    p.add_argument("--scale", type=float, default=20.0, help="scale of the cosine scores in the ranking loss")
    p.add_argument("--short-text-weight", type=float, default=1000.0,
                   help="weight of the short-text term, the mean squared error of unit embeddings over their "
                        "384 dimensions (at 384 it equals their squared distance)")
    p.add_argument("--position-overflow", choices=POSITION_OVERFLOW, default=None,
                   help="how positions past the position table read it (LAMConfig.position_overflow), set "
                        "before training and saved with the model (default: the model's own)")
    p.add_argument("--token-repeat-cap", type=_repeat_cap, default=None, metavar="N|none",
                   help="no token id weighs more than N occurrences in mean pooling (LAMConfig.token_repeat_cap; "
                        "'none': off), set before training and saved with the model (default: the model's own)")
    p.add_argument("--outlier-pooling-temperature", type=_temperature, default=None, metavar="T|none",
                   help="weigh the rows of a long document by exp(-T cos(row, document mean)) in mean pooling "
                        "(LAMConfig.outlier_pooling_temperature; 'none': off), set before training and saved with "
                        "the model (default: the model's own)")
    p.add_argument("--pooling", choices=POOLING_MODES, default=None,
                   help="sentence-transformers pooling of the trained model, set before training (the short-text "
                        "term then teaches it to give the teacher's mean-pooled embeddings) and recorded in the "
                        "release (default: the model's own)")
    p.add_argument("--train-only-token-mixers", action="store_true",
                   help="train each layer's token mixer (its DeltaNet) only; the FFNs, norms and embeddings "
                        "stay as loaded")
    p.add_argument("--long-input-min-tokens", type=non_negative_int, default=None, metavar="N",
                   help="give the model a second set of layers for inputs of more than N tokens "
                        "(LAMConfig.long_input_min_tokens), started as a copy of its layers, and train only those: "
                        "inputs of up to N tokens (the queries, the short-text sentences) keep the loaded model's "
                        "embeddings exactly, so the sentence term and its tail are left out (default: one set of "
                        "layers)")
    p.add_argument("--pooling-gate", action="store_true",
                   help="with --long-input-min-tokens: give the model a pooling gate for the inputs the long-input "
                        "layers read (LAMConfig.pooling_gate_min_tokens, a learned logit a row that weighs it in the "
                        "pooling, zero at the start) and train it with those layers")
    p.add_argument("--pooling-gate-lr", type=float, default=1e-3,
                   help="peak learning rate of the pooling gate (the same schedule as --lr): it starts at zero and "
                        "has one logit a row to learn, not a trained model's weights to keep")
    p.add_argument("--train-embeddings", action="store_true",
                   help="train the token, position and type embeddings too (by default they stay the teacher's, "
                        "so that the release holds only the layers)")
    p.add_argument("--short-text-tail-steps", type=int, default=0,
                   help="after the --steps of the stage, this many steps of the sentence term alone (no "
                        "ranking or passage term), at a learning rate falling linearly from --short-text-tail-lr "
                        "to 0, so that training ends on the teacher's sentence embeddings (0: no tail)")
    p.add_argument("--short-text-tail-lr", type=float, default=1e-5,
                   help="learning rate of the first step of the short-text tail")
    p.add_argument("--dropout", type=float, default=None,
                   help="dropout inside LAM while training (every nn.Dropout; the saved config keeps the model's "
                        "hidden_dropout_prob) (default: the model's own hidden_dropout_prob)")
    p.add_argument("--seed", type=int, default=0, help="seed of the examples and the initialisation")
    p.add_argument("--save-every", type=_positive, default=200, help="steps between checkpoints")
    p.add_argument("--stop-after-minutes", type=float, default=None,
                   help="stop (with a checkpoint) after this many minutes of this process; --resume continues")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output-dir")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--delta-impl", default="chunk", choices=BACKEND_NAMES,
                   help="backend while training ('triton' recomputes its backward with 'chunk'); the saved "
                        "model gets 'auto'")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast (default: on CUDA)")
    return p


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _repeat_cap(text: str) -> int:
    """--token-repeat-cap: 'none' (off, returned as 0) or a positive count."""
    return 0 if text.lower() == "none" else _positive(text)


def _temperature(text: str) -> float:
    """--outlier-pooling-temperature: 'none' (off, returned as 0) or a positive number."""
    if text.lower() == "none":
        return 0.0
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number or 'none', got {text}")
    return value


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """Usage errors (exit 2) before any model loads: missing or empty files, bad sizes."""
    for option in ("articles", "sentences") if reads_sentences(args) else ("articles",):
        path = getattr(args, option)
        if not path:
            parser.error(f"--{option} is required: no data folder found (set LAM_DATA_DIR)")
        if not Path(path).is_file():
            parser.error(f"--{option}: no file {path}")
    if args.squality and not Path(args.squality).is_file():
        parser.error(f"--squality: no file {args.squality}")
    if args.passage_batch_size < 0 or args.passage_holdout < 0:
        parser.error("--passage-batch-size and --passage-holdout must not be negative")
    if args.passage_batch_size and not (args.passages and Path(args.passages).is_file()):
        parser.error(f"--passages: no file {args.passages} (needed by --passage-batch-size)")
    if args.train_only_token_mixers and args.train_embeddings:
        parser.error("--train-only-token-mixers leaves the embeddings as loaded: drop --train-embeddings")
    if args.long_input_min_tokens is not None:
        for given, option in ((args.train_only_token_mixers, "--train-only-token-mixers"),
                              (args.train_embeddings, "--train-embeddings"),
                              (args.short_text_tail_steps, "--short-text-tail-steps")):
            if given:
                parser.error(f"--long-input-min-tokens trains the long-input layers only: drop {option}")
    if args.pooling_gate and args.long_input_min_tokens is None:
        parser.error("--pooling-gate trains with the long-input layers: give --long-input-min-tokens too")
    if not (args.lr > 0 or args.lr == 0 and args.pooling_gate):
        parser.error(f"--lr must be positive (or 0 with --pooling-gate: the gate alone trains), got {args.lr}")
    if not args.pooling_gate_lr > 0:
        parser.error(f"--pooling-gate-lr must be positive, got {args.pooling_gate_lr}")
    if args.min_tokens > args.max_tokens:
        parser.error(f"--min-tokens ({args.min_tokens}) must not exceed --max-tokens ({args.max_tokens})")
    if not 0 <= args.stsb_train_fraction < 1:
        parser.error(f"--stsb-train-fraction must lie in [0, 1), got {args.stsb_train_fraction}")
    if args.stsb_train_fraction and not args.stsb:
        parser.error("--stsb-train-fraction needs --stsb (or LAM_DATA_DIR)")
    if not 0 <= args.inserted_share <= 1:
        parser.error(f"--inserted-share must lie in [0, 1], got {args.inserted_share}")
    if args.paraphrase_queries and not args.inserted_share:
        parser.error("--paraphrase-queries makes the queries of inserted examples: give --inserted-share too")
    low, high = args.paraphrase_similarity
    if not -1 <= low < high <= 1:
        parser.error(f"--paraphrase-similarity: need -1 <= LOW < HIGH <= 1, got {low} {high}")
    if args.short_text_tail_steps < 0:
        parser.error(f"--short-text-tail-steps must be >= 0, got {args.short_text_tail_steps}")
    if not args.short_text_tail_lr > 0:
        parser.error(f"--short-text-tail-lr must be positive, got {args.short_text_tail_lr}")
    if args.dropout is not None and not 0 <= args.dropout < 1:
        parser.error(f"--dropout must lie in [0, 1), got {args.dropout}")
    if not 0 <= args.warmup < 1:
        parser.error(f"--warmup must lie in [0, 1), got {args.warmup}")
    checkpoint = Path(args.output_dir) / CHECKPOINT
    if args.resume and not checkpoint.is_file():
        parser.error(f"--resume: no checkpoint {checkpoint}")


CHECKPOINT = "checkpoint.pt"


def reads_sentences(args) -> bool:
    """Whether the run reads --sentences: the short-text term does (left out when the
    long-input layers train alone), and so does --paraphrase-queries."""
    return args.long_input_min_tokens is None or bool(args.paraphrase_queries)


def run_arguments(argv: list[str]) -> list[str]:
    """The arguments of the whole run, without those that only split it over processes
    (--resume, --stop-after-minutes): a resumed run records the command that reproduces it."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--resume" or arg.startswith("--stop-after-minutes="):
            continue
        elif arg == "--stop-after-minutes":
            skip = True
        else:
            kept.append(arg)
    return kept


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        texts = read_long_texts(args.articles)
        if args.squality:
            texts += read_long_texts(args.squality, split="train")
        sentences = []
        if reads_sentences(args):
            sentences = read_text_lines(args.sentences, limit=args.max_sentences)
            if not sentences:
                parser.error(f"--sentences: no lines in {args.sentences}")
        passages = []
        if args.passage_batch_size:
            passages = read_text_lines(args.passages)
            passages = passages[: len(passages) - args.passage_holdout]
    except (ValueError, UnicodeDecodeError) as err:
        parser.error(str(err))
    stsb_train = []
    if args.stsb_train_fraction:
        try:
            stsb_train = stsb_train_sentences(args.stsb)
        except (OSError, ValueError, UnicodeDecodeError) as err:
            parser.error(f"--stsb: {err}")
    if args.passage_batch_size and not passages:
        parser.error(f"--passages: no lines in {args.passages} before its last {args.passage_holdout}")
    return train(args, texts, sentences, passages, argv, stsb_train)


PASSAGE_TOKENS = 512  # the teacher's position table ends here


def short_text_batch(rng: random.Random, sentences: list[str], extra: list[str], size: int,
                     extra_fraction: float) -> list[str]:
    """A batch of the short-text term: ``round(size * extra_fraction)`` texts drawn from ``extra``
    (the STS-B train sentences), the rest from ``sentences``, none twice. Without extra texts it
    is ``rng.sample(sentences, size)``, the batch of runs made before the option existed."""
    n_extra = round(size * extra_fraction) if extra else 0
    batch = rng.sample(sentences, min(size - n_extra, len(sentences)))
    if n_extra:
        batch += rng.sample(extra, min(n_extra, len(extra)))
    return batch


def train_only(lam, keep, what: str) -> int:
    """Stop gradients to every parameter of ``lam`` (a LAMModel) whose name ``keep`` rejects;
    return how many values still train (``what`` names them in the log)."""
    trained = 0
    for name, param in lam.named_parameters():
        kept = keep(name)
        param.requires_grad_(kept)
        trained += param.numel() if kept else 0
    logger.info("training the %s only: %d of %d values", what, trained, sum(p.numel() for p in lam.parameters()))
    return trained


def freeze_all_but_token_mixers(lam) -> int:
    """train_only the layers' token mixers; an error when the model has none."""
    from lam_embed.sentence_transformer import TOKEN_MIXER_NAMES_TEXT, is_token_mixer_parameter

    trained = train_only(lam, is_token_mixer_parameter, "token mixers")
    if not trained:
        raise SystemExit("--train-only-token-mixers: no parameter of the model has one of "
                         f"{TOKEN_MIXER_NAMES_TEXT} in its name")
    return trained


def train(args, texts: list[str], sentences: list[str], passages: list[str] = (), argv=None,
          stsb_train: list[str] = ()) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import batch_to_device

    try:  # sentence-transformers >= 6.3 keeps the losses under sentence_transformer
        from sentence_transformers.sentence_transformer import losses
    except ImportError:
        from sentence_transformers import losses

    from lam_embed.environment import git_commit
    from lam_embed.model_card import attach_model_card
    from lam_embed.release import save_release
    from lam_embed.sentence_transformer import pooling_mode, replace_transformer_model, set_pooling
    from lam_embed.teacher import resolve_teacher_path

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = SentenceTransformer(args.model, device=str(device))
    lam = model[0].auto_model
    if getattr(lam.config, "model_type", None) != "lam":
        raise SystemExit(f"--model: {args.model} is not a LAM model (model_type {lam.config.model_type!r})")
    model.max_seq_length = args.max_tokens + 2  # [CLS] and [SEP]
    lam.config.delta_impl = args.delta_impl
    if args.position_overflow is not None:
        lam.config.position_overflow = args.position_overflow
    if args.token_repeat_cap is not None:
        lam.config.token_repeat_cap = args.token_repeat_cap or None
    if args.outlier_pooling_temperature is not None:
        lam.config.outlier_pooling_temperature = args.outlier_pooling_temperature or None
    if args.pooling is not None:
        set_pooling(model, args.pooling)
    long_inputs_only = args.long_input_min_tokens is not None
    gate_only = args.pooling_gate and args.lr == 0  # no gradient reaches the layers at all
    if long_inputs_only:
        if lam.config.long_input_min_tokens is None:
            lam = lam.with_long_input_layers(args.long_input_min_tokens)
            replace_transformer_model(model, lam)
        elif lam.config.long_input_min_tokens != args.long_input_min_tokens:
            raise SystemExit(f"--long-input-min-tokens {args.long_input_min_tokens}: {args.model} reads inputs of "
                             f"more than {lam.config.long_input_min_tokens} tokens with long-input layers already")
    if args.pooling_gate and lam.config.pooling_gate_min_tokens is None:
        lam = lam.with_pooling_gate(args.long_input_min_tokens)
        replace_transformer_model(model, lam)
    elif args.pooling_gate and lam.config.pooling_gate_min_tokens != args.long_input_min_tokens:
        raise SystemExit(f"--pooling-gate: {args.model} has a pooling gate from {lam.config.pooling_gate_min_tokens} "
                         f"tokens, not --long-input-min-tokens {args.long_input_min_tokens}")
    dropout = lam.config.hidden_dropout_prob if args.dropout is None else args.dropout
    set_dropout(model, dropout)
    teacher = SentenceTransformer(resolve_teacher_path(args.teacher), device=str(device)).eval()
    teacher.requires_grad_(False)
    tokenizer = model.tokenizer

    def count_tokens(batch: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]]

    pairs = []
    if args.paraphrase_queries:
        pairs = load_or_mine_pairs(out, args.resume, lambda: paraphrase_pairs(
            teacher, sentences, args.paraphrase_queries, *args.paraphrase_similarity, seed=args.seed))
        logger.info("%d related sentence pairs for the inserted examples' queries", len(pairs))
        if len(pairs) < 2:
            raise SystemExit(f"--paraphrase-queries: {len(pairs)} pairs within --paraphrase-similarity "
                             f"{args.paraphrase_similarity[0]} {args.paraphrase_similarity[1]}; draw more sentences "
                             "or widen the range")
    examples = DocumentQueryExamples(texts, count_tokens, args.min_tokens, args.max_tokens, args.seed,
                                     args.inserted_share, pairs)
    if not args.train_embeddings:
        lam.embeddings.requires_grad_(False)
    if args.train_only_token_mixers:
        freeze_all_but_token_mixers(lam)
    if long_inputs_only:
        trained_parts = {} if gate_only else {"long_input_layers.": "long-input layers"}
        if args.pooling_gate:
            trained_parts["pooling_gate."] = "pooling gate"
        prefixes, trained_what = tuple(trained_parts), " and ".join(trained_parts.values())
        train_only(lam, lambda name: name.startswith(prefixes), trained_what)
    ranking = (losses.MultipleNegativesRankingLoss(model, scale=args.scale) if args.mini_batch_size is None else
               losses.CachedMultipleNegativesRankingLoss(model, scale=args.scale, mini_batch_size=args.mini_batch_size))
    keep_short = losses.MSELoss(model)
    # The gate's own rate and gradient clipping: its few values would otherwise take the
    # layers' rate (too slow from zero) or most of their clipped gradient norm.
    gate = list(lam.pooling_gate.parameters()) if args.pooling_gate else []
    gate_ids = {id(g) for g in gate}
    layers = [p for p in model.parameters() if p.requires_grad and id(p) not in gate_ids]
    optimizer = torch.optim.AdamW([*([{"params": layers}] if layers else []),
                                   *([{"params": gate, "lr": args.pooling_gate_lr, "weight_decay": 0.0}] if gate else [])],
                                  lr=args.lr, weight_decay=0.01)
    warmup = max(1, int(args.warmup * args.steps))
    total_steps = args.steps + args.short_text_tail_steps

    def schedule(step: int) -> float:
        if args.short_text_tail_steps and step >= args.steps:  # the short-text tail
            return args.short_text_tail_lr / args.lr * (1 - (step - args.steps) / args.short_text_tail_steps)
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    step, history, elapsed = 0, [], 0.0
    checkpoint = out / CHECKPOINT
    if args.resume:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, history, elapsed = state["step"], state["history"], state["elapsed"]
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], device)  # dropout masks on the GPU
        logger.info("resumed at step %d", step)

    def features(texts_: list[str]) -> dict:
        return batch_to_device(model.tokenize(texts_), device)

    def passage_features(texts_: list[str]) -> dict:
        return batch_to_device(dict(tokenizer(texts_, padding=True, truncation=True, max_length=PASSAGE_TOKENS,
                                              return_tensors="pt")), device)

    def teacher_embeddings(texts_: list[str], max_length: int | None = None):
        saved = teacher.max_seq_length
        teacher.max_seq_length = max_length or saved
        try:
            # encode runs in inference mode; a clone is a tensor autograd may read.
            return teacher.encode(texts_, convert_to_tensor=True, batch_size=len(texts_)).float().clone()
        finally:
            teacher.max_seq_length = saved

    def save(finished: bool) -> None:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict(), "step": step, "history": history,
                 "elapsed": elapsed + time.time() - started, "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None, "finished": finished}
        tmp = checkpoint.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, checkpoint)  # a run killed mid-save keeps the previous checkpoint

    started = time.time()
    model.train()
    if long_inputs_only:  # the frozen layers read the queries as at inference (no dropout)
        lam.embeddings.eval()
        lam.layers.eval()
    if gate_only:
        lam.eval()
    sentence_rng = random.Random(args.seed)
    progress = tqdm(total=total_steps, initial=step, desc="long-document stage", unit="step")
    while step < total_steps:
        sentence_rng.seed(args.seed * 7919 + step)
        short = []
        if not long_inputs_only:  # sentences would reach the frozen layers only
            short_texts = short_text_batch(sentence_rng, sentences, stsb_train, args.sentence_batch_size,
                                           args.stsb_train_fraction)
            short.append((features(short_texts), teacher_embeddings(short_texts)))
        # The short-text tail: the sentence term only (with the passage term too it left STS-B
        # where the stage had taken it; docs/long-documents.md).
        in_tail = step >= args.steps
        with_passages = bool(passages) and not in_tail
        if with_passages:
            passage_texts = sentence_rng.sample(passages, min(args.passage_batch_size, len(passages)))
            short.append((passage_features(passage_texts), teacher_embeddings(passage_texts, PASSAGE_TOKENS)))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            triples = None if in_tail else [features(texts_) for texts_ in examples.batch(step, args.batch_size)]
            loss, rank_loss, short_losses = stage_loss(ranking, keep_short, triples, short, args.short_text_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for group in optimizer.param_groups:
            torch.nn.utils.clip_grad_norm_(group["params"], 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        record = {"step": step, "ranking_loss": None if rank_loss is None else round(rank_loss.item(), 5),
                  "lr": scheduler.get_last_lr()[0]}
        if not long_inputs_only:
            record["short_text_loss"] = round(short_losses[0].item(), 6)
        if with_passages:
            record["passage_loss"] = round(short_losses[-1].item(), 6)
        if gate:
            record["pooling_gate_norm"] = round(lam.pooling_gate.weight.norm().item(), 5)
        history.append(record)
        progress.update(1)
        progress.set_postfix(rank="tail" if rank_loss is None else f"{rank_loss.item():.3f}",
                             **{"short": f"{short_losses[0].item():.4f}"} if short_losses else {})
        stop = args.stop_after_minutes is not None and time.time() - started > 60 * args.stop_after_minutes
        if step % args.save_every == 0 or stop or step == total_steps:
            save(step == total_steps)
        if stop and step < total_steps:
            logger.info("stopped after %.1f minutes at step %d; continue with --resume", args.stop_after_minutes, step)
            return {"finished": False, "step": step}
    progress.close()
    model.eval()
    lam.config.delta_impl = "auto"
    minutes = (elapsed + time.time() - started) / 60
    manifest = {
        "command": "python scripts/train_longdoc.py " + " ".join(run_arguments(sys.argv[1:] if argv is None else argv)),
        "commit": git_commit() or "unknown",
        "started_from": args.model,
        "data": {"articles": args.articles, "squality": args.squality or None, "texts": len(texts),
                 "sentences": args.sentences if sentences else None,
                 "short_texts": 0 if long_inputs_only else len(sentences),
                 "paraphrase_pairs": len(pairs),
                 "paraphrase_similarity": list(args.paraphrase_similarity) if pairs else None,
                 "passages": args.passages if passages else None, "passage_texts": len(passages),
                 "stsb_train_sentences": len(stsb_train), "stsb_train_fraction": args.stsb_train_fraction},
        "pooling": pooling_mode(model), "token_repeat_cap": lam.config.token_repeat_cap,
        "token_weights_min_tokens": lam.config.token_weights_min_tokens,
        "outlier_pooling_temperature": lam.config.outlier_pooling_temperature, "inserted_share": args.inserted_share,
        "dropout": dropout, "batch_size": args.batch_size, "mini_batch_size": args.mini_batch_size,
        "pooling_gate_min_tokens": lam.config.pooling_gate_min_tokens,
        "pooling_gate_lr": args.pooling_gate_lr if args.pooling_gate else None,
        "trained": (trained_what if long_inputs_only else
                    "token mixers" if args.train_only_token_mixers else "all layers"),
        "long_input_min_tokens": lam.config.long_input_min_tokens,
        "steps": step, "short_text_tail_steps": args.short_text_tail_steps,
        "short_text_tail_lr": args.short_text_tail_lr if args.short_text_tail_steps else None,
        "train_minutes": round(minutes, 1),
        "final_losses": history[-1] if history else None,
    }
    attach_model_card(model, manifest)  # the card of the model loaded from --model would be kept
    model.save(str(out / "sentence-transformer"))
    save_release(lam, out / "release", manifest, teacher=resolve_teacher_path(args.teacher))
    (out / "history.json").write_text(json.dumps(history) + "\n")
    logger.info("done: %d steps in %.1f minutes; model in %s", step, minutes, out / "sentence-transformer")
    return {"finished": True, "step": step, "train_minutes": minutes, **(history[-1] if history else {})}
