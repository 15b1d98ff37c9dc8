"""Tokenization in worker processes, for a main process that must keep its interpreter lock.

The tokenizers library releases the interpreter lock while it tokenizes, but not while it
turns its output into Python lists (one object a text, one a token), nor while the ids are
read into an array: on a GPU host the main thread, which launches the model's work, waits for
that lock behind the tokenizing threads. A worker process does all of it on its side and
sends back the ids of a block as two int64 byte strings, which the main process wraps without
a step per token. Each worker runs a ``FastTokenizer`` rebuilt from the main process's, so
the ids are the same.
"""

from __future__ import annotations

import os
import queue
import select
import subprocess
import sys
import threading
import weakref

import numpy as np

from . import tokenizer_worker
from .tokenization import FastTokenizer, TokenIds
from .tokenizer_worker import READY, read_message, write_message

CLOSE_TIMEOUT_S = 5.0  # a worker that has not ended this long after its input closed is killed


class TokenizerWorker:
    """One worker process, serving one request at a time."""

    def __init__(self, state: tuple, rayon_threads: int | None):
        env = dict(os.environ)
        if rayon_threads:
            env["RAYON_NUM_THREADS"] = str(rayon_threads)  # the tokenizers library's thread pool
        self.process = subprocess.Popen([sys.executable, tokenizer_worker.__file__], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env)
        # The tokenizer's state (about a megabyte) fills the pipe, and the worker reads it only
        # once its imports are done: written in the caller's thread, four workers' starts came
        # one after the other, 1.4 s of a first call on a GPU host (docs/performance.md).
        self.sending = threading.Thread(target=self._send_state, args=(state,), name="lam-tokenizer-start",
                                        daemon=True)
        self.sending.start()
        self.ready = False

    def _send_state(self, state: tuple) -> None:
        try:
            write_message(self.process.stdin, state)
        except (OSError, ValueError):
            pass  # the worker has ended or was closed: its first read says so

    def is_ready(self) -> bool:
        """Whether the worker has built its tokenizer (its first message has come), without
        waiting where pipes can be polled (POSIX; elsewhere it waits for the message)."""
        if not self.ready and (os.name != "posix" or select.select([self.process.stdout], [], [], 0)[0]):
            self.ready = self._reply() == READY
        return self.ready

    def _reply(self):
        try:
            return read_message(self.process.stdout)
        except EOFError as error:
            raise RuntimeError(f"a tokenizer process ended (exit code {self.process.wait()}); "
                               "its error, if any, is on standard error above") from error

    def token_ids(self, texts: list[str]) -> TokenIds:
        try:
            write_message(self.process.stdin, texts)
        except BrokenPipeError:
            pass  # the process has ended: _reply says so
        reply = self._reply()
        if isinstance(reply, str):
            raise RuntimeError(f"a tokenizer process failed:\n{reply}")
        lengths, flat = reply
        return TokenIds(np.frombuffer(flat, dtype=np.int64), np.frombuffer(lengths, dtype=np.int64))

    def close(self) -> None:
        self.sending.join(CLOSE_TIMEOUT_S)
        try:
            self.process.stdin.close()
            self.process.wait(CLOSE_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()


def _close_all(workers: list[TokenizerWorker]) -> None:
    for worker in workers:
        worker.close()


class TokenizerProcesses:
    """``tokenizer.token_ids`` run in ``processes`` worker processes, one block each at a time
    (a caller waits for a free one); the workers start at once and last until ``close`` or
    until this object is collected. A call that finds no worker ready tokenizes in its own
    thread: the workers' start (a Python interpreter each, a fraction of a second) does not
    delay the first blocks. ``rayon_threads``: the tokenizers library's threads in each
    worker (None: its default, all cores)."""

    def __init__(self, tokenizer: FastTokenizer, processes: int, rayon_threads: int | None = None):
        state = tokenizer.state()
        self.tokenizer = tokenizer
        self.processes = processes
        self.workers = [TokenizerWorker(state, rayon_threads) for _ in range(processes)]
        self.idle: queue.SimpleQueue = queue.SimpleQueue()
        for worker in self.workers:
            self.idle.put(worker)
        self._finalizer = weakref.finalize(self, _close_all, self.workers)

    def token_ids(self, texts: list[str]) -> TokenIds:
        worker = self.idle.get()
        try:
            if not worker.is_ready():
                return self.tokenizer.token_ids(texts)
            return worker.token_ids(texts)
        finally:
            self.idle.put(worker)

    def close(self) -> None:
        self._finalizer()
