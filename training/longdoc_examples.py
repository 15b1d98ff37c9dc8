"""The long-document stage's training examples: long texts read from JSON lines, and a
deterministic stream of (query, document, hard negative) triples drawn from them, with
related sentence pairs mined by the teacher for queries that are not copies of their line."""

from __future__ import annotations

import gzip
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from lam_embed.data import split_sentences
from lam_embed.environment import write_json

QUERY_WORDS = (6, 60)  # the length of a sentence that can be a query, in words


def is_query_length(sentence: str) -> bool:
    return QUERY_WORDS[0] <= len(sentence.split()) <= QUERY_WORDS[1]


def read_long_texts(path: str | Path, split: str | None = None) -> list[str]:
    """The "text" of each JSON line of a .jsonl or .jsonl.gz file, keeping only lines whose
    "split" is ``split`` when it is given (SQuALITY: train only, never dev or test)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    texts = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {number}: not JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}, line {number}: expected an object with a \"text\" string")
            if split is None or record.get("split") == split:
                texts.append(record["text"])
    if not texts:
        raise ValueError(f"{path}: no texts" + (f" of split {split!r}" if split else ""))
    return texts


@dataclass
class DocumentQueryExamples:
    """A deterministic stream of (query, document, hard negative) triples: batch n is always
    the same, so a resumed run sees what an uninterrupted one saw.

    texts: the long texts; count_tokens: tokens of a list of sentences (the model's
    tokenizer, without special tokens), called once per text and kept with its sentences
    and the positions of those of query length.

    Two kinds of example, ``inserted_share`` of them the second:
    - own sentence: a window of one text is the document, one of its sentences the query,
      the window without that sentence the hard negative;
    - inserted sentence: a sentence of another text is inserted at a random sentence
      boundary of the window and is the query; the hard negative is a window of the same
      text from another random offset with a sentence of yet another text inserted. Documents
      then differ by where their text was cut as well as by one sentence that is not about
      their text, and the document embedding has to keep that sentence against both.

    With ``pairs`` (two related sentences each, see paraphrase_pairs), an inserted example
    inserts one sentence of a pair and queries with the other, and the hard negative holds a
    sentence of another pair: the query is then related to the line it finds, as a question
    is to a fact, instead of a copy of it."""

    texts: list[str]
    count_tokens: object
    min_tokens: int
    max_tokens: int
    seed: int
    inserted_share: float = 0.0
    pairs: list[tuple[str, str]] = ()
    _sentences: dict = field(default_factory=dict)
    _pair_tokens: dict = field(default_factory=dict)

    def sentences(self, index: int) -> tuple[list[str], list[int], list[int]]:
        """The text's sentences, their tokens and the positions of those of query length."""
        if index not in self._sentences:
            sentences = split_sentences(self.texts[index])
            queries = [i for i, s in enumerate(sentences) if is_query_length(s)]
            self._sentences[index] = (sentences, self.count_tokens(sentences), queries)
        return self._sentences[index]

    @staticmethod
    def _window(rng: random.Random, tokens: list[int], target: float) -> tuple[int, int]:
        """(start, end) of consecutive sentences from a random start, at most ``target`` tokens."""
        start = rng.randrange(len(tokens))
        end, total = start, 0
        while end < len(tokens) and total + tokens[end] <= target:
            total += tokens[end]
            end += 1
        # Near the text's end the window grows backwards to its length.
        while start > 0 and total + tokens[start - 1] <= target:
            start -= 1
            total += tokens[start]
        return start, end

    def _query_sentence(self, rng: random.Random, avoid: int) -> tuple[str, int] | None:
        """A query-length sentence of a random text other than ``avoid``, and its tokens."""
        index = rng.randrange(len(self.texts))
        if index == avoid:
            index = (index + 1) % len(self.texts)
        sentences, tokens, queries = self.sentences(index)
        if index == avoid or not queries:
            return None
        pick = rng.choice(queries)
        return sentences[pick], tokens[pick]

    def example(self, number: int) -> tuple[str, str, str]:
        rng = random.Random(self.seed * 1_000_003 + number)
        inserted = self.inserted_share > 0 and rng.random() < self.inserted_share
        for _ in range(100):
            index = rng.randrange(len(self.texts))
            sentences, tokens, queries = self.sentences(index)
            target = math.exp(rng.uniform(math.log(self.min_tokens), math.log(self.max_tokens)))
            if inserted:
                triple = self._inserted_example(rng, index, target)
                if triple is not None:
                    return triple
                continue
            start, end = self._window(rng, tokens, target)
            window = sentences[start:end]
            candidates = [i - start for i in queries if start <= i < end]
            if len(window) >= 2 and candidates:
                pick = rng.choice(candidates)
                return window[pick], " ".join(window), " ".join(window[:pick] + window[pick + 1:])
        raise ValueError("no text has two sentences within the token budget and a query-length sentence; "
                         "raise --min-tokens or check the texts")

    def _pair_sentence(self, sentence: str) -> tuple[str, int]:
        if sentence not in self._pair_tokens:
            self._pair_tokens[sentence] = self.count_tokens([sentence])[0]
        return sentence, self._pair_tokens[sentence]

    def _related_sentences(self, rng: random.Random) -> tuple[str, tuple[str, int], tuple[str, int]] | None:
        """(query, inserted sentence, the negative's inserted sentence) from two pairs."""
        first, second = rng.sample(range(len(self.pairs)), 2)
        flip = rng.random() < 0.5
        query, inserted = self.pairs[first][::-1] if flip else self.pairs[first]
        other = self.pairs[second][int(rng.random() < 0.5)]
        if other in (query, inserted):  # a sentence may belong to several pairs
            return None
        return query, self._pair_sentence(inserted), self._pair_sentence(other)

    def _inserted_example(self, rng: random.Random, index: int, target: float) -> tuple[str, str, str] | None:
        sentences, tokens, _ = self.sentences(index)
        if self.pairs:
            related = self._related_sentences(rng)
            if related is None:
                return None
            query_text, inserted, other = related
        else:
            inserted, other = self._query_sentence(rng, index), self._query_sentence(rng, index)
            if inserted is None or other is None or inserted[0] == other[0]:
                return None
            query_text = inserted[0]
        documents = []
        for sentence, length in (inserted, other):
            start, end = self._window(rng, tokens, target - length)
            window = sentences[start:end]
            if not window:
                return None
            at = rng.randint(0, len(window))
            documents.append(" ".join(window[:at] + [sentence] + window[at:]))
        return query_text, documents[0], documents[1]

    def batch(self, step: int, size: int) -> tuple[list[str], list[str], list[str]]:
        queries, positives, negatives = zip(*(self.example(step * size + i) for i in range(size)))
        return list(queries), list(positives), list(negatives)


def paraphrase_pairs(teacher, sentences: list[str], count: int, low: float, high: float,
                     seed: int) -> list[tuple[str, str]]:
    """Pairs of related sentences among ``count`` query-length sentences drawn from
    ``sentences``: those whose teacher embeddings have a cosine in [``low``, ``high``) among
    each one's five nearest (sentence-transformers' paraphrase mining), most similar first;
    ``high`` leaves near-copies out."""
    from sentence_transformers.util import paraphrase_mining

    pool = sorted({s for s in sentences if is_query_length(s)})
    pool = random.Random(seed).sample(pool, min(count, len(pool)))
    if len(pool) < 2:
        return []
    mined = paraphrase_mining(teacher, pool, top_k=5, max_pairs=5 * len(pool), batch_size=256)
    return [(pool[i], pool[j]) for score, i, j in mined if low <= score < high]


PAIRS_FILE = "paraphrase_pairs.json"


def load_or_mine_pairs(out: Path, resume: bool, mine) -> list[tuple[str, str]]:
    """The pairs of a resumed run as its first process saved them; else ``mine()``, saved."""
    path = out / PAIRS_FILE
    if resume and path.is_file():
        return [tuple(pair) for pair in json.loads(path.read_text())]
    pairs = mine()
    write_json(path, pairs)
    return pairs
