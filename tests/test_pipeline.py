"""lam_embed.encode_texts (inference/pipeline.py): the embeddings of SentenceTransformer.encode,
in input order, through the fast tokenizer, token-budget batches and a background thread."""

import copy
import logging
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from lam_embed.inference import pipeline
from lam_embed.inference.tokenization import TokenIds, tokenizer_runs_serially

WORDS = "the a river house blue seven quiet old road bird sang ran below over hill".split()


def mixed_texts(n=70, seed=0):
    """Texts of 0 to ~200 words, an empty one, duplicates, and one far over 64 tokens."""
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 40)))) for _ in range(n)]
    texts[3] = ""
    texts[10] = texts[11]
    texts[20] = " ".join(rng.choice(WORDS, size=200))
    texts[30] = "Ünïcödé, punctuation -- and    spaces!"
    return texts


@pytest.fixture(scope="module")
def models():
    from conftest import small_lam_sentence_transformer
    from sentence_transformers import SentenceTransformer

    lam, teacher_path = small_lam_sentence_transformer(delta_net_noise=0.02)
    lam.max_seq_length = 64  # the long text is cut, as encode cuts it
    return lam.eval(), SentenceTransformer(teacher_path, device="cpu").eval()


@pytest.mark.parametrize("which", ["lam", "minilm"])
def test_same_embeddings_in_the_same_order_as_encode(models, which):
    model = models[0] if which == "lam" else models[1]
    texts = mixed_texts()
    want = model.encode(texts, batch_size=8)
    # A budget small enough for many batches of several sizes, blocks of a few texts.
    got = pipeline.encode_texts(model, texts, batch_tokens=256, max_batch_size=16, show_progress_bar=False)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
    np.testing.assert_allclose(got[10], got[11], atol=1e-7, rtol=0)


@pytest.mark.parametrize("limit", [{"block_texts": 7}, {"block_characters": 300}])
@pytest.mark.parametrize("threads", [1, 3])
def test_blocks_and_threads_keep_the_order(models, limit, threads):
    model = models[0]
    texts = mixed_texts(50, seed=1)
    got = pipeline.encode_texts(model, texts, batch_tokens=128, show_progress_bar=False, tokenizer_threads=threads,
                                **limit)
    np.testing.assert_allclose(got, model.encode(texts), atol=2e-6, rtol=0)


def test_a_model_with_long_input_layers_matches_encode(models, monkeypatch):
    """Batches on both sides of the threshold of a routed model (two sets of layers): each text
    through the layers of its own length, in input order, as encode gives it."""
    from lam_embed.sentence_transformer import replace_transformer_model

    model = copy.deepcopy(models[0])
    routed = model[0].auto_model.with_long_input_layers(24)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in routed.long_input_layers.parameters():
            p.add_(0.02 * torch.randn_like(p))
    replace_transformer_model(model, routed)
    texts = mixed_texts()
    want = model.encode(texts, batch_size=8)
    counts = []
    forward = routed.forward

    def spy(input_ids=None, attention_mask=None, **kwargs):
        counts.append(attention_mask.sum(1))
        return forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(routed, "forward", spy)
    got = pipeline.encode_texts(model, texts, batch_tokens=256, max_batch_size=16, show_progress_bar=False)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
    assert any(bool((c > 24).any() and (c <= 24).any()) for c in counts)  # a batch of both kinds
    # The long-input layers matter: the one-set model gives other embeddings for the long texts.
    one_set = models[0].encode(texts, batch_size=8)
    assert not np.allclose(one_set, want, atol=1e-4)


def test_blocks_are_bounded_in_texts_and_characters():
    characters = np.array([25, 6, 5, 4, 3, 2, 1, 1, 1, 1, 1, 0])
    blocks = list(pipeline._block_positions(characters, np.arange(len(characters)), block_texts=4, block_characters=10))
    # The 25-character text alone (over the limit, a block of its own), then blocks of at
    # most 10 characters and 4 texts.
    assert [b.tolist() for b in blocks] == [[0], [1], [2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]


def test_blocks_equal_a_greedy_walk_over_the_texts():
    """The blocks found from the running sum are those of adding texts one at a time while both
    limits hold (any order, empty texts, texts over the character limit)."""

    def greedy(characters, order, block_texts, block_characters):
        blocks, start = [], 0
        while start < len(order):
            end, total = start + 1, characters[order[start]]
            while (end < len(order) and end - start < block_texts
                   and total + characters[order[end]] <= block_characters):
                total += characters[order[end]]
                end += 1
            blocks.append(order[start:end].tolist())
            start = end
        return blocks

    rng = np.random.default_rng(0)
    for _ in range(200):
        characters = rng.integers(0, 60, size=int(rng.integers(0, 40)))
        characters[rng.random(len(characters)) < 0.2] = 0
        order = rng.permutation(len(characters))
        block_texts, block_characters = int(rng.integers(1, 8)), int(rng.integers(1, 150))
        got = [b.tolist() for b in pipeline._block_positions(characters, order, block_texts, block_characters)]
        assert got == greedy(characters, order, block_texts, block_characters)


def test_tokenized_blocks_come_in_order_whichever_thread_ends_first():
    texts = [f"text {i}" for i in range(40)]

    def tokenize(batch):  # the earlier blocks take longer
        time.sleep(0.002 * (40 - int(batch[0].split()[1])) / 4)
        return TokenIds.from_lists([[int(t.split()[1])] for t in batch])

    blocks = (np.arange(start, start + 4) for start in range(0, 40, 4))
    got = list(pipeline._tokenized_blocks(texts, blocks, tokenize, threads=4))
    assert [positions.tolist() for positions, _ in got] == [list(range(s, s + 4)) for s in range(0, 40, 4)]
    assert [ids.flat.tolist() for _, ids in got] == [list(range(s, s + 4)) for s in range(0, 40, 4)]


def test_token_ids_pad_select_and_concatenate_as_lists_do():
    lists = [[5, 6, 7], [], [8], [9, 10, 11, 12], [13, 14]]
    ids = TokenIds.from_lists(lists)
    rows = np.array([3, 1, 0])
    padded, mask = ids.padded(rows)
    assert padded.tolist() == [[9, 10, 11, 12], [0, 0, 0, 0], [5, 6, 7, 0]]
    assert mask.sum(1).tolist() == [4, 0, 3]
    chosen = ids.select(rows)
    assert chosen.flat.tolist() == [9, 10, 11, 12, 5, 6, 7] and chosen.lengths.tolist() == [4, 0, 3]
    both = TokenIds.concatenate(chosen, TokenIds.from_lists([[1], [2, 3]]))
    assert both.padded(np.arange(5))[0].tolist() == [[9, 10, 11, 12], [0, 0, 0, 0], [5, 6, 7, 0],
                                                     [1, 0, 0, 0], [2, 3, 0, 0]]


def test_the_tokenizer_is_checked_once_per_model_and_limit(models, monkeypatch):
    """The fast backend is built and checked against the module's tokenization at a model's
    first call, not at every call; a new max_seq_length makes a new check (and a backend
    that cuts at the new limit)."""
    model = models[0]
    monkeypatch.setattr(pipeline, "_selected_tokenizers", pipeline.weakref.WeakKeyDictionary())
    checks = []
    real = pipeline._module_ids
    monkeypatch.setattr(pipeline, "_module_ids", lambda m, batch: checks.append(len(batch)) or real(m, batch))
    texts = mixed_texts(40)
    first = pipeline.encode_texts(model, texts, show_progress_bar=False)
    second = pipeline.encode_texts(model, texts[::-1], show_progress_bar=False)
    assert len(checks) == 1
    np.testing.assert_array_equal(first, second[::-1])
    model.max_seq_length = 16
    try:
        got = pipeline.encode_texts(model, texts, show_progress_bar=False)
        assert len(checks) == 2
        np.testing.assert_allclose(got, model.encode(texts), atol=2e-6, rtol=0)
    finally:
        model.max_seq_length = 64


def test_single_text_tensors_and_normalisation(models):
    model = models[1]
    text = "a quiet river ran below the old road"
    one = pipeline.encode_texts(model, text, show_progress_bar=False)
    assert one.shape == (384,)
    np.testing.assert_allclose(one, model.encode(text), atol=2e-6, rtol=0)
    tensor = pipeline.encode_texts(model, [text, ""], convert_to_numpy=False, normalize_embeddings=True,
                                   show_progress_bar=False)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (2, 384)
    torch.testing.assert_close(tensor.norm(dim=-1), torch.ones(2))
    assert pipeline.encode_texts(model, [], show_progress_bar=False).shape == (0, 384)


def test_token_budget_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=500)
    batches = pipeline.token_budget_batches(lengths, batch_tokens=2048, max_batch_size=64)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(500))  # every text once
    assert np.all(np.diff(lengths[flat]) <= 0)  # longest first
    sizes_by_bucket = {}
    for batch in batches:
        bucket = -(-int(lengths[batch].max()) // 16) * 16
        assert len(batch) * bucket <= 2048 and len(batch) <= 64
        sizes_by_bucket.setdefault(bucket, set()).add(len(batch))
    # One batch size a bucket, besides a bucket's last, smaller batch.
    assert all(len(sizes) <= 2 for sizes in sizes_by_bucket.values())
    # A text over the budget is a batch of its own.
    assert [len(b) for b in pipeline.token_budget_batches(np.array([5000, 10, 10]), 1024, 8)] == [1, 2]


def test_fast_tokenizer_gives_the_module_ids(models):
    model = models[0]
    texts = mixed_texts()
    fast = pipeline.FastTokenizer(model.tokenizer, model.max_seq_length)
    assert fast(texts) == pipeline._module_ids(model, texts)
    assert max(map(len, fast(texts))) == 64


def test_a_text_far_past_the_limit_is_cut_before_tokenizing_with_the_same_ids(models):
    """At a limit of 16 tokens a text over 160 characters is cut at a space first: the ids are
    the module's own (its tokenization of the whole texts), also where the cut text gives too
    few ids (a long run of spaces) or cannot be cut (no space, CJK characters)."""
    model = copy.deepcopy(models[0])
    model.max_seq_length = 16
    rng = np.random.default_rng(2)
    texts = [" ".join(rng.choice(WORDS, size=300)),  # cut
             " " * 400 + " ".join(rng.choice(WORDS, size=30)),  # cut to too few ids: tokenized whole
             "x" * 50 + "ünï" * 100,  # no space to cut at
             "漢字テキスト" * 60 + " river house",  # CJK, one word each for BERT's splitter
             "short text", ""]
    fast = pipeline.FastTokenizer(model.tokenizer, 16)
    assert fast(texts) == pipeline._module_ids(model, texts)
    fast.ascii_backend = None  # every text through the one recorded backend
    backend, seen = fast.backend, []

    class Recording:  # the backend is a Rust object: its methods cannot be replaced
        def encode_batch_fast(self, batch, **kwargs):
            seen.append([len(t) for t in batch])
            return backend.encode_batch_fast(batch, **kwargs)

    fast.backend = Recording()
    assert fast(texts) == pipeline._module_ids(model, texts)
    assert seen[0][0] <= 160 < len(texts[0])  # the first text was cut
    assert seen[1] == [len(texts[1])]  # the spaces' text again, whole


def test_ascii_texts_get_the_module_ids_through_the_lighter_normaliser(models):
    """ASCII texts go through a copy of the backend whose normaliser only removes control
    characters and lowercases: the ids are the module's own, control characters, whitespace
    of every kind and capitals included, in input order beside non-ASCII texts."""
    model = models[0]
    texts = ["Plain ASCII, With Capitals.", "bell\x07 vt\x0b ff\x0c del\x7f esc\x1b unit\x1f end",
             "tab\tnew\nline\r\nreturn  spaces", "Ünïcödé café", "mixed ASCII then é", "漢字 and ascii", "", "   "]
    fast = pipeline.FastTokenizer(model.tokenizer, model.max_seq_length)
    assert fast.ascii_backend is not None
    ascii_backend, seen = fast.ascii_backend, []

    class Recording:
        def encode_batch_fast(self, batch, **kwargs):
            seen.extend(batch)
            return ascii_backend.encode_batch_fast(batch, **kwargs)

    fast.ascii_backend = Recording()
    assert fast(texts) == pipeline._module_ids(model, texts)
    assert seen == [t for t in texts if t.isascii()]


def test_a_tokenizer_that_truncates_on_the_left_keeps_the_end_of_long_texts(models):
    """The module's tokenizer cuts from the left: the fast backend does too and does not cut a
    text's end away first, also when the first texts (those checked) are all short."""
    model = copy.deepcopy(models[0])
    model.max_seq_length = 16
    model.tokenizer.truncation_side = "left"
    rng = np.random.default_rng(3)
    texts = ["short text"] * 20 + [" ".join(rng.choice(WORDS, size=size)) for size in (30, 300)]
    fast = pipeline.FastTokenizer(model.tokenizer, 16)
    assert fast.cut_characters is None
    assert fast(texts) == pipeline._module_ids(model, texts)
    got = pipeline.encode_texts(model, texts, show_progress_bar=False)
    np.testing.assert_allclose(got, model.encode(texts), atol=2e-6, rtol=0)


def test_the_check_finds_a_backend_that_truncates_on_the_other_side(models, monkeypatch):
    """The checked texts are all short; the check's own long text still shows the side."""
    model = copy.deepcopy(models[0])
    model.tokenizer.truncation_side = "left"
    real_init = pipeline.FastTokenizer.__init__

    def right_side(self, tokenizer, max_length):
        real_init(self, tokenizer, max_length)
        self.backend.enable_truncation(max_length, direction="right")
        self.ascii_backend = None

    monkeypatch.setattr(pipeline.FastTokenizer, "__init__", right_side)
    assert not isinstance(pipeline.select_tokenizer(model, ["short text"] * 20), pipeline.FastTokenizer)


def test_a_tokenizer_that_reads_across_spaces_is_not_cut_nor_given_the_ascii_normaliser():
    from tokenizers import Tokenizer, models as token_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(token_models.BPE(unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel()
    fast = pipeline.FastTokenizer(PreTrainedTokenizerFast(tokenizer_object=backend), 16)
    assert fast.cut_characters is None and fast.ascii_backend is None


def test_a_tokenizer_that_disagrees_is_not_used(models, monkeypatch, caplog):
    model = models[0]
    texts = mixed_texts(40)
    monkeypatch.setattr(pipeline, "_selected_tokenizers", pipeline.weakref.WeakKeyDictionary())
    monkeypatch.setattr(pipeline.FastTokenizer, "__call__", lambda self, batch: [[101, 102] for _ in batch])
    threads = []
    real = pipeline._tokenized_blocks
    monkeypatch.setattr(pipeline, "_tokenized_blocks",
                        lambda texts, blocks, tokenize, n: threads.append(n) or real(texts, blocks, tokenize, n))
    with caplog.at_level(logging.WARNING, logger=pipeline.__name__):
        got = pipeline.encode_texts(model, texts, show_progress_bar=False)
    assert "gives other ids" in caplog.text
    assert threads == [1]  # the module's own tokenizer is called one block at a time
    np.testing.assert_allclose(got, model.encode(texts), atol=2e-6, rtol=0)


def test_an_error_in_a_tokenizing_thread_reaches_the_caller(models, monkeypatch):
    model = models[0]
    texts = mixed_texts(40)
    pipeline.encode_texts(model, texts[:2], show_progress_bar=False)  # the tokenizer chosen and checked

    def fail(self, batch):
        if any("punctuation" in text for text in batch):
            raise RuntimeError("tokenizer broke")
        return [[101, 102] for _ in batch]

    monkeypatch.setattr(pipeline.FastTokenizer, "__call__", fail)
    with pytest.raises(RuntimeError, match="tokenizer broke"):
        pipeline.encode_texts(model, texts, block_texts=3, show_progress_bar=False)


def test_bad_arguments_are_named(models):
    model = models[0]
    with pytest.raises(TypeError, match=r"texts\[1\] must be a string, got int"):
        pipeline.encode_texts(model, ["a", 3])
    with pytest.raises(TypeError, match="texts must be a string or a sequence"):
        pipeline.encode_texts(model, 5)
    with pytest.raises(TypeError, match="tokenizer_processes must be True, False or None, got 4"):
        pipeline.encode_texts(model, ["a"], tokenizer_processes=4)
    for name in ("batch_tokens", "max_batch_size", "block_texts", "block_characters", "tokenizer_threads"):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer, got 0"):
            pipeline.encode_texts(model, ["a"], **{name: 0})


def test_the_default_budget_follows_the_device(models, monkeypatch):
    seen = []
    real = pipeline.token_budget_batches
    monkeypatch.setattr(pipeline, "token_budget_batches",
                        lambda lengths, batch_tokens, max_batch_size: seen.append(batch_tokens) or real(
                            lengths, batch_tokens, max_batch_size))
    pipeline.encode_texts(models[0], ["a short text"], show_progress_bar=False)
    assert seen == [pipeline.CPU_BATCH_TOKENS]


# Whether the tokenizers library ran a batch on its thread pool: the process has more threads after.
USES_THREAD_POOL = """
import os
from tokenizers import Tokenizer, models, pre_tokenizers
tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
before = len(os.listdir("/proc/self/task"))
tokenizer.encode_batch(["a a a"] * 2000)
print(len(os.listdir("/proc/self/task")) > before)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
@pytest.mark.parametrize("value", [None, "true", "1", "yes", "FALSE", "False", "off", "", "no", "n", "f", "0"])
def test_serial_tokenizer_as_the_tokenizers_library_reads_the_variable(value, monkeypatch):
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    if value is not None:
        env["TOKENIZERS_PARALLELISM"] = value
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", value)
    done = subprocess.run([sys.executable, "-c", USES_THREAD_POOL], env=env, capture_output=True, text=True,
                          check=True)
    assert tokenizer_runs_serially() is (done.stdout.strip() == "False")


@pytest.mark.parametrize("value, defaults", [("false", pipeline.SERIAL_TOKENIZER_BLOCKS),
                                             ("true", pipeline.PARALLEL_TOKENIZER_BLOCKS)])
def test_the_default_blocks_follow_the_tokenizers_parallelism(models, monkeypatch, value, defaults):
    seen = {}

    def spy(name: str, key: str, argument: int) -> None:
        """Record the first value of ``name``'s positional argument ``argument`` under ``key``."""
        real = getattr(pipeline, name)

        def recorded(*args):
            seen.setdefault(key, args[argument])
            return real(*args)

        monkeypatch.setattr(pipeline, name, recorded)

    spy("_block_positions", "characters", 3)
    spy("_tokenized_blocks", "threads", 3)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", value)
    texts = mixed_texts(40, seed=2)
    got = pipeline.encode_texts(models[0], texts, show_progress_bar=False)
    assert (seen["threads"], seen["characters"]) == defaults
    seen.clear()
    pipeline.encode_texts(models[0], texts, show_progress_bar=False, tokenizer_threads=3, block_characters=99)
    assert (seen["threads"], seen["characters"]) == (3, 99)
    np.testing.assert_allclose(got, models[0].encode(texts), atol=2e-6, rtol=0)


def test_batches_across_blocks_are_those_of_one_pass():
    # Blocks follow the length order (longest first), as encode_texts forms them.
    rng = np.random.default_rng(0)
    lengths = np.sort(rng.integers(1, 300, size=400))[::-1]
    ids = [[1000 * text + i for i in range(int(n))] for text, n in enumerate(lengths)]  # no two alike
    blocks = [(np.arange(start, min(start + 37, 400)), TokenIds.from_lists(ids[start:start + 37]))
              for start in range(0, 400, 37)]
    got = list(pipeline._batches_across_blocks(iter(blocks), batch_tokens=2048, max_batch_size=64))
    seen = np.concatenate([positions[batch] for positions, _, batch in got])
    assert sorted(seen.tolist()) == list(range(400))  # every text once
    for positions, batch_ids, batch in got:
        rows, mask = batch_ids.padded(batch)
        assert [row[m].tolist() for row, m in zip(rows, mask)] == [ids[p] for p in positions[batch]]
    one_pass = pipeline.token_budget_batches(lengths, batch_tokens=2048, max_batch_size=64)
    per_block = sum(len(pipeline.token_budget_batches(lengths[p], 2048, 64)) for p, _ in blocks)
    # Blocks cut wherever they are add at most one batch, not one a block.
    assert len(got) <= len(one_pass) + 1 < per_block
