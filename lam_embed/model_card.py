"""The model card (README.md) of an assembled LAM folder, from its release manifest."""

from __future__ import annotations

from .configuration_lam import POOLING_FIELDS

TEACHER = "sentence-transformers/all-MiniLM-L6-v2"


def _percent(value) -> str:
    return f"{100 * value:.2f}" if isinstance(value, int | float) else "-"


DISTILLATION_DATA = ("English sentences and passages for distillation; STS-B dev and test were used only "
                     "to evaluate.")


def model_card(manifest: dict, name: str = "LAM", stsb_setting: str = "CPU, float32", appendix: str = "",
               data: str = DISTILLATION_DATA) -> str:
    """Markdown with a sentence-transformers front matter: what LAM is, how to load it, its
    STS-B figures beside the teacher's (from ``manifest["figures"]``, measured as
    ``stsb_setting`` says), long inputs, limits, training and license; ``appendix`` last."""
    figures = manifest.get("figures", {})
    lam, teacher = figures.get("stsb_cpu_fp32", {}), figures.get("teacher_stsb_cpu_fp32", {})
    passages = figures.get("held_out_passages_cpu", {})
    rows = [
        f"| {name} | {_percent(lam.get('dev_spearman'))} | {_percent(lam.get('test_spearman'))} |",
        f"| all-MiniLM-L6-v2 (teacher) | {_percent(teacher.get('dev_spearman'))} | "
        f"{_percent(teacher.get('test_spearman'))} |",
    ]
    agreement = ""
    if "mean_cosine" in passages:
        agreement = (f"\nOn {passages.get('passages', 'the')} held-out passages of {passages.get('min_tokens')}-"
                     f"{passages.get('max_tokens')} tokens the mean cosine between LAM's and the teacher's "
                     f"embeddings is {passages['mean_cosine']:.3f}.\n")
    speed = _speed_section(figures.get("speed"), name)
    command = manifest.get("command", "not recorded")
    training = "; ".join(f"`{c}`" for c in command) if isinstance(command, list) else f"`{command}`"
    minutes = manifest.get("train_minutes")
    cap = manifest.get("token_repeat_cap")
    pooling_text = (f", in which no token id weighs more than {cap} occurrence{'s' if cap != 1 else ''} "
                    "(`token_repeat_cap` in the config: a long document's frequent tokens would otherwise "
                    "drown a line that occurs once)" if cap else "")
    temperature = manifest.get("outlier_pooling_temperature")
    if temperature:
        pooling_text += (f"; in inputs of more than {manifest.get('outlier_pooling_min_tokens', 512)} tokens each "
                         f"token also weighs exp(-{temperature:g} cos(token, mean)) (`outlier_pooling_temperature`: "
                         "the line that sets a long document apart weighs more than the thousands that agree with its mean)")
    gate_min_tokens = manifest.get("pooling_gate_min_tokens")
    if gate_min_tokens is not None:
        pooling_text += (f"; in inputs of more than {gate_min_tokens} tokens each token also weighs exp(g), g a learned "
                         "logit of its last hidden state (`pooling_gate_min_tokens`), trained on long documents")
    long_figures = figures.get("long_documents")
    stage = ", then on long documents (a sentence from anywhere in a document as the query)" if long_figures else ""
    long_input_min_tokens = manifest.get("long_input_min_tokens")
    if long_input_min_tokens is not None:
        stage += (f". Inputs of more than {long_input_min_tokens} tokens are read by a second set of layers "
                  "(`long_input_min_tokens` in the config), trained on long documents from a copy of the first "
                  "while the first stayed frozen, so shorter inputs keep the first set's embeddings")
    return f"""---
language: en
license: apache-2.0
library_name: sentence-transformers
pipeline_tag: sentence-similarity
base_model: {TEACHER}
tags:
- sentence-transformers
- sentence-similarity
- lam
- linear-attention
---

# {name}: a linear-time sentence encoder

{name} is all-MiniLM-L6-v2 with each softmax self-attention replaced by a dual-state DeltaNet
layer (two delta-rule memories with learned decays, gates and a coupling between them, in
chunks of 128 tokens), so time and memory grow linearly with the input length. Tokenizer and
embeddings are the teacher's; the layers were trained by distillation from {TEACHER}{stage}.
Mean pooling{pooling_text}. 384-dimensional normalised embeddings.

## Load

```bash
pip install torch lam_embed
```

```python
import lam_embed  # registers the "lam" architecture with transformers
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("path/to/this/folder")  # the released model: lam_embed.load()
embeddings = model.encode(["A man is playing a guitar.", "Someone plays an instrument."])
```

No `trust_remote_code` is needed once `lam_embed` is imported; where it is installed but not
imported, `SentenceTransformer("path/to/this/folder", trust_remote_code=True)` loads it too.
Documents of any length:
`lam_embed.encode_document(model, text)`; a growing document: `lam_embed.start_document(model)`.

## Figures

STS-B, Spearman correlation of cosine similarity (x100), {stsb_setting}:

| model | dev | test |
|---|---|---|
{rows[0]}
{rows[1]}
{agreement}{speed}
## Long inputs

There is no length limit: positions past the 512 of the position table reuse it (the
config's `position_overflow`), and the layers carry their memories from chunk to chunk.
{_long_document_section(long_figures, name)}
## Limits

English only, like the teacher. Short texts and non-English texts agree less with the
teacher than English sentences do.

## Training

Commands: {training}{f" ({minutes} minutes)" if minutes is not None else ""}. Data: {data}

## License and citation

Apache-2.0. The teacher: Reimers and Gurevych, "Sentence-BERT: Sentence Embeddings using
Siamese BERT-Networks" (EMNLP 2019), and the all-MiniLM-L6-v2 model of sentence-transformers.
{appendix}"""


def _long_document_section(long_figures: dict | None, name: str) -> str:
    """One pass over long documents beside the teacher's chunk-mean (or what is known without figures)."""
    if not long_figures:
        return ("One pass over a long document retrieves it better than truncating it to 512 tokens, but not\n"
                "yet better than averaging the teacher's embeddings of 512-token chunks.\n")
    columns = long_figures["columns"]
    return (f"Long-document retrieval ({long_figures.get('setting', '')}; QMSum and SQuALITY nDCG@10, passkey and "
            f"needle Acc@1 over 256-32,768 tokens; {long_figures.get('source', '')}):\n\n"
            f"| model | {' | '.join(columns)} |\n|---|{'---|' * len(columns)}\n"
            f"| {name}, one pass | {' | '.join(f'{v:.1f}' for v in long_figures['lam_full'])} |\n"
            f"| all-MiniLM-L6-v2, mean of 512-token chunks | "
            f"{' | '.join(f'{v:.1f}' for v in long_figures['teacher_chunk_mean'])} |\n")


def _speed_section(speed: dict | None, name: str) -> str:
    """Speed beside the teacher, from the manifest's figures (nothing when not recorded)."""
    if not speed:
        return ""
    rows = [f"| {length} | {v['teacher'] / 1e6:.2f}M | {v['lam'] / 1e6:.2f}M | {v['lam'] / v['teacher']:.2f} |"
            for length, v in speed.get("forward_tokens_per_s", {}).items()]
    text = (f"\nSpeed ({speed.get('gpu', 'GPU')}; {speed.get('source', '')}):\n\n"
            f"| tokens | all-MiniLM-L6-v2 | {name} | ratio |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    cpu = speed.get("cpu_sentences_per_s")
    if cpu:
        text += (f"\nCPU ({speed.get('cpu', '')}): all-MiniLM-L6-v2 {cpu['teacher']}, {name} {cpu['lam']} "
                 f"({cpu['lam'] / cpu['teacher']:.2f}x).\n")
    return text


def finetuned_model_card(base_manifest: dict, stsb: dict, command: str, setting: str, train_data: str,
                         trainer_card: str = "") -> str:
    """The card of a fine-tuned LAM: the base model's card (teacher figures, speed) with the
    fine-tuned STS-B figures (``stsb``: {split: {"spearman": ...}}, measured as ``setting``
    says), ``command`` and ``train_data``; sentence-transformers' own card of the training
    run (``trainer_card``: losses, data, hyperparameters) follows as an appendix."""
    figures = dict(base_manifest.get("figures", {}))
    figures["stsb_cpu_fp32"] = {"dev_spearman": stsb.get("validation", {}).get("spearman"),
                                "test_spearman": stsb.get("test", {}).get("spearman")}
    if "teacher_stsb_cpu_fp32" in figures:
        setting += "; the teacher's row is its own, as released (CPU, float32)"
    for measured_on_the_base in ("held_out_passages_cpu", "long_documents"):
        figures.pop(measured_on_the_base, None)
    manifest = {"figures": figures, "command": [*_as_list(base_manifest.get("command")), command],
                **{k: base_manifest[k] for k in POOLING_FIELDS if k in base_manifest}}
    body = trainer_card.split("\n---\n", 1)[1] if trainer_card.startswith("---\n") else trainer_card
    appendix = f"\n## Fine-tuning run (sentence-transformers' record)\n\n{body.strip()}\n" if body.strip() else ""
    data = (f"English sentences and passages for distillation, then {train_data} for fine-tuning; the "
            "checkpoint kept is the one with the best STS-B dev figure, and STS-B test was used only to evaluate.")
    return model_card(manifest, name="LAM (fine-tuned)", stsb_setting=setting, appendix=appendix, data=data)


def _as_list(command) -> list:
    return command if isinstance(command, list) else [command] if command else []


def attach_model_card(st, manifest: dict) -> None:
    """Make ``st.save()`` write LAM's card from ``manifest`` instead of sentence-transformers'
    generic template. sentence-transformers writes the card text it loaded with a model
    (``_model_card_text``) unless its trainer has trained the model since; this sets that text."""
    st._model_card_text = model_card(manifest)
