"""Tokenization in worker processes (inference/tokenizer_processes.py): the ids of the
in-process fast tokenizer, the embeddings of encode, errors that reach the caller, and
workers that end with their owner."""

import copy
import gc
import time

import numpy as np
import pytest
import torch

from lam_embed.inference import pipeline
from lam_embed.inference.tokenizer_processes import TokenizerProcesses
from test_pipeline import mixed_texts, models  # noqa: F401  (the module's models fixture)


def rows(ids):
    return [ids.flat[start:start + length].tolist() for start, length in zip(ids.starts, ids.lengths)]


def wait_until_ready(processes, timeout=60.0):
    end = time.monotonic() + timeout
    while not all(worker.is_ready() for worker in processes.workers):
        assert time.monotonic() < end, "the tokenizer processes did not start"
        time.sleep(0.01)


def fail_in_this_process(monkeypatch):
    """The fast tokenizer of this process raises: ids that come are the workers'."""
    def fail(self, texts):
        raise AssertionError("tokenized in the main process")

    monkeypatch.setattr(pipeline.FastTokenizer, "__call__", fail)


def test_the_workers_give_the_in_process_ids(models):  # noqa: F811
    model = copy.deepcopy(models[0])
    model.max_seq_length = 16  # long texts cut before tokenizing, ASCII and not
    fast = pipeline.FastTokenizer(model.tokenizer, 16)
    texts = mixed_texts() + ["漢字テキスト" * 60, " " * 400 + "river house", "", "bell\x07 tab\tend"]
    want = fast(texts)
    assert want == pipeline._module_ids(model, texts)
    processes = TokenizerProcesses(fast, 2, rayon_threads=1)
    try:
        wait_until_ready(processes)
        with pytest.MonkeyPatch.context() as monkeypatch:
            fail_in_this_process(monkeypatch)
            assert rows(processes.token_ids(texts)) == want
            assert rows(processes.token_ids([])) == []
    finally:
        processes.close()


def test_a_call_before_the_workers_are_ready_tokenizes_in_its_own_thread(models, monkeypatch):  # noqa: F811
    fast = pipeline.FastTokenizer(models[0].tokenizer, 64)
    processes = TokenizerProcesses(fast, 1)
    try:
        monkeypatch.setattr(type(processes.workers[0]), "is_ready", lambda self: False)
        texts = mixed_texts()
        assert rows(processes.token_ids(texts)) == fast(texts)
    finally:
        processes.close()


def test_encode_texts_through_the_workers_matches_encode(models, monkeypatch):  # noqa: F811
    model = models[0]
    texts = mixed_texts(90, seed=4)
    want = model.encode(texts, batch_size=8)

    def call():
        return pipeline.encode_texts(model, texts, batch_tokens=256, block_texts=9, tokenizer_threads=3,
                                     tokenizer_processes=True, show_progress_bar=False)

    np.testing.assert_allclose(call(), want, atol=2e-6, rtol=0)  # workers starting: some blocks in this process
    wait_until_ready(pipeline.tokenizer_processes_of(model, pipeline.select_tokenizer(model, texts), 3))
    fail_in_this_process(monkeypatch)
    np.testing.assert_allclose(call(), want, atol=2e-6, rtol=0)


def test_the_workers_serve_later_calls_and_a_new_count_replaces_them(models, monkeypatch):  # noqa: F811
    model = models[0]
    monkeypatch.setattr(pipeline, "_tokenizer_processes", pipeline.weakref.WeakKeyDictionary())
    texts = mixed_texts(40)
    pipeline.encode_texts(model, texts, tokenizer_processes=True, tokenizer_threads=2, show_progress_bar=False)
    (first,) = pipeline._tokenizer_processes.values()
    pipeline.encode_texts(model, texts, tokenizer_processes=True, tokenizer_threads=2, show_progress_bar=False)
    assert list(pipeline._tokenizer_processes.values()) == [first]
    pipeline.encode_texts(model, texts, tokenizer_processes=True, tokenizer_threads=3, show_progress_bar=False)
    (second,) = pipeline._tokenizer_processes.values()
    assert second.processes == 3 and all(w.process.poll() is not None for w in first.workers)
    second.close()


def workers_started(model, monkeypatch, **options) -> list:
    started = []
    real = pipeline.tokenizer_processes_of
    monkeypatch.setattr(pipeline, "tokenizer_processes_of", lambda *args: started.append(args) or real(*args))
    pipeline.encode_texts(model, mixed_texts(40), show_progress_bar=False, **options)
    return started


def test_by_default_no_workers_run_on_a_cpu(models, monkeypatch):  # noqa: F811
    assert workers_started(models[0], monkeypatch) == []
    assert workers_started(models[0], monkeypatch, tokenizer_processes=None) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_by_default_workers_run_on_cuda(models, monkeypatch):  # noqa: F811
    model = models[0].to("cuda")
    try:
        assert len(workers_started(model, monkeypatch)) == 1
        assert workers_started(model, monkeypatch, tokenizer_processes=False) == []
    finally:
        model.to("cpu")


def test_an_error_in_a_worker_reaches_the_caller(models):  # noqa: F811
    fast = pipeline.FastTokenizer(models[0].tokenizer, 64)
    processes = TokenizerProcesses(fast, 1)
    try:
        wait_until_ready(processes)
        with pytest.raises(RuntimeError, match="a tokenizer process failed:(.|\n)*TypeError"):
            processes.token_ids(["a text", 5])
        assert rows(processes.token_ids(["a text"])) == fast(["a text"])  # the worker goes on
        processes.workers[0].process.kill()
        processes.workers[0].process.wait()
        with pytest.raises(RuntimeError, match=r"a tokenizer process ended \(exit code -9\)"):
            processes.token_ids(["a text"])
    finally:
        processes.close()


def test_the_workers_end_when_their_owner_is_collected(models):  # noqa: F811
    processes = TokenizerProcesses(pipeline.FastTokenizer(models[0].tokenizer, 64), 2)
    workers = [worker.process for worker in processes.workers]
    assert all(process.poll() is None for process in workers)
    del processes
    gc.collect()
    assert all(process.poll() == 0 for process in workers)


def test_the_caller_does_not_wait_for_a_worker_to_read_its_state(models, tmp_path, monkeypatch):  # noqa: F811
    """The state (a megabyte, more than a pipe holds) goes from a thread: a worker that has not
    started reading does not hold up the constructor."""
    from types import SimpleNamespace

    from lam_embed.inference import tokenizer_processes

    asleep = tmp_path / "asleep.py"
    asleep.write_text("import time\ntime.sleep(120)\n")
    monkeypatch.setattr(tokenizer_processes, "tokenizer_worker", SimpleNamespace(__file__=str(asleep)))
    processes = TokenizerProcesses(pipeline.FastTokenizer(models[0].tokenizer, 64), 2)
    try:
        assert all(worker.sending.is_alive() and not worker.is_ready() for worker in processes.workers)
    finally:
        for worker in processes.workers:
            worker.process.kill()
        processes.close()
    assert not any(worker.sending.is_alive() for worker in processes.workers)


def test_the_workers_end_when_the_model_is_collected(models, monkeypatch):  # noqa: F811
    monkeypatch.setattr(pipeline, "_tokenizer_processes", pipeline.weakref.WeakKeyDictionary())
    model = copy.deepcopy(models[0])
    pipeline.encode_texts(model, mixed_texts(40), tokenizer_processes=True, tokenizer_threads=2,
                          show_progress_bar=False)
    (running,) = pipeline._tokenizer_processes.values()
    workers = [worker.process for worker in running.workers]
    del model, running
    gc.collect()
    assert all(process.poll() is not None for process in workers)


def test_a_new_length_limit_gets_workers_of_its_own(models, monkeypatch):  # noqa: F811
    model = copy.deepcopy(models[0])
    texts = mixed_texts(40, seed=5)

    def call():
        return pipeline.encode_texts(model, texts, tokenizer_processes=True, tokenizer_threads=2,
                                     show_progress_bar=False)

    call()
    first = pipeline.tokenizer_processes_of(model, pipeline.select_tokenizer(model, texts), 2)
    model.max_seq_length = 16
    call()
    second = pipeline.tokenizer_processes_of(model, pipeline.select_tokenizer(model, texts), 2)
    assert second is not first and second.tokenizer.max_length == 16
    wait_until_ready(second)
    fail_in_this_process(monkeypatch)
    np.testing.assert_allclose(call(), model.encode(texts, batch_size=8), atol=2e-6, rtol=0)
