"""Distil a LAM encoder from its teacher (all-MiniLM-L6-v2).

Two stages, one run:
1. attention transfer: every layer's DeltaNet block learns to reproduce the
   teacher's attention block (output after residual and LayerNorm) given the
   teacher's hidden states; all layers train in parallel, everything else frozen.
2. end to end: the student's sentence embedding follows the teacher's (cosine
   loss) and its hidden states follow the teacher's (token MSE); optionally
   (``--similarity-weight``) so do the cosine similarities between the sentences of
   a batch. Embeddings and FFNs stay frozen (but for the top ``--train-ffn-layers``
   FFNs), so the release folder holds the DeltaNets, LayerNorms and those FFNs.

With ``--ema-decay`` an exponential moving average of the weights is kept through
stage 2; the log shows the STS-B dev figure of both, and the average is what is saved.

Data: unlabelled sentences, a quarter of each batch (``--stsb-train-fraction``) from
the sentences of STS-B train (their text only: the student meets the benchmark's
genres: news headlines, image captions, forum posts), plus passages longer than one
128-token chunk every ``--passage-every`` steps so that the fast and slow states are
trained. The last ``--passage-holdout`` passages of the file are never read: they
are the held-out set of ``evaluation/passages.py``.

The shipped weights average two runs of this script (``scripts/average_releases.py``;
the README's "Distillation" gives the commands).

Checkpoints go to ``--output-dir`` every ``--save-every`` steps and when the time
budget (``--stop-after-minutes``) runs out; ``--resume`` continues from the last one
and, with the same seed, sees the same batches as an uninterrupted run.

Under ``torchrun --nproc-per-node N`` the run is shared by N processes
(``training/distributed.py``): each takes an equal share of every batch, its losses are
shares of the whole batch's (the similarity term is computed over the whole batch in each),
and the gradients are summed before the step; the first process evaluates, logs and writes.
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
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

import lam_embed
from lam_embed.cli import DefaultsHelpFormatter
from lam_embed.data import default_data_dir, read_stsb_pairs, read_text_lines, stsb_train_sentences
from lam_embed.environment import git_commit
from lam_embed.release import save_release

from . import set_dropout
from .distributed import Processes, start, stop

logger = logging.getLogger("distill")


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalised mean of the valid token vectors, as sentence-transformers' Pooling + Normalize."""
    m = mask[..., None].to(hidden.dtype)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1)


class Teacher:
    """The teacher's hidden states and attention-block outputs of each layer."""

    def __init__(self, path: str, device: torch.device):
        # float32 master weights even when the teacher's copy is fp16; autocast does the rest.
        self.model = AutoModel.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).to(device).eval()
        self.model.requires_grad_(False)
        self.attention_outputs: list[torch.Tensor] = []
        for layer in self.model.encoder.layer:
            layer.attention.register_forward_hook(self._keep_attention_output)

    def _keep_attention_output(self, module, args, output):
        self.attention_outputs.append(output[0] if isinstance(output, tuple) else output)

    @torch.no_grad()
    def __call__(self, batch: dict) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Returns (layer inputs x_0..x_5, attention-block outputs h_1..h_6, sentence embedding)."""
        self.attention_outputs = []
        out = self.model(**batch, output_hidden_states=True)
        hidden = [h.float() for h in out.hidden_states]
        attention = [h.float() for h in self.attention_outputs]
        return hidden, attention, mean_pool(hidden[-1], batch["attention_mask"])


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error over the valid tokens; ``tokens``: the count to divide by when it
    is not this batch's (the global batch's, when this process holds a share of it)."""
    m = mask[..., None].to(a.dtype)
    return ((a - b).pow(2) * m).sum() / ((m.sum() if tokens is None else tokens) * a.shape[-1])


@dataclass
class Batches:
    """A deterministic stream of tokenised batches: step n always gives the same batch.

    A sentence batch takes ``round(batch_size * extra_fraction)`` of its sentences from
    ``extra`` (the STS-B train sentences, with --stsb-train-fraction) and the rest from
    ``sentences``; each pool is shuffled once per pass over it."""

    sentences: list[str]
    passages: list[str]
    tokenizer: object
    batch_size: int
    passage_batch_size: int
    passage_every: int
    max_length: int
    passage_max_length: int
    seed: int
    extra: list[str] = field(default_factory=list)
    extra_fraction: float = 0.0
    passage_crop: float = 0.0
    _orders: dict = field(default_factory=dict)

    def _order(self, kind: int, n_items: int, epoch: int) -> list[int]:
        # Shuffling 700k indices takes a while: keep the current permutation of each kind.
        key = (kind, epoch)
        if key not in self._orders:
            order = list(range(n_items))
            random.Random(self.seed * 1000 + epoch + 7919 * kind).shuffle(order)
            self._orders = {k: v for k, v in self._orders.items() if k[0] != kind}
            self._orders[key] = order
        return self._orders[key]

    def _take(self, kind: int, items: list[str], size: int, index: int) -> list[str]:
        """The index-th batch of ``size`` items of one pool."""
        per_epoch = max(len(items) // size, 1)
        epoch, position = divmod(index, per_epoch)
        order = self._order(kind, len(items), epoch)
        return [items[i] for i in order[position * size:(position + 1) * size]]

    def _crop(self, text: str, rng: random.Random) -> str:
        """A random run of consecutive words of ``text``, at least ``passage_crop`` of them:
        each pass over the passages then shows other windows and lengths, not the same texts again."""
        words = text.split()
        keep = rng.randint(math.ceil(len(words) * self.passage_crop), len(words))
        start = rng.randint(0, len(words) - keep)
        return " ".join(words[start:start + keep])

    def texts(self, step: int) -> tuple[list[str], int]:
        use_passages = self.passages and self.passage_every > 0 and step % self.passage_every == self.passage_every - 1
        # Which batch of this kind this is, counted over the whole run.
        if self.passages and self.passage_every > 0:
            index = step // self.passage_every if use_passages else step - (step + 1) // self.passage_every
        else:
            index = step
        if use_passages:
            chosen = self._take(1, self.passages, self.passage_batch_size, index)
            if self.passage_crop:
                rng = random.Random(self.seed * 1_000_003 + step)
                chosen = [self._crop(text, rng) for text in chosen]
            return chosen, self.passage_max_length
        n_extra = round(self.batch_size * self.extra_fraction) if self.extra else 0
        chosen = self._take(0, self.sentences, self.batch_size - n_extra, index)
        if n_extra:
            chosen += self._take(2, self.extra, n_extra, index)
        return chosen, self.max_length

    def __call__(self, step: int, device: torch.device, processes: Processes = Processes()) -> dict:
        """Batch ``step``, tokenised: this process's share of its rows, padded as the whole
        batch is."""
        texts, max_length = self.texts(step)
        # Lengths rounded up to a multiple of 16: few distinct shapes, so the GPU libraries'
        # per-shape set-up (kernel selection) is paid a few times, not at every step.
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                               pad_to_multiple_of=16, return_tensors="pt")
        rows = processes.share(len(texts))
        return {k: v[rows].to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def stsb_spearman(model, tokenizer, pairs, device, batch_size: int = 256) -> float:
    """Spearman of cosine similarity on STS-B pairs (the full evaluation is evaluation/stsb.py)."""
    s1, s2, scores = pairs
    model.eval()

    def encode(texts):
        out = []
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt").to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                hidden = model(**batch).last_hidden_state
            out.append(mean_pool(hidden.float(), batch["attention_mask"]))
        return torch.cat(out)

    cos = (encode(s1) * encode(s2)).sum(-1).cpu().numpy()
    return float(spearmanr(cos, scores).statistic)


def parameter_groups(model, stage: int, args) -> list[dict]:
    """Stage 1 trains the DeltaNets; stage 2 also the LayerNorms and the FFNs of the top
    ``--train-ffn-layers`` layers, at a lower rate (they start from the teacher's)."""
    first_ffn = model.config.num_hidden_layers - args.train_ffn_layers
    delta = [p for n, p in model.named_parameters() if ".delta_net." in n]
    norms = [p for n, p in model.named_parameters() if "layers." in n and ("attention_norm" in n or "ffn_norm" in n)]
    norms += [p for i, layer in enumerate(model.layers) if i >= first_ffn
              for p in (*layer.ffn_in.parameters(), *layer.ffn_out.parameters())]
    model.requires_grad_(False)
    for p in delta:
        p.requires_grad_(True)
    if stage == 1:
        return [{"params": delta, "lr": args.lr_stage1}]
    for p in norms:
        p.requires_grad_(True)
    return [{"params": delta, "lr": args.lr_stage2}, {"params": norms, "lr": args.lr_stage2 * args.norm_lr_scale}]


def make_optimizer(model, stage: int, args, steps: int):
    optimizer = torch.optim.AdamW(parameter_groups(model, stage, args), weight_decay=args.weight_decay)
    warmup = max(int(steps * args.warmup_ratio), 1)

    def schedule(step: int) -> float:  # linear warm-up, cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def stage1_loss(student, teacher_hidden, teacher_attention, mask, tokens=None):
    """Each student attention block, fed the teacher's layer input, against the teacher's
    block output (``tokens``: as masked_mse)."""
    losses = [
        masked_mse(layer.mix(teacher_hidden[i], mask), teacher_attention[i], mask, tokens)
        for i, layer in enumerate(student.layers)
    ]
    return torch.stack(losses).mean()


def stage2_loss(student, batch, teacher_hidden, teacher_embedding, hidden_weight: float, similarity_weight: float,
                processes: Processes = Processes(), tokens=None):
    """Cosine to the teacher's embedding, plus the in-batch similarity matrix against the
    teacher's (what STS measures: how sentences relate, not only where each one lies),
    plus the hidden states. Returns (loss, cosine term, hidden term, similarity term).

    With several processes (``tokens``: the global batch's valid tokens) the cosine and
    hidden terms are this process's share of the global batch's, and the similarity term is
    the global batch's matrix with this process's rows attached to its graph."""
    out = student(**batch, output_hidden_states=True)
    mask = batch["attention_mask"]
    embedding = mean_pool(out.last_hidden_state.float(), mask)
    cosine = (1 - (embedding * teacher_embedding).sum(-1)).sum() / (embedding.shape[0] * processes.world)
    everyone, teachers = processes.gather_rows(embedding), processes.gather_rows(teacher_embedding)
    similarity = F.mse_loss(everyone @ everyone.T, teachers @ teachers.T)
    hidden = torch.stack([
        masked_mse(s.float(), t, mask.bool(), tokens) for s, t in zip(out.hidden_states[1:], teacher_hidden[1:])
    ]).mean()
    return cosine + similarity_weight * similarity + hidden_weight * hidden, cosine, hidden, similarity


def make_ema(student, decay: float):
    """An exponential moving average of the student's weights (torch's AveragedModel)."""
    return AveragedModel(student, multi_avg_fn=get_ema_multi_avg_fn(decay))


def save_checkpoint(path: Path, student, optimizer, scheduler, step: int, stage: int, history: list, elapsed: float,
                    ema=None):
    tmp = path.with_suffix(".tmp")
    torch.save({
        "model": student.state_dict(), "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "step": step, "stage": stage, "history": history, "elapsed": elapsed,
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }, tmp)
    os.replace(tmp, path)  # a run killed mid-save keeps the previous checkpoint


def build_parser() -> argparse.ArgumentParser:
    data = default_data_dir()
    p = argparse.ArgumentParser(
        description="Distil a LAM encoder from all-MiniLM-L6-v2 (attention transfer, then end to end).",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--teacher", default=None, help="teacher folder or hub name (default: all-MiniLM-L6-v2, offline copy when the hub is unreachable)")
    p.add_argument("--sentences", default=str(data / "corpus/sentences.txt.gz") if data else None,
                   help="text file (.txt or .txt.gz) of training sentences, one per line")
    p.add_argument("--passages", default=str(data / "corpus/passages.txt.gz") if data else None,
                   help="text file of passages longer than one chunk; empty string for none")
    p.add_argument("--stsb", default=str(data / "stsb") if data else None, help="folder of the STS-B csv files: the dev figure in the log, and the sentences of --stsb-train-fraction")
    p.add_argument("--max-sentences", type=int, default=0, help="use the first N sentences of the file (0: all)")
    p.add_argument("--stsb-train-fraction", type=float, default=0.25,
                   help="fraction of each sentence batch drawn from the sentences of STS-B train (sts-train.csv in --stsb; "
                   "text only, the scores are never read), so that the student sees the benchmark's genres (news "
                   "headlines, captions, forums); 0: none")
    p.add_argument("--max-dev-pairs", type=int, default=0, help="use at most this many STS-B dev pairs for the logged figure (0: all 1,500)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="dropout inside the student while distilling (the saved config keeps the teacher's)")
    p.add_argument("--max-passages", type=int, default=0, help="use the first N passages of the file (0: all but the held-out ones)")
    p.add_argument("--passage-holdout", type=int, default=1000, help="the last N passages of the file are never used for training")
    p.add_argument("--output-dir", default="runs/distill", help="checkpoints, log and the final model go here")
    p.add_argument("--stage1-steps", type=int, default=400, help="steps of attention transfer")
    p.add_argument("--stage2-steps", type=int, default=3000,
                   help="steps of end-to-end distillation (the release averages a 3000-step and a 6000-step run)")
    p.add_argument("--batch-size", type=int, default=256, help="sentences per batch")
    p.add_argument("--passage-batch-size", type=int, default=32, help="passages per passage batch")
    p.add_argument("--passage-every", type=int, default=2,
                   help="every N-th step is a passage batch (0: never)")
    p.add_argument("--passage-crop", type=float, default=0.0,
                   help="cut each passage of a batch to a random run of consecutive words, at least this fraction of "
                   "them (0: whole passages): new windows and lengths on every pass over the passages")
    p.add_argument("--max-length", type=int, default=128, help="token limit of a sentence")
    p.add_argument("--passage-max-length", type=int, default=512, help="token limit of a passage (teacher and student)")
    p.add_argument("--lr-stage1", type=float, default=2e-3, help="peak learning rate of stage 1")
    p.add_argument("--lr-stage2", type=float, default=5e-4, help="peak learning rate of the DeltaNets in stage 2")
    p.add_argument("--norm-lr-scale", type=float, default=0.1, help="learning rate of the LayerNorms and FFNs as a fraction of --lr-stage2")
    p.add_argument("--train-ffn-layers", type=int, default=0, help="stage 2 also trains the FFNs of this many top layers (released weights grow by 2.3 MB a "
                   "layer)")
    p.add_argument("--similarity-weight", type=float, default=0.0,
                   help="weight of the in-batch similarity-matrix MSE in stage 2 (its raw value is about 50 times smaller than the cosine loss); 0 turns it off")
    p.add_argument("--hidden-weight", type=float, default=0.1, help="weight of the hidden-state MSE beside the cosine loss in stage 2")
    p.add_argument("--ema-decay", type=float, default=0.0,
                   help="keep an exponential moving average of the weights through stage 2 with this decay per step "
                   "(e.g. 0.999) and save it as the result; 0: off, the last weights are saved")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--warmup-ratio", type=float, default=0.05, help="fraction of each stage's steps spent warming up")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient norm clip")
    p.add_argument("--delta-impl", default="chunk", choices=lam_embed.backends.BACKEND_NAMES, help="implementation of the DeltaNet while training ('triton' recomputes its backward with 'chunk', so 'chunk' trains fastest)")
    p.add_argument("--log-every", type=int, default=50, help="record the loss and gradient norm every N steps")
    p.add_argument("--eval-every", type=int, default=500, help="log STS-B dev Spearman every N steps (0: only at the end)")
    p.add_argument("--save-every", type=int, default=1000, help="save a checkpoint every N steps")
    p.add_argument("--stop-after-minutes", type=float, default=0, help="save and stop after this much training time (0: no limit); --resume continues")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --output-dir")
    p.add_argument("--seed", type=int, default=42, help="random seed (initialisation and data order)")
    p.add_argument("--no-tf32", action="store_true", help="keep float32 matrix products in full precision on CUDA (slower); TF32 is used otherwise")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="device to train on")
    return p


def read_training_data(args) -> tuple[list[str], list[str], tuple, list[str]]:
    """Sentences, training passages, STS-B dev pairs and STS-B train sentences, as the
    options ask; ValueError or OSError naming the option and the file when one is missing,
    empty or not UTF-8 text."""
    try:
        sentences = read_text_lines(args.sentences, limit=args.max_sentences or None)
    except (OSError, ValueError) as err:
        raise ValueError(f"--sentences: {err}") from None
    if not sentences:
        raise ValueError(f"--sentences: {args.sentences} holds no sentence")
    passages = []
    if args.passages:
        try:
            passages = read_text_lines(args.passages)
        except (OSError, ValueError) as err:
            raise ValueError(f"--passages: {err}") from None
        if len(passages) <= args.passage_holdout:
            raise ValueError(f"--passages: {args.passages} has {len(passages)} passages, not more than "
                             f"--passage-holdout {args.passage_holdout}")
        passages = passages[: len(passages) - args.passage_holdout]
        if args.max_passages:
            passages = passages[: args.max_passages]
    try:
        dev = read_stsb_pairs(Path(args.stsb) / "sts-dev.csv")
        extra = []
        if args.stsb_train_fraction:
            extra = stsb_train_sentences(args.stsb)
    except (OSError, ValueError) as err:
        raise ValueError(f"--stsb: {err}") from None
    if args.max_dev_pairs:
        dev = tuple(column[: args.max_dev_pairs] for column in dev)
    return sentences, passages, dev, extra


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for name, value in (("--sentences", args.sentences), ("--stsb", args.stsb)):
        if not value:
            parser.error(f"{name} is required: no data folder found (set LAM_DATA_DIR or pass the path)")
    positive = ("batch_size", "passage_batch_size", "max_length", "passage_max_length", "save_every", "log_every")
    for name in positive:
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_sentences", "max_passages", "max_dev_pairs", "passage_every", "passage_holdout", "eval_every",
                 "train_ffn_layers"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0 <= args.stsb_train_fraction < 1:
        raise SystemExit(f"--stsb-train-fraction must be in [0, 1), got {args.stsb_train_fraction}")
    if not 0 <= args.passage_crop <= 1:
        raise SystemExit(f"--passage-crop must be in [0, 1], got {args.passage_crop}")
    if not 0 <= args.ema_decay < 1:
        raise SystemExit(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.stage1_steps < 0 or args.stage2_steps < 0 or args.stage1_steps + args.stage2_steps == 0:
        raise SystemExit("--stage1-steps and --stage2-steps must be >= 0 and not both 0")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for name in ("batch_size", "passage_batch_size"):
        if getattr(args, name) % world:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} does not divide among the {world} "
                         "processes: each takes an equal share of every batch")
    # The data first: a missing or empty file is an error before any model loads.
    try:
        data = read_training_data(args)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    processes, device = start(args.device)
    try:
        return train(args, data, processes, device, argv)
    finally:
        stop(processes)


def train(args, data: tuple, processes: Processes, device: torch.device, argv=None) -> dict:
    """The run of ``main`` in this process (one of ``processes``; the first writes the
    files): ``data`` as read_training_data returns it."""
    if not processes.main:
        logger.setLevel(logging.WARNING)
    if device.type == "cuda" and not args.no_tf32:
        # The delta rule's float32 products dominate a step; TF32 makes them several times
        # faster, and training does not need their last bits (inference keeps full fp32).
        torch.backends.cuda.matmul.allow_tf32 = True
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out_dir / "checkpoint.pt"
    torch.manual_seed(args.seed)

    sentences, passages, dev, extra = data
    teacher_path = lam_embed.resolve_teacher_path(args.teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    tokenizer.padding_side = "right"
    teacher = Teacher(teacher_path, device)
    student = lam_embed.from_teacher(teacher_path, delta_impl=args.delta_impl).to(device)
    set_dropout(student, args.dropout)
    if not processes.main:
        torch.manual_seed(args.seed + 1_000_003 * processes.rank)  # dropout: other masks for other rows

    logger.info("data: %d sentences, %d passages, %d STS-B train sentences, %d dev pairs",
                len(sentences), len(passages), len(extra), len(dev[0]))
    batches = Batches(sentences, passages, tokenizer, args.batch_size, args.passage_batch_size, args.passage_every,
                      args.max_length, args.passage_max_length, args.seed, extra, args.stsb_train_fraction,
                      args.passage_crop)

    total = args.stage1_steps + args.stage2_steps
    step, stage, history, elapsed = 0, 1 if args.stage1_steps else 2, [], 0.0
    state = None
    if args.resume:
        if not checkpoint_path.exists():
            raise SystemExit(f"--resume: no checkpoint at {checkpoint_path}")
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        student.load_state_dict(state["model"])
        step, stage, history, elapsed = state["step"], state["stage"], state["history"], state["elapsed"]
        torch.set_rng_state(state["torch_rng"].cpu())
        if state["cuda_rng"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        logger.info("resumed at step %d (stage %d, %.1f min trained)", step, stage, elapsed / 60)
    stage_steps = args.stage1_steps if stage == 1 else args.stage2_steps
    optimizer, scheduler = make_optimizer(student, stage, args, stage_steps)
    ema = make_ema(student, args.ema_decay) if args.ema_decay and stage == 2 else None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if stage == 2 and (ema is None) != (state.get("ema") is None):
            raise SystemExit("--resume: give the same --ema-decay as the interrupted run (its checkpoint "
                             f"{'has' if state.get('ema') is not None else 'has no'} moving average)")
        if ema is not None:
            ema.load_state_dict(state["ema"])

    use_bf16 = device.type == "cuda"
    start = time.time() - elapsed
    session_start = time.time()
    bar = tqdm(total=total, initial=step, desc=f"stage {stage}", dynamic_ncols=True, disable=not processes.main)
    stopped_early = False
    while step < total:
        if stage == 1 and step >= args.stage1_steps:
            stage = 2
            optimizer, scheduler = make_optimizer(student, 2, args, args.stage2_steps)
            ema = make_ema(student, args.ema_decay) if args.ema_decay else None
            bar.set_description("stage 2")
        student.train()
        batch = batches(step, device, processes)
        # With several processes the losses divide by the whole batch's valid tokens.
        tokens = processes.sum(batch["attention_mask"].sum()) if processes.world > 1 else None
        mask = batch["attention_mask"].bool()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            hidden, attention, teacher_embedding = teacher(batch)
            if stage == 1:
                loss = stage1_loss(student, hidden, attention, mask, tokens)
                cosine = similarity = None
                logged = processes.sum(loss)
            else:
                loss, cosine, hidden_term, similarity = stage2_loss(
                    student, batch, hidden, teacher_embedding, args.hidden_weight, args.similarity_weight,
                    processes, tokens)
                # The shares summed over the processes; the similarity term is whole in each.
                cosine, hidden_term = processes.sum(torch.stack([cosine, hidden_term]))
                logged = cosine + args.similarity_weight * similarity.detach() + args.hidden_weight * hidden_term
        if not torch.isfinite(logged):
            raise RuntimeError(f"loss became {logged.item()} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trained = [p for g in optimizer.param_groups for p in g["params"]]
        processes.sum_gradients(trained)
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, args.grad_clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.update_parameters(student)
        step += 1
        bar.update(1)
        if step % args.log_every == 0:
            record = {"step": step, "stage": stage, "loss": round(logged.item(), 6),
                      "grad_norm": round(grad_norm.item(), 6), "minutes": round((time.time() - start) / 60, 2)}
            if cosine is not None:
                record["cosine_loss"] = round(cosine.item(), 6)
                record["similarity_loss"] = round(similarity.item(), 7)
            bar.set_postfix(loss=record["loss"])
            history.append(record)
        if processes.main and ((args.eval_every and step % args.eval_every == 0) or step == total):
            rho = stsb_spearman(student, tokenizer, dev, device)
            record = {"step": step, "stage": stage, "stsb_dev_spearman": round(rho, 5)}
            if ema is not None:
                # The figure of what will be saved; the last weights' figure stays beside it.
                record["stsb_dev_spearman_last_weights"] = record["stsb_dev_spearman"]
                record["stsb_dev_spearman"] = round(stsb_spearman(ema.module, tokenizer, dev, device), 5)
            history.append(record)
            logger.info("step %d: STS-B dev Spearman %.4f%s", step, record["stsb_dev_spearman"],
                        f" (last weights {rho:.4f})" if ema is not None else "")
        out_of_time = args.stop_after_minutes and time.time() - session_start > args.stop_after_minutes * 60
        if processes.world > 1:  # every process stops at the same step
            out_of_time = bool(processes.sum(torch.tensor(float(bool(out_of_time)), device=device)))
        if (step % args.save_every == 0 or step == total or out_of_time) and processes.main:
            save_checkpoint(checkpoint_path, student, optimizer, scheduler, step, stage, history, time.time() - start, ema)
        if out_of_time and step < total:
            logger.info("time budget reached at step %d; run again with --resume to continue", step)
            stopped_early = True
            break
    bar.close()
    processes.barrier()  # the checkpoint is written before any process returns
    if not processes.main:
        return {"step": step, "total_steps": total, "finished": not stopped_early, "rank": processes.rank}
    summary = {"step": step, "total_steps": total, "finished": not stopped_early,
               "train_minutes": round((time.time() - start) / 60, 2), "history": history,
               "args": vars(args), "commit": git_commit() or "unknown", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    if not stopped_early:
        if ema is not None:
            student = ema.module
        student.config.delta_impl = "auto"
        student.save_pretrained(out_dir / "model")
        tokenizer.save_pretrained(out_dir / "model")
        summary["stsb_dev_spearman"] = next(h["stsb_dev_spearman"] for h in reversed(history) if "stsb_dev_spearman" in h)
        manifest = {k: summary[k] for k in ("commit", "device", "train_minutes", "stsb_dev_spearman", "args")}
        manifest["command"] = "python scripts/distill.py " + " ".join(argv if argv is not None else sys.argv[1:])
        manifest["data"] = {"sentences": len(sentences), "passages": len(passages),
                            "sentences_file": args.sentences, "passages_file": args.passages,
                            "stsb_train_sentences": len(extra), "stsb_train_fraction": args.stsb_train_fraction,
                            "passage_crop": args.passage_crop}
        save_release(student.cpu(), out_dir / "release", manifest, teacher=teacher_path)
        st = lam_embed.build_sentence_transformer(student, tokenizer, manifest=manifest)
        st.save(str(out_dir / "sentence-transformer"))
        logger.info("saved the distilled model to %s and its release weights to %s",
                    out_dir / "sentence-transformer", out_dir / "release")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
